// Host-side pieces of the softmax cross-entropy kernels shared by the CPU and CUDA sources: the (N, C, S) layout
// every kernel reads and the argument guards behind the Python front end (see common.h).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "fcn_fast/common.h"

namespace fcn_fast {

// Sizes and element strides of logits (N, C, S) and target (N, S); any strides, read in place.
struct CeLayout {
  int64_t n, c, s;
  int64_t logit_n, logit_c, logit_s;
  int64_t target_n, target_s;
};

inline CeLayout ce_layout(const at::Tensor& logits, const at::Tensor& target) {
  return CeLayout{logits.size(0),   logits.size(1),   logits.size(2),   logits.stride(0),
                  logits.stride(1), logits.stride(2), target.stride(0), target.stride(1)};
}

// The softmax statistics a forward saves for backward (softmax_ce.h), (2, *pixel_shape): plane 0 the largest logit m
// of each pixel, plane 1 L = log sum_c exp(z_c - m). One float per pixel (m + L) loses L for large logits.
inline std::vector<int64_t> ce_stats_shape(at::IntArrayRef pixel_shape) {
  std::vector<int64_t> shape{2};
  shape.insert(shape.end(), pixel_shape.begin(), pixel_shape.end());
  return shape;
}

// The forward's outputs, uninitialized, in the accumulate dtype of `input`'s (acc_scalar_type), on its device: the
// loss and its weight in the "mean" denominator, each of `loss_shape` (one value per pixel, or per partial sum), and
// the softmax statistics of `pixel_shape` pixels (ce_stats_shape; empty unless save_stats). Weights, statistics
// and incoming gradients share that dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_pixel_outputs(at::IntArrayRef pixel_shape,
                                                                    at::IntArrayRef loss_shape,
                                                                    const at::Tensor& input, bool save_stats = true) {
  const auto options = input.options().dtype(acc_scalar_type(input.scalar_type()));
  const auto stats = save_stats ? ce_stats_shape(pixel_shape) : std::vector<int64_t>{0};
  return {at::empty(loss_shape, options), at::empty(loss_shape, options), at::empty(stats, options)};
}

inline void check_ce_kernel_args(const at::Tensor& logits, const at::Tensor& target,
                                 const c10::optional<at::Tensor>& weight, c10::DeviceType device) {
  TORCH_CHECK(logits.device().type() == device && target.device() == logits.device(),
              "logits and target must be ", device, " tensors on one device");
  TORCH_CHECK(logits.dim() == 3, "logits must be (N, C, S), got ", logits.sizes());
  TORCH_CHECK(target.dim() == 2 && target.size(0) == logits.size(0) && target.size(1) == logits.size(2),
              "target must be (N, S) matching logits ", logits.sizes(), ", got ", target.sizes());
  TORCH_CHECK(at::isIntegralType(target.scalar_type(), /*includeBool=*/false), "target must be an integer tensor");
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == logits.size(1) && weight->is_contiguous() &&
                    weight->device() == logits.device() && weight->scalar_type() == acc_scalar_type(logits.scalar_type()),
                "weight must be a contiguous (C,) tensor of the accumulate dtype on the logits' device");
  }
}

// lse: the forward's contiguous softmax statistics (2, N, S); grad_loss (N, S) with any strides (0 for an expanded
// scalar); both of the accumulate dtype.
inline void check_ce_backward_args(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                   const at::Tensor& lse) {
  const auto acc = acc_scalar_type(logits.scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(ce_stats_shape(target.sizes())) && lse.is_contiguous() &&
                  lse.scalar_type() == acc && lse.device() == logits.device(),
              "lse must be the contiguous (2, N, S) softmax statistics of the forward, of the accumulate dtype on the "
              "logits' device");
  TORCH_CHECK(grad_loss.dim() == 2 && grad_loss.size(0) == target.size(0) && grad_loss.size(1) == target.size(1) &&
                  grad_loss.scalar_type() == acc && grad_loss.device() == logits.device(),
              "grad_loss must be (N, S) (strides may be 0) of the accumulate dtype on the logits' device");
}

}  // namespace fcn_fast

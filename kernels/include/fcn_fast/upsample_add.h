// Host-side argument checks and allocations shared by the CPU and CUDA entry points of upsample_add
// (kernels/cpu/upsample_add_cpu.cpp, kernels/cuda/upsample_add_cuda.cu). The Python front end raises the user-facing
// errors first; these keep a direct torch.ops.fcn_fast call from reading out of bounds.
#pragma once

#include <tuple>

#include "fcn_fast/common.h"

namespace fcn_fast {

// Tap weights are float32 for float32/half/bfloat16 data and float64 for float64 data (acc_t).
inline void check_upsample_taps(const at::Tensor& data, const at::Tensor& row_index, const at::Tensor& row_weight,
                                const at::Tensor& col_index, const at::Tensor& col_weight) {
  check_taps(row_index, row_weight, "row");
  check_taps(col_index, col_weight, "col");
  const at::ScalarType expected = acc_scalar_type(data.scalar_type());
  for (const at::Tensor* weight : {&row_weight, &col_weight}) {
    TORCH_CHECK(weight->scalar_type() == expected, "tap weights must be ", expected, " for ", data.scalar_type(),
                " data, got ", weight->scalar_type());
  }
  for (const at::Tensor* table : {&row_index, &row_weight, &col_index, &col_weight}) {
    TORCH_CHECK(table->device() == data.device(), "tap tables must be on ", data.device(), ", got ", table->device());
  }
}

inline void check_skip_crop(int64_t skip_h, int64_t skip_w, int64_t out_h, int64_t out_w, int64_t skip_y,
                            int64_t skip_x) {
  TORCH_CHECK(skip_y >= 0 && skip_x >= 0 && skip_y + out_h <= skip_h && skip_x + out_w <= skip_w, "skip of ", skip_h,
              "x", skip_w, " is too small for an ", out_h, "x", out_w, " crop at (", skip_y, ", ", skip_x, ")");
}

// The forward's inputs made contiguous and checked: (x, skip or an undefined tensor, out allocated).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_upsample_add_forward(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& skip_in, const at::Tensor& row_index,
    const at::Tensor& row_weight, const at::Tensor& col_index, const at::Tensor& col_weight, int64_t skip_y,
    int64_t skip_x) {
  TORCH_CHECK(x_in.dim() == 4, "x must be 4D (N, C, h, w), got ", x_in.sizes());
  check_upsample_taps(x_in, row_index, row_weight, col_index, col_weight);
  const at::Tensor x = x_in.contiguous();
  const int64_t out_h = row_index.size(0), out_w = col_index.size(0);
  at::Tensor skip;
  if (skip_in.has_value()) {
    skip = skip_in->contiguous();
    TORCH_CHECK(skip.dim() == 4 && skip.size(0) == x.size(0) && skip.size(1) == x.size(1) &&
                    skip.scalar_type() == x.scalar_type() && skip.device() == x.device(),
                "skip must be (N, C, Hs, Ws) with the N, C, dtype and device of x, got ", skip.sizes(), " ",
                skip.scalar_type(), " on ", skip.device(), " for x ", x.sizes(), " ", x.scalar_type(), " on ",
                x.device());
    check_skip_crop(skip.size(2), skip.size(3), out_h, out_w, skip_y, skip_x);
  }
  at::Tensor out = at::empty({x.size(0), x.size(1), out_h, out_w}, x.options());
  TORCH_CHECK(out.numel() == 0 || (x.size(2) > 0 && x.size(3) > 0), "x has an empty spatial size ", x.sizes());
  return {x, skip, out};
}

// The backward's gradient made contiguous and checked: (grad, grad_x, grad_skip), each output allocated when needed
// and empty otherwise.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_upsample_add_backward(
    const at::Tensor& grad_in, const at::Tensor& row_index, const at::Tensor& row_weight, const at::Tensor& row_readers,
    const at::Tensor& col_index, const at::Tensor& col_weight, const at::Tensor& col_readers, int64_t in_h,
    int64_t in_w, int64_t skip_h, int64_t skip_w, int64_t skip_y, int64_t skip_x, bool need_x, bool need_skip) {
  TORCH_CHECK(grad_in.dim() == 4, "grad_out must be 4D (N, C, H, W), got ", grad_in.sizes());
  check_upsample_taps(grad_in, row_index, row_weight, col_index, col_weight);
  TORCH_CHECK(row_index.size(0) == grad_in.size(2) && col_index.size(0) == grad_in.size(3), "tap tables of ",
              row_index.size(0), "x", col_index.size(0), " outputs do not match grad_out ", grad_in.sizes());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = grad.size(0), c = grad.size(1);
  at::Tensor grad_x = at::empty({0}, grad.options()), grad_skip = at::empty({0}, grad.options());
  if (need_x) {
    TORCH_CHECK(in_h >= 1 && in_w >= 1, "in_h and in_w must be >= 1, got ", in_h, "x", in_w);
    check_readers(row_readers, in_h, "row");
    check_readers(col_readers, in_w, "col");
    TORCH_CHECK(row_readers.device() == grad.device() && col_readers.device() == grad.device(),
                "readers tables must be on ", grad.device());
    grad_x = at::empty({n, c, in_h, in_w}, grad.options());
  }
  if (need_skip) {
    check_skip_crop(skip_h, skip_w, grad.size(2), grad.size(3), skip_y, skip_x);
    grad_skip = at::empty({n, c, skip_h, skip_w}, grad.options());
  }
  return {grad, grad_x, grad_skip};
}

}  // namespace fcn_fast

// softmax_cross_entropy on CUDA: one thread per pixel, looping over the C classes with an online softmax
// (softmax_ce.h). In NCHW the class axis is strided by H*W, so at each class step consecutive threads read consecutive
// pixels: every load is coalesced, and each logit is read once in the forward (twice with label smoothing, whose
// weighted sum is taken relative to the final max) and once in the backward.
// Forward writes per pixel the loss, its "mean" denominator weight and the softmax statistics backward keeps (max
// logit m and L = log sum exp(z - m)); backward recomputes p = exp(z - m) e^-L and writes the gradient. The pixel index (and its division into
// image and position) has the launch policy's width (cuda_launch.h); element offsets, which any strides may make
// large, are int64.
#include <torch/library.h>

#include <tuple>

#include "fcn_fast/common.h"
#include "fcn_fast/cross_entropy_host.h"
#include "fcn_fast/cuda_launch.h"
#include "fcn_fast/softmax_ce.h"

namespace fcn_fast {
namespace {

// lse: the softmax statistics (softmax_ce.h), planes of L.n * L.s values: max, then log sum exp(z - max).
template <typename scalar_t, typename label_t, typename acc_t, typename index_t>
__global__ void forward_kernel(CeLayout L, index_t pixels, index_t spatial, const scalar_t* __restrict__ logits,
                               const label_t* __restrict__ target, const acc_t* __restrict__ weight,
                               int64_t ignore_index, acc_t smoothing, acc_t* __restrict__ loss,
                               acc_t* __restrict__ denom, acc_t* __restrict__ lse_out) {
  const CeConfig<acc_t> cfg = make_ce_config(weight, L.c, ignore_index, smoothing);
  FCN_GRID_STRIDE_LOOP(index_t, i, pixels) {
    const index_t n = i / spatial, p = i - n * spatial;
    const int64_t t = static_cast<int64_t>(target[n * L.target_n + p * L.target_s]);
    const scalar_t* z = logits + n * L.logit_n + p * L.logit_s;
    const CePixelStats<acc_t> stats =
        ce_pixel_stats(cfg, t, [&](int64_t c) { return static_cast<acc_t>(z[c * L.logit_c]); });
    ce_pixel_loss(cfg, t, stats, &loss[i], &denom[i]);
    lse_out[i] = stats.max;
    lse_out[pixels + i] = stats.log_sum;
  }
}

template <typename scalar_t, typename label_t, typename acc_t, typename index_t>
__global__ void backward_kernel(CeLayout L, index_t pixels, index_t spatial, const scalar_t* __restrict__ logits,
                                const label_t* __restrict__ target, const acc_t* __restrict__ lse,
                                const acc_t* __restrict__ grad_loss, int64_t gn, int64_t gs,
                                const acc_t* __restrict__ weight, int64_t ignore_index, acc_t smoothing,
                                scalar_t* __restrict__ grad, int64_t dn, int64_t dc, int64_t ds) {
  const CeConfig<acc_t> cfg = make_ce_config(weight, L.c, ignore_index, smoothing);
  FCN_GRID_STRIDE_LOOP(index_t, i, pixels) {
    const index_t n = i / spatial, p = i - n * spatial;
    const int64_t t = static_cast<int64_t>(target[n * L.target_n + p * L.target_s]);
    // p_c = exp(z_c - max) e^-L, the e^-L folded into the coefficients once per pixel.
    const CeGradCoef<acc_t> k = ce_grad_coef(cfg, t, grad_loss[n * gn + p * gs], lse[pixels + i]);
    const acc_t pixel_max = lse[i];
    const scalar_t* z = logits + n * L.logit_n + p * L.logit_s;
    scalar_t* out = grad + n * dn + p * ds;
    for (int64_t c = 0; c < L.c; ++c) {
      const acc_t e = ce_exp(static_cast<acc_t>(z[c * L.logit_c]) - pixel_max);
      out[c * dc] = static_cast<scalar_t>(k.grad(e, c == t, ce_class_weight(cfg, c)));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy_fwd_cuda(const at::Tensor& logits,
                                                                             const at::Tensor& target,
                                                                             const c10::optional<at::Tensor>& weight,
                                                                             int64_t ignore_index, double smoothing) {
  check_ce_kernel_args(logits, target, weight, cuda::kDeviceType);
  const cuda::DeviceGuard guard(logits.device());
  at::Tensor loss, denom, lse;  // not a structured binding: the dispatch lambdas capture them
  const int64_t pixel_shape[] = {logits.size(0), logits.size(2)};
  std::tie(loss, denom, lse) = ce_pixel_outputs(pixel_shape, pixel_shape, logits);
  if (loss.numel() == 0) return {loss, denom, lse};
  const CeLayout L = ce_layout(logits, target);
  const int64_t pixels = L.n * L.s;
  const cuda::Stream stream = cuda::current_stream();
  FCN_DISPATCH_FLOATING(logits.scalar_type(), "softmax_cross_entropy_fwd_cuda", [&] {
    using logit_t = scalar_t;  // the nested dispatch below rebinds scalar_t to the label type
    using acc = acc_t<logit_t>;
    const acc* w = weight.has_value() ? weight->data_ptr<acc>() : nullptr;
    AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "softmax_cross_entropy_fwd_cuda_target", [&] {
      using label_t = scalar_t;
      cuda::with_index_type({pixels}, [&](auto index_zero) {
        using index_t = decltype(index_zero);
        cuda::launch(forward_kernel<logit_t, label_t, acc, index_t>, cuda::blocks_for(pixels), stream, L,
                     static_cast<index_t>(pixels), static_cast<index_t>(L.s), logits.data_ptr<logit_t>(),
                     target.data_ptr<label_t>(), w, ignore_index, static_cast<acc>(smoothing), loss.data_ptr<acc>(),
                     denom.data_ptr<acc>(), lse.data_ptr<acc>());
      });
    });
  });
  return {loss, denom, lse};
}

at::Tensor softmax_cross_entropy_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                          const at::Tensor& target, const at::Tensor& lse,
                                          const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                          double smoothing) {
  check_ce_kernel_args(logits, target, weight, cuda::kDeviceType);
  check_ce_backward_args(grad_loss, logits, target, lse);
  const cuda::DeviceGuard guard(logits.device());
  at::Tensor grad = at::empty_like(logits);  // keeps the logits' strides when they are dense
  if (grad.numel() == 0) return grad;
  const CeLayout L = ce_layout(logits, target);
  const int64_t pixels = L.n * L.s;
  const cuda::Stream stream = cuda::current_stream();
  FCN_DISPATCH_FLOATING(logits.scalar_type(), "softmax_cross_entropy_bwd_cuda", [&] {
    using logit_t = scalar_t;
    using acc = acc_t<logit_t>;
    const acc* w = weight.has_value() ? weight->data_ptr<acc>() : nullptr;
    AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "softmax_cross_entropy_bwd_cuda_target", [&] {
      using label_t = scalar_t;
      cuda::with_index_type({pixels}, [&](auto index_zero) {
        using index_t = decltype(index_zero);
        cuda::launch(backward_kernel<logit_t, label_t, acc, index_t>, cuda::blocks_for(pixels), stream, L,
                     static_cast<index_t>(pixels), static_cast<index_t>(L.s), logits.data_ptr<logit_t>(),
                     target.data_ptr<label_t>(), lse.data_ptr<acc>(), grad_loss.data_ptr<acc>(), grad_loss.stride(0),
                     grad_loss.stride(1), w, ignore_index, static_cast<acc>(smoothing), grad.data_ptr<logit_t>(),
                     grad.stride(0), grad.stride(1), grad.stride(2));
      });
    });
  });
  return grad;
}

}  // namespace

FCN_FAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("_softmax_cross_entropy_fwd", &softmax_cross_entropy_fwd_cuda);
  m.impl("_softmax_cross_entropy_bwd", &softmax_cross_entropy_bwd_cuda);
}

}  // namespace fcn_fast

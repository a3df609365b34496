// softmax_cross_entropy on CUDA: each thread takes kPixelsPerThread pixels of one image, kThreadsPerBlock apart (lanes
// along pixels), and loops over the C classes with one online softmax per pixel (softmax_ce.h): the pixels' loads of a
// class step are independent, so they are in flight together. In NCHW the class axis is strided by H*W and each class
// step of a warp reads consecutive pixels: every load is coalesced, each logit is read once in the forward (twice with
// label smoothing, whose weighted sum is taken relative to the final max) and once in the backward; other strides
// (channels_last) are read in place. Grid: blockIdx.x over groups of kPixelsPerThread * kThreadsPerBlock pixels of an
// image, blockIdx.z over images (cuda_block.h), so no division per pixel. Forward writes the softmax statistics
// backward keeps (max logit m and L = log sum exp(z - m), softmax_ce.h) per pixel and either the loss and its "mean"
// denominator weight per pixel or, for a reduced loss, one partial sum of each per block (added in a fixed order on
// the host: bitwise reproducible). Backward recomputes p = exp(z - m) e^-L and writes the gradient. The pixel index
// has the launch policy's width (cuda_launch.h); element offsets, which any strides may make large, are int64.
#include <torch/library.h>

#include <tuple>

#include "fcn_fast/common.h"
#include "fcn_fast/cross_entropy_host.h"
#include "fcn_fast/cuda_block.h"
#include "fcn_fast/cuda_launch.h"
#include "fcn_fast/softmax_ce.h"

namespace fcn_fast {
namespace {

constexpr int kPixelsPerThread = 4;
constexpr int64_t kPixelsPerBlock = int64_t(kPixelsPerThread) * cuda::kThreadsPerBlock;

// (pixel groups, 1, images), at most max_blocks() blocks in all.
inline dim3 ce_grid(const CeLayout& L) {
  const int64_t cap = cuda::max_blocks();
  const unsigned int x = cuda::grid_axis((L.s + kPixelsPerBlock - 1) / kPixelsPerBlock, cap);
  return dim3(x, 1, cuda::grid_axis(L.n, std::min<int64_t>(65535, cap / x)));
}

// lse_max, lse_log_sum: the two planes of the softmax statistics (softmax_ce.h), indexed by n * spatial + p.
template <typename scalar_t, typename label_t, typename acc_t, typename index_t>
__global__ void forward_kernel(CeLayout L, index_t images, index_t spatial, const scalar_t* __restrict__ logits,
                               const label_t* __restrict__ target, const acc_t* __restrict__ weight,
                               int64_t ignore_index, acc_t smoothing, bool per_pixel, acc_t* __restrict__ loss,
                               acc_t* __restrict__ denom, acc_t* __restrict__ lse_max,
                               acc_t* __restrict__ lse_log_sum) {
  const CeConfig<acc_t> cfg = make_ce_config(weight, L.c, ignore_index, smoothing);
  const index_t groups = (spatial + kPixelsPerBlock - 1) / kPixelsPerBlock;
  acc_t thread_loss = 0, thread_denom = 0;
  FCN_BLOCK_STRIDE_LOOP(index_t, n, images, z) {
    FCN_BLOCK_STRIDE_LOOP(index_t, group, groups, x) {
      const index_t first = group * kPixelsPerBlock + static_cast<index_t>(threadIdx.x);
      const scalar_t* z[kPixelsPerThread];
      int64_t t[kPixelsPerThread];
      CeAccumulator<acc_t> acc[kPixelsPerThread];
      for (int k = 0; k < kPixelsPerThread; ++k) {
        // A pixel past the image repeats the image's first one: uniform loop bounds, nothing written for it.
        const index_t p = first + k * cuda::kThreadsPerBlock < spatial ? first + k * cuda::kThreadsPerBlock : 0;
        t[k] = static_cast<int64_t>(target[n * L.target_n + p * L.target_s]);
        z[k] = logits + n * L.logit_n + p * L.logit_s;
      }
      // ce_pixel_stats for kPixelsPerThread pixels at once.
      for (int64_t c = 0; c < L.c; ++c) {
        for (int k = 0; k < kPixelsPerThread; ++k) acc[k].add(c, static_cast<acc_t>(z[k][c * L.logit_c]), t[k]);
      }
      CePixelStats<acc_t> stats[kPixelsPerThread];
      for (int k = 0; k < kPixelsPerThread; ++k) stats[k] = ce_stats_of(acc[k]);
      if (cfg.smoothing != acc_t(0)) {
        for (int64_t c = 0; c < L.c; ++c) {
          const acc_t class_weight = ce_class_weight(cfg, c);
          for (int k = 0; k < kPixelsPerThread; ++k) {
            stats[k].add_smoothing_term(class_weight, static_cast<acc_t>(z[k][c * L.logit_c]));
          }
        }
      }
      for (int k = 0; k < kPixelsPerThread; ++k) {  // fixed bounds (and no break): the arrays stay in registers
        const index_t p = first + k * cuda::kThreadsPerBlock;
        if (p >= spatial) continue;
        const index_t i = n * spatial + p;
        acc_t pixel_loss, pixel_denom;
        ce_pixel_loss(cfg, t[k], stats[k], &pixel_loss, &pixel_denom);
        if (per_pixel) {
          loss[i] = pixel_loss;
          denom[i] = pixel_denom;
        } else {
          thread_loss += pixel_loss;
          thread_denom += pixel_denom;
        }
        lse_max[i] = stats[k].max;
        lse_log_sum[i] = stats[k].log_sum;
      }
    }
  }
  if (!per_pixel) {  // uniform across the grid, so every thread reaches the barriers
    __shared__ acc_t shared[cuda::kThreadsPerBlock];
    cuda::write_block_loss_sums(thread_loss, thread_denom, shared, loss, denom);
  }
}

template <typename scalar_t, typename label_t, typename acc_t, typename index_t>
__global__ void backward_kernel(CeLayout L, index_t images, index_t spatial, const scalar_t* __restrict__ logits,
                                const label_t* __restrict__ target, const acc_t* __restrict__ lse_max,
                                const acc_t* __restrict__ lse_log_sum, const acc_t* __restrict__ grad_loss,
                                int64_t gn, int64_t gs,
                                const acc_t* __restrict__ weight, int64_t ignore_index, acc_t smoothing,
                                scalar_t* __restrict__ grad, int64_t dn, int64_t dc, int64_t ds) {
  const CeConfig<acc_t> cfg = make_ce_config(weight, L.c, ignore_index, smoothing);
  const index_t groups = (spatial + kPixelsPerBlock - 1) / kPixelsPerBlock;
  FCN_BLOCK_STRIDE_LOOP(index_t, n, images, z) {
    FCN_BLOCK_STRIDE_LOOP(index_t, group, groups, x) {
      const index_t first = group * kPixelsPerBlock + static_cast<index_t>(threadIdx.x);
      const scalar_t* z[kPixelsPerThread];
      scalar_t* out[kPixelsPerThread];
      int64_t t[kPixelsPerThread];
      CeGradCoef<acc_t> k_coef[kPixelsPerThread];
      acc_t pixel_max[kPixelsPerThread];
      bool inside[kPixelsPerThread];
      for (int k = 0; k < kPixelsPerThread; ++k) {  // fixed bounds (and no break): the arrays stay in registers
        const index_t p = first + k * cuda::kThreadsPerBlock;
        inside[k] = p < spatial;
        if (!inside[k]) continue;
        t[k] = static_cast<int64_t>(target[n * L.target_n + p * L.target_s]);
        // p_c = exp(z_c - max) e^-L, the e^-L folded into the coefficients once per pixel.
        k_coef[k] = ce_grad_coef(cfg, t[k], grad_loss[n * gn + p * gs], lse_log_sum[n * spatial + p]);
        pixel_max[k] = lse_max[n * spatial + p];
        z[k] = logits + n * L.logit_n + p * L.logit_s;
        out[k] = grad + n * dn + p * ds;
      }
      for (int64_t c = 0; c < L.c; ++c) {
        const acc_t class_weight = ce_class_weight(cfg, c);
        for (int k = 0; k < kPixelsPerThread; ++k) {
          if (!inside[k]) continue;
          const acc_t e = ce_exp(static_cast<acc_t>(z[k][c * L.logit_c]) - pixel_max[k]);
          out[k][c * dc] = static_cast<scalar_t>(k_coef[k].grad(e, c == t[k], class_weight));
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy_fwd_cuda(const at::Tensor& logits,
                                                                             const at::Tensor& target,
                                                                             const c10::optional<at::Tensor>& weight,
                                                                             int64_t ignore_index, double smoothing,
                                                                             bool per_pixel) {
  check_ce_kernel_args(logits, target, weight, cuda::kDeviceType);
  const cuda::DeviceGuard guard(logits.device());
  const CeLayout L = ce_layout(logits, target);
  const dim3 grid = ce_grid(L);
  at::Tensor loss, denom, lse;  // not a structured binding: the dispatch lambdas capture them
  const int64_t pixel_shape[] = {logits.size(0), logits.size(2)};
  const int64_t blocks[] = {cuda::block_count(grid)};  // one partial sum each
  std::tie(loss, denom, lse) = ce_pixel_outputs(pixel_shape, per_pixel ? at::IntArrayRef(pixel_shape) : blocks, logits);
  if (lse.numel() == 0) {
    if (!per_pixel) {
      loss.zero_();
      denom.zero_();
    }
    return {loss, denom, lse};
  }
  const int64_t pixels = L.n * L.s;
  const cuda::Stream stream = cuda::current_stream();
  FCN_DISPATCH_FLOATING(logits.scalar_type(), "softmax_cross_entropy_fwd_cuda", [&] {
    using logit_t = scalar_t;  // the nested dispatch below rebinds scalar_t to the label type
    using acc = acc_t<logit_t>;
    const acc* w = weight.has_value() ? weight->data_ptr<acc>() : nullptr;
    acc* lse_max = lse.data_ptr<acc>();
    AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "softmax_cross_entropy_fwd_cuda_target", [&] {
      using label_t = scalar_t;
      cuda::with_index_type({pixels}, [&](auto index_zero) {
        using index_t = decltype(index_zero);
        cuda::launch_grid(forward_kernel<logit_t, label_t, acc, index_t>, grid, stream, L,
                          static_cast<index_t>(L.n), static_cast<index_t>(L.s), logits.data_ptr<logit_t>(),
                          target.data_ptr<label_t>(), w, ignore_index, static_cast<acc>(smoothing), per_pixel,
                          loss.data_ptr<acc>(), denom.data_ptr<acc>(), lse_max, lse_max + pixels);
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
    const acc* lse_max = lse.data_ptr<acc>();
    AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "softmax_cross_entropy_bwd_cuda_target", [&] {
      using label_t = scalar_t;
      cuda::with_index_type({pixels}, [&](auto index_zero) {
        using index_t = decltype(index_zero);
        cuda::launch_grid(backward_kernel<logit_t, label_t, acc, index_t>, ce_grid(L), stream, L,
                          static_cast<index_t>(L.n), static_cast<index_t>(L.s), logits.data_ptr<logit_t>(),
                          target.data_ptr<label_t>(), lse_max, lse_max + pixels, grad_loss.data_ptr<acc>(),
                          grad_loss.stride(0), grad_loss.stride(1), w, ignore_index, static_cast<acc>(smoothing),
                          grad.data_ptr<logit_t>(), grad.stride(0), grad.stride(1), grad.stride(2));
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

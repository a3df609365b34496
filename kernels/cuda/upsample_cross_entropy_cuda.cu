// upsample_cross_entropy and upsample_argmax on CUDA.
//
// Forward / argmax: one thread per output pixel interpolates its C logits from the 2x2 coarse taps of each class
// plane (sample_plane, bilinear.h; the coarse map is small and stays in L2) and streams them through the shared
// per-pixel cross-entropy (ce_pixel_stats, softmax_ce.h) or argmax. Backward: one thread per coarse element (n, c,
// iy, ix) gathers the output pixels in its readers window, recomputing each one's logit z_c from the coarse map and
// its softmax from the saved softmax statistics: grad_coarse is written once per element, no atomics, deterministic.
// Launch policy and index width: cuda_launch.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "fcn_fast/bilinear.h"
#include "fcn_fast/common.h"
#include "fcn_fast/cross_entropy_host.h"
#include "fcn_fast/cuda_launch.h"
#include "fcn_fast/softmax_ce.h"
#include "fcn_fast/upsample_ce.h"

namespace fcn_fast {
namespace {

// The logit of class plane `plane` at output (oy, ox), rounded to scalar_t as upsample_add returns it.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t upsampled_logit(const scalar_t* plane, const UpsampleTaps<acc_t>& taps, int64_t oy,
                                                 int64_t ox) {
  const acc_t v = sample_plane<scalar_t, acc_t>(plane, taps.in_h, taps.in_w, taps.row_index, taps.row_weight,
                                                taps.col_index, taps.col_weight, oy, ox);
  return static_cast<acc_t>(static_cast<scalar_t>(v));
}

// The sum of `value` over the block's threads, in thread 0: a fixed tree, so the same on every run.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t value, acc_t* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = cuda::kThreadsPerBlock / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  return shared[0];
}

// per_pixel: loss and denom are per pixel; otherwise each block writes its sums to loss[blockIdx.x] and
// denom[blockIdx.x] (a reduced loss then needs no per-pixel buffers). lse_max, lse_log_sum: the two planes of the
// softmax statistics (softmax_ce.h). Launched with cuda::kThreadsPerBlock threads a block.
template <typename scalar_t, typename label_t, typename index_t>
__global__ void forward_kernel(const scalar_t* __restrict__ coarse, const label_t* __restrict__ target,
                               const acc_t<scalar_t>* __restrict__ class_weight, UpsampleTaps<acc_t<scalar_t>> taps,
                               int64_t num_classes, int64_t ignore_index, acc_t<scalar_t> smoothing, index_t pixels,
                               bool per_pixel, acc_t<scalar_t>* __restrict__ loss, acc_t<scalar_t>* __restrict__ denom,
                               acc_t<scalar_t>* __restrict__ lse_max, acc_t<scalar_t>* __restrict__ lse_log_sum) {
  using acc = acc_t<scalar_t>;
  const CeConfig<acc> cfg = make_ce_config<acc>(class_weight, num_classes, ignore_index, smoothing);
  const index_t plane_size = static_cast<index_t>(taps.in_h * taps.in_w);
  const index_t out_hw = static_cast<index_t>(taps.out_h * taps.out_w);
  acc thread_loss = 0, thread_denom = 0;
  FCN_GRID_STRIDE_LOOP(index_t, p, pixels) {
    const index_t n = p / out_hw, rem = p - n * out_hw;
    const index_t oy = rem / static_cast<index_t>(taps.out_w), ox = rem - oy * static_cast<index_t>(taps.out_w);
    const int64_t t = static_cast<int64_t>(target[p]);
    const scalar_t* planes = coarse + n * static_cast<index_t>(num_classes) * plane_size;
    const CePixelStats<acc> stats = ce_pixel_stats(cfg, t, [&](int64_t c) {
      return upsampled_logit(planes + static_cast<index_t>(c) * plane_size, taps, oy, ox);
    });
    acc pixel_loss, pixel_denom;
    ce_pixel_loss(cfg, t, stats, &pixel_loss, &pixel_denom);
    if (per_pixel) {
      loss[p] = pixel_loss;
      denom[p] = pixel_denom;
    } else {
      thread_loss += pixel_loss;
      thread_denom += pixel_denom;
    }
    lse_max[p] = stats.max;
    lse_log_sum[p] = stats.log_sum;
  }
  if (!per_pixel) {  // uniform across the grid, so every thread reaches the barriers
    __shared__ acc shared[cuda::kThreadsPerBlock];
    const acc block_loss = block_sum(thread_loss, shared);
    __syncthreads();  // thread 0 has read shared[0] before it is overwritten
    const acc block_denom = block_sum(thread_denom, shared);
    if (threadIdx.x == 0) {
      loss[blockIdx.x] = block_loss;
      denom[blockIdx.x] = block_denom;
    }
  }
}

template <typename scalar_t, typename label_t, typename index_t>
__global__ void backward_kernel(const acc_t<scalar_t>* __restrict__ grad_pixel, bool per_pixel,
                                const scalar_t* __restrict__ coarse, const label_t* __restrict__ target,
                                const acc_t<scalar_t>* __restrict__ class_weight,
                                const acc_t<scalar_t>* __restrict__ lse_max,
                                const acc_t<scalar_t>* __restrict__ lse_log_sum, UpsampleTaps<acc_t<scalar_t>> taps,
                                const int32_t* __restrict__ row_readers, const int32_t* __restrict__ col_readers,
                                int64_t num_classes, int64_t ignore_index, acc_t<scalar_t> smoothing,
                                index_t elements, scalar_t* __restrict__ grad_coarse) {
  using acc = acc_t<scalar_t>;
  const CeConfig<acc> cfg = make_ce_config<acc>(class_weight, num_classes, ignore_index, smoothing);
  const index_t in_w = static_cast<index_t>(taps.in_w), out_w = static_cast<index_t>(taps.out_w);
  const index_t plane_size = static_cast<index_t>(taps.in_h) * in_w;
  const index_t out_hw = static_cast<index_t>(taps.out_h) * out_w;
  FCN_GRID_STRIDE_LOOP(index_t, e, elements) {
    const index_t plane_index = e / plane_size, rem = e - plane_index * plane_size;
    const index_t iy = rem / in_w, ix = rem - iy * in_w;
    const index_t n = plane_index / static_cast<index_t>(num_classes);
    const int64_t c = static_cast<int64_t>(plane_index - n * static_cast<index_t>(num_classes));
    const scalar_t* plane = coarse + plane_index * plane_size;
    const label_t* labels = target + n * out_hw;
    const acc* pixel_max = lse_max + n * out_hw;
    const acc* pixel_log_sum = lse_log_sum + n * out_hw;
    acc total = 0;
    const index_t oy_end = clamp_range_end(row_readers[2 * iy + 1], taps.out_h);
    const index_t ox_begin = clamp_range_end(col_readers[2 * ix], taps.out_w);
    const index_t ox_end = clamp_range_end(col_readers[2 * ix + 1], taps.out_w);
    for (index_t oy = clamp_range_end(row_readers[2 * iy], taps.out_h); oy < oy_end; ++oy) {
      // Every tap multiplied on its own, weight 0 included, as PyTorch's upsample backward does (tap_adjoint: NaN
      // for a NaN or infinite gradient).
      acc row_sum = 0;
      for (index_t ox = ox_begin; ox < ox_end; ++ox) {
        const index_t q = oy * out_w + ox;
        const acc g = per_pixel ? grad_pixel[n * out_hw + q] : grad_pixel[0];
        const acc z = upsampled_logit(plane, taps, oy, ox);
        const acc dz = ce_logit_grad(cfg, static_cast<int64_t>(labels[q]), c, z, pixel_max[q], pixel_log_sum[q], g);
        row_sum += tap_adjoint(taps.col_index, taps.col_weight, ox, ix, dz);
      }
      total += tap_adjoint(taps.row_index, taps.row_weight, oy, iy, row_sum);
    }
    grad_coarse[e] = static_cast<scalar_t>(total);
  }
}

template <typename scalar_t, typename label_t, typename index_t>
__global__ void argmax_kernel(const scalar_t* __restrict__ coarse, UpsampleTaps<acc_t<scalar_t>> taps,
                              int64_t num_classes, index_t pixels, label_t* __restrict__ labels) {
  using acc = acc_t<scalar_t>;
  const index_t plane_size = static_cast<index_t>(taps.in_h * taps.in_w);
  const index_t out_hw = static_cast<index_t>(taps.out_h * taps.out_w);
  FCN_GRID_STRIDE_LOOP(index_t, p, pixels) {
    const index_t n = p / out_hw, rem = p - n * out_hw;
    const index_t oy = rem / static_cast<index_t>(taps.out_w), ox = rem - oy * static_cast<index_t>(taps.out_w);
    const scalar_t* planes = coarse + n * static_cast<index_t>(num_classes) * plane_size;
    acc best = upsampled_logit(planes, taps, oy, ox);
    int64_t best_class = 0;
    for (int64_t c = 1; c < num_classes; ++c) {
      const acc z = upsampled_logit(planes + static_cast<index_t>(c) * plane_size, taps, oy, ox);
      if (argmax_takes(z, best)) {
        best = z;
        best_class = c;
      }
    }
    labels[p] = static_cast<label_t>(best_class);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> upsample_cross_entropy_fwd(
    const at::Tensor& coarse, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& row_index, const at::Tensor& row_weight, const at::Tensor& col_index,
    const at::Tensor& col_weight, int64_t ignore_index, double smoothing, bool per_pixel) {
  check_upsample_geometry(coarse, row_index, row_weight, col_index, col_weight);
  check_ce_arguments(coarse, target, weight, row_index, col_index);
  const cuda::DeviceGuard guard(coarse.device());
  const int64_t pixels = target.numel();
  const int64_t blocks = cuda::blocks_for(pixels);
  at::Tensor loss, denom, lse;  // not a structured binding: the dispatch lambdas capture them
  // Per pixel, or one (loss, denom) sum per block.
  std::tie(loss, denom, lse) =
      ce_pixel_outputs(target.sizes(), per_pixel ? target.sizes() : at::IntArrayRef(&blocks, 1), coarse);
  if (pixels == 0) {
    if (!per_pixel) {
      loss.zero_();
      denom.zero_();
    }
    return std::make_tuple(loss, denom, lse);
  }
  const cuda::Stream stream = cuda::current_stream();
  FCN_DISPATCH_FLOATING(coarse.scalar_type(), "upsample_cross_entropy_fwd_cuda", [&] {
    using scalar = scalar_t;
    using acc = acc_t<scalar>;
    const auto taps = make_upsample_taps<acc>(coarse, row_index, row_weight, col_index, col_weight);
    const acc* class_weight = weight ? weight->data_ptr<acc>() : nullptr;
    acc* lse_max = lse.data_ptr<acc>();
    acc* lse_log_sum = lse_max + pixels;
    AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "labels", [&] {
      using label = scalar_t;
      cuda::with_index_type({pixels, coarse.numel()}, [&](auto index_zero) {
        using index_t = decltype(index_zero);
        cuda::launch(forward_kernel<scalar, label, index_t>, blocks, stream, coarse.data_ptr<scalar>(),
                     target.data_ptr<label>(), class_weight, taps, coarse.size(1), ignore_index, acc(smoothing),
                     static_cast<index_t>(pixels), per_pixel, loss.data_ptr<acc>(), denom.data_ptr<acc>(),
                     lse_max, lse_log_sum);
      });
    });
  });
  return std::make_tuple(loss, denom, lse);
}

at::Tensor upsample_cross_entropy_bwd(const at::Tensor& grad_pixel, const at::Tensor& coarse,
                                      const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                      const at::Tensor& lse, const at::Tensor& row_index,
                                      const at::Tensor& row_weight, const at::Tensor& row_readers,
                                      const at::Tensor& col_index, const at::Tensor& col_weight,
                                      const at::Tensor& col_readers, int64_t ignore_index, double smoothing) {
  check_upsample_geometry(coarse, row_index, row_weight, col_index, col_weight, &row_readers, &col_readers);
  check_ce_arguments(coarse, target, weight, row_index, col_index);
  check_ce_backward_arguments(grad_pixel, target, lse, row_weight.scalar_type());
  const cuda::DeviceGuard guard(coarse.device());
  at::Tensor grad_coarse = at::empty_like(coarse);
  const int64_t elements = coarse.numel();
  if (elements == 0) return grad_coarse;
  const cuda::Stream stream = cuda::current_stream();
  const bool per_pixel = grad_pixel.numel() != 1;
  FCN_DISPATCH_FLOATING(coarse.scalar_type(), "upsample_cross_entropy_bwd_cuda", [&] {
    using scalar = scalar_t;
    using acc = acc_t<scalar>;
    const auto taps = make_upsample_taps<acc>(coarse, row_index, row_weight, col_index, col_weight);
    const acc* class_weight = weight ? weight->data_ptr<acc>() : nullptr;
    const acc* lse_max = lse.data_ptr<acc>();
    const acc* lse_log_sum = lse_max + target.numel();
    AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "labels", [&] {
      using label = scalar_t;
      cuda::with_index_type({elements, target.numel()}, [&](auto index_zero) {
        using index_t = decltype(index_zero);
        cuda::launch(backward_kernel<scalar, label, index_t>, cuda::blocks_for(elements), stream,
                     grad_pixel.data_ptr<acc>(), per_pixel, coarse.data_ptr<scalar>(), target.data_ptr<label>(),
                     class_weight, lse_max, lse_log_sum, taps, row_readers.data_ptr<int32_t>(),
                     col_readers.data_ptr<int32_t>(), coarse.size(1), ignore_index, acc(smoothing),
                     static_cast<index_t>(elements), grad_coarse.data_ptr<scalar>());
      });
    });
  });
  return grad_coarse;
}

at::Tensor upsample_argmax(const at::Tensor& coarse, const at::Tensor& row_index, const at::Tensor& row_weight,
                           const at::Tensor& col_index, const at::Tensor& col_weight, at::ScalarType dtype) {
  check_upsample_geometry(coarse, row_index, row_weight, col_index, col_weight);
  check_label_dtype(coarse, dtype);
  const cuda::DeviceGuard guard(coarse.device());
  at::Tensor labels = at::empty({coarse.size(0), row_index.size(0), col_index.size(0)}, coarse.options().dtype(dtype));
  const int64_t pixels = labels.numel();
  if (pixels == 0) return labels;
  const cuda::Stream stream = cuda::current_stream();
  FCN_DISPATCH_FLOATING(coarse.scalar_type(), "upsample_argmax_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const auto taps = make_upsample_taps<acc>(coarse, row_index, row_weight, col_index, col_weight);
    auto launch = [&](auto* out) {
      using label = std::remove_pointer_t<decltype(out)>;
      cuda::with_index_type({pixels, coarse.numel()}, [&](auto index_zero) {
        using index_t = decltype(index_zero);
        cuda::launch(argmax_kernel<scalar_t, label, index_t>, cuda::blocks_for(pixels), stream,
                     coarse.data_ptr<scalar_t>(), taps, coarse.size(1), static_cast<index_t>(pixels), out);
      });
    };
    if (dtype == at::kLong) {
      launch(labels.data_ptr<int64_t>());
    } else {
      launch(labels.data_ptr<uint8_t>());
    }
  });
  return labels;
}

}  // namespace

FCN_FAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("_upsample_cross_entropy_fwd", &upsample_cross_entropy_fwd);
  m.impl("_upsample_cross_entropy_bwd", &upsample_cross_entropy_bwd);
  m.impl("_upsample_argmax", &upsample_argmax);
}

}  // namespace fcn_fast

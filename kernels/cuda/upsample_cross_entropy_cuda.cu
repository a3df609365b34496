// upsample_cross_entropy and upsample_argmax on CUDA.
//
// Forward / argmax: 2-D grids (cuda::plane_grid: column tiles, output rows, images), threads along W; each thread
// loads its column taps once and its row taps once per row, then interpolates its pixel's C logits from the 2x2
// coarse taps of each class plane (sample_taps, bilinear.h; the coarse map is small and stays in L2) and streams them
// through the shared per-pixel cross-entropy (ce_pixel_stats, softmax_ce.h) or argmax. A reduced loss writes one
// (loss, denom) partial sum per block.
// Backward, separable (docs/cuda-kernels.md): a column pass computes each (output pixel, class) term of the gradient
// once, lanes along W, and folds it along W from shared memory into a buffer of (N, C, H, w) (f times smaller than
// the upsampled logits); a row pass folds that along H into grad_coarse. Every tap is multiplied on its own, weight 0
// included, as PyTorch's upsample backward does (tap_adjoint, bilinear.h: NaN for a NaN or infinite gradient). Fixed
// summation orders, no atomics: bitwise reproducible. Launch policy and index width: cuda_launch.h, cuda_block.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "fcn_fast/bilinear.h"
#include "fcn_fast/common.h"
#include "fcn_fast/cross_entropy_host.h"
#include "fcn_fast/cuda_block.h"
#include "fcn_fast/cuda_launch.h"
#include "fcn_fast/softmax_ce.h"
#include "fcn_fast/upsample_ce.h"

namespace fcn_fast {
namespace {

// A logit rounded to scalar_t as upsample_add returns it.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t rounded_logit(acc_t v) {
  return static_cast<acc_t>(static_cast<scalar_t>(v));
}

// The logit of class plane `plane` at output (oy, ox), rounded to scalar_t as upsample_add returns it.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t upsampled_logit(const scalar_t* plane, const UpsampleTaps<acc_t>& taps, int64_t oy,
                                                 int64_t ox) {
  return rounded_logit<scalar_t>(sample_plane<scalar_t, acc_t>(plane, taps.in_h, taps.in_w, taps.row_index,
                                                               taps.row_weight, taps.col_index, taps.col_weight, oy,
                                                               ox));
}

// per_pixel: loss and denom are per pixel; otherwise each block writes its sums to loss[b] and denom[b], b =
// cuda::linear_block() (a reduced loss then needs no per-pixel buffers). Grid: cuda::plane_grid(out_w, out_h, N),
// threads along W; a thread loads its column taps once, its row taps once per row. lse_max, lse_log_sum: the two
// planes of the softmax statistics (softmax_ce.h).
template <typename scalar_t, typename label_t, typename index_t>
__global__ void forward_kernel(const scalar_t* __restrict__ coarse, const label_t* __restrict__ target,
                               const acc_t<scalar_t>* __restrict__ class_weight, UpsampleTaps<acc_t<scalar_t>> taps,
                               int64_t num_classes, int64_t ignore_index, acc_t<scalar_t> smoothing, index_t images,
                               bool per_pixel, acc_t<scalar_t>* __restrict__ loss, acc_t<scalar_t>* __restrict__ denom,
                               acc_t<scalar_t>* __restrict__ lse_max, acc_t<scalar_t>* __restrict__ lse_log_sum) {
  using acc = acc_t<scalar_t>;
  const CeConfig<acc> cfg = make_ce_config<acc>(class_weight, num_classes, ignore_index, smoothing);
  const index_t plane_size = static_cast<index_t>(taps.in_h * taps.in_w);
  const index_t out_h = static_cast<index_t>(taps.out_h), out_w = static_cast<index_t>(taps.out_w);
  const index_t tiles = (out_w + cuda::kThreadsPerBlock - 1) / cuda::kThreadsPerBlock;
  acc thread_loss = 0, thread_denom = 0;
  FCN_BLOCK_STRIDE_LOOP(index_t, tile, tiles, x) {
    const index_t ox = tile * cuda::kThreadsPerBlock + static_cast<index_t>(threadIdx.x);
    if (ox >= out_w) continue;  // the barriers come after the loops
    PixelTaps<acc> pixel;
    load_axis_taps(taps.col_index, taps.col_weight, ox, taps.in_w, &pixel.x0, &pixel.x1, &pixel.wx0, &pixel.wx1);
    FCN_BLOCK_STRIDE_LOOP(index_t, oy, out_h, y) {
      load_axis_taps(taps.row_index, taps.row_weight, oy, taps.in_h, &pixel.y0, &pixel.y1, &pixel.wy0, &pixel.wy1);
      FCN_BLOCK_STRIDE_LOOP(index_t, n, images, z) {
        const index_t p = (n * out_h + oy) * out_w + ox;
        const int64_t t = static_cast<int64_t>(target[p]);
        const scalar_t* planes = coarse + n * static_cast<index_t>(num_classes) * plane_size;
        const CePixelStats<acc> stats = ce_pixel_stats(cfg, t, [&](int64_t c) {
          return rounded_logit<scalar_t>(sample_taps(planes + static_cast<index_t>(c) * plane_size, taps.in_w, pixel));
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
    }
  }
  if (!per_pixel) {  // uniform across the grid, so every thread reaches the barriers
    __shared__ acc shared[cuda::kThreadsPerBlock];
    cuda::write_block_loss_sums(thread_loss, thread_denom, shared, loss, denom);
  }
}

// Backward, column pass: partial[n, c, oy, ix] = sum over the output columns ox that read input column ix of
// wx(ox, ix) * dloss/dz_c(oy, ox). A block per (image, output row, tile of input columns): lanes along W compute each
// output pixel's term of class c once into a shared-memory chunk, then each thread folds its readers range
// (cuda_block.h).
template <typename scalar_t, typename label_t, typename index_t>
__global__ void backward_columns_kernel(const acc_t<scalar_t>* __restrict__ grad_pixel, bool per_pixel,
                                        const scalar_t* __restrict__ coarse, const label_t* __restrict__ target,
                                        const acc_t<scalar_t>* __restrict__ class_weight,
                                        const acc_t<scalar_t>* __restrict__ lse_max,
                                        const acc_t<scalar_t>* __restrict__ lse_log_sum,
                                        UpsampleTaps<acc_t<scalar_t>> taps,
                                        const int32_t* __restrict__ col_readers, int64_t num_classes,
                                        int64_t ignore_index, acc_t<scalar_t> smoothing, index_t images,
                                        acc_t<scalar_t>* __restrict__ partial) {
  using acc = acc_t<scalar_t>;
  __shared__ acc terms[cuda::kPaddedChunk];
  const CeConfig<acc> cfg = make_ce_config<acc>(class_weight, num_classes, ignore_index, smoothing);
  const index_t in_w = static_cast<index_t>(taps.in_w), out_h = static_cast<index_t>(taps.out_h);
  const index_t out_w = static_cast<index_t>(taps.out_w);
  const index_t plane_size = static_cast<index_t>(taps.in_h) * in_w, out_hw = out_h * out_w;
  const index_t tiles = (in_w + cuda::kThreadsPerBlock - 1) / cuda::kThreadsPerBlock;
  const int t = static_cast<int>(threadIdx.x);
  // Block-uniform loops only: every thread reaches every barrier.
  FCN_BLOCK_STRIDE_LOOP(index_t, tile, tiles, x) {
    const index_t ix = tile * cuda::kThreadsPerBlock + t;
    const cuda::Range mine = cuda::readers_range(col_readers, ix, in_w, out_w);
    const cuda::Range window = cuda::block_window(mine);
    FCN_BLOCK_STRIDE_LOOP(index_t, oy, out_h, y) {
      FCN_BLOCK_STRIDE_LOOP(index_t, n, images, z) {
        const index_t row = n * out_hw + oy * out_w;  // this output row's first pixel
        for (int64_t c = 0; c < num_classes; ++c) {
          const index_t plane_index = n * static_cast<index_t>(num_classes) + static_cast<index_t>(c);
          const scalar_t* plane = coarse + plane_index * plane_size;
          acc total = 0;
          for (int64_t chunk = window.begin; chunk < window.end; chunk += cuda::kChunk) {
            for (int j = t; j < cuda::kChunk; j += cuda::kThreadsPerBlock) {
              const index_t ox = static_cast<index_t>(chunk + j);
              acc term = 0;
              if (ox < window.end) {
                const index_t q = row + ox;
                const acc g = per_pixel ? grad_pixel[q] : grad_pixel[0];
                term = ce_logit_grad(cfg, static_cast<int64_t>(target[q]), c, upsampled_logit(plane, taps, oy, ox),
                                     lse_max[q], lse_log_sum[q], g);
              }
              terms[cuda::padded(j)] = term;
            }
            __syncthreads();
            total = cuda::fold_chunk(total, terms, mine, chunk, taps.col_index, taps.col_weight, ix);
            __syncthreads();  // the fold has read the chunk before the next class or chunk overwrites it
          }
          if (ix < in_w) {
            partial[(plane_index * out_h + oy) * in_w + ix] = total;
          }
        }
      }
    }
  }
}

// Backward, row pass: grad_coarse[n, c, iy, ix] = sum over the output rows oy that read input row iy, in increasing
// oy, of tap_adjoint(oy, iy, partial[n, c, oy, ix]); lanes along W.
template <typename scalar_t, typename index_t>
__global__ void backward_rows_kernel(const acc_t<scalar_t>* __restrict__ partial, UpsampleTaps<acc_t<scalar_t>> taps,
                                     const int32_t* __restrict__ row_readers, index_t planes,
                                     scalar_t* __restrict__ grad_coarse) {
  using acc = acc_t<scalar_t>;
  const index_t in_h = static_cast<index_t>(taps.in_h), in_w = static_cast<index_t>(taps.in_w);
  const index_t out_h = static_cast<index_t>(taps.out_h);
  const index_t tiles = (in_w + cuda::kThreadsPerBlock - 1) / cuda::kThreadsPerBlock;
  FCN_BLOCK_STRIDE_LOOP(index_t, tile, tiles, x) {
    const index_t ix = tile * cuda::kThreadsPerBlock + static_cast<index_t>(threadIdx.x);
    if (ix >= in_w) continue;  // no barrier in this kernel
    FCN_BLOCK_STRIDE_LOOP(index_t, iy, in_h, y) {
      const cuda::Range rows = cuda::readers_range(row_readers, iy, in_h, out_h);
      FCN_BLOCK_STRIDE_LOOP(index_t, plane, planes, z) {
        const acc* column = partial + plane * out_h * in_w + ix;
        acc total = 0;
        for (int64_t oy = rows.begin; oy < rows.end; ++oy) {
          total += tap_adjoint(taps.row_index, taps.row_weight, oy, iy, column[static_cast<index_t>(oy) * in_w]);
        }
        grad_coarse[(plane * in_h + iy) * in_w + ix] = static_cast<scalar_t>(total);
      }
    }
  }
}

// Grid and taps as the forward kernel's.
template <typename scalar_t, typename label_t, typename index_t>
__global__ void argmax_kernel(const scalar_t* __restrict__ coarse, UpsampleTaps<acc_t<scalar_t>> taps,
                              int64_t num_classes, index_t images, label_t* __restrict__ labels) {
  using acc = acc_t<scalar_t>;
  const index_t plane_size = static_cast<index_t>(taps.in_h * taps.in_w);
  const index_t out_h = static_cast<index_t>(taps.out_h), out_w = static_cast<index_t>(taps.out_w);
  const index_t tiles = (out_w + cuda::kThreadsPerBlock - 1) / cuda::kThreadsPerBlock;
  FCN_BLOCK_STRIDE_LOOP(index_t, tile, tiles, x) {
    const index_t ox = tile * cuda::kThreadsPerBlock + static_cast<index_t>(threadIdx.x);
    if (ox >= out_w) continue;  // no barrier in this kernel
    PixelTaps<acc> pixel;
    load_axis_taps(taps.col_index, taps.col_weight, ox, taps.in_w, &pixel.x0, &pixel.x1, &pixel.wx0, &pixel.wx1);
    FCN_BLOCK_STRIDE_LOOP(index_t, oy, out_h, y) {
      load_axis_taps(taps.row_index, taps.row_weight, oy, taps.in_h, &pixel.y0, &pixel.y1, &pixel.wy0, &pixel.wy1);
      FCN_BLOCK_STRIDE_LOOP(index_t, n, images, z) {
        const scalar_t* planes = coarse + n * static_cast<index_t>(num_classes) * plane_size;
        acc best = rounded_logit<scalar_t>(sample_taps(planes, taps.in_w, pixel));
        int64_t best_class = 0;
        for (int64_t c = 1; c < num_classes; ++c) {
          const acc z = rounded_logit<scalar_t>(sample_taps(planes + static_cast<index_t>(c) * plane_size, taps.in_w,
                                                            pixel));
          if (argmax_takes(z, best)) {
            best = z;
            best_class = c;
          }
        }
        labels[(n * out_h + oy) * out_w + ox] = static_cast<label_t>(best_class);
      }
    }
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
  const dim3 grid = cuda::plane_grid(target.size(2), target.size(1), target.size(0));
  const int64_t blocks = cuda::block_count(grid);
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
        cuda::launch_grid(forward_kernel<scalar, label, index_t>, grid, stream, coarse.data_ptr<scalar>(),
                          target.data_ptr<label>(), class_weight, taps, coarse.size(1), ignore_index, acc(smoothing),
                          static_cast<index_t>(target.size(0)), per_pixel, loss.data_ptr<acc>(), denom.data_ptr<acc>(),
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
  // The column pass's output: f times smaller than the upsampled logits, which are never stored.
  const at::Tensor partial = at::empty({coarse.size(0), coarse.size(1), row_index.size(0), coarse.size(3)},
                                       coarse.options().dtype(acc_scalar_type(coarse.scalar_type())));
  FCN_DISPATCH_FLOATING(coarse.scalar_type(), "upsample_cross_entropy_bwd_cuda", [&] {
    using scalar = scalar_t;
    using acc = acc_t<scalar>;
    const auto taps = make_upsample_taps<acc>(coarse, row_index, row_weight, col_index, col_weight);
    const acc* class_weight = weight ? weight->data_ptr<acc>() : nullptr;
    const acc* lse_max = lse.data_ptr<acc>();
    const acc* lse_log_sum = lse_max + target.numel();
    AT_DISPATCH_INTEGRAL_TYPES(target.scalar_type(), "labels", [&] {
      using label = scalar_t;
      cuda::with_index_type({elements, target.numel(), partial.numel()}, [&](auto index_zero) {
        using index_t = decltype(index_zero);
        const int64_t images = coarse.size(0), out_h = row_index.size(0), in_w = coarse.size(3);
        cuda::launch_grid(backward_columns_kernel<scalar, label, index_t>,
                          cuda::plane_grid(in_w, out_h, images), stream, grad_pixel.data_ptr<acc>(), per_pixel,
                          coarse.data_ptr<scalar>(), target.data_ptr<label>(), class_weight, lse_max, lse_log_sum,
                          taps, col_readers.data_ptr<int32_t>(), coarse.size(1), ignore_index, acc(smoothing),
                          static_cast<index_t>(images), partial.data_ptr<acc>());
        cuda::launch_grid(backward_rows_kernel<scalar, index_t>,
                          cuda::plane_grid(in_w, coarse.size(2), images * coarse.size(1)), stream,
                          partial.data_ptr<acc>(), taps, row_readers.data_ptr<int32_t>(),
                          static_cast<index_t>(images * coarse.size(1)), grad_coarse.data_ptr<scalar>());
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
        cuda::launch_grid(argmax_kernel<scalar_t, label, index_t>,
                          cuda::plane_grid(labels.size(2), labels.size(1), labels.size(0)), stream,
                          coarse.data_ptr<scalar_t>(), taps, coarse.size(1), static_cast<index_t>(labels.size(0)),
                          out);
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

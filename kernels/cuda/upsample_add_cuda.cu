// upsample_add on CUDA: out = bilinear(x) (tap tables, see bilinear.h) + skip_scale * crop(skip), and its backward.
//
// Forward and grad_skip: 2-D grids, blockIdx.x over tiles of kThreadsPerBlock columns (threads along W: coalesced
// stores and skip loads), blockIdx.y over rows, blockIdx.z over planes, each a block-stride loop: no division per
// element, the column taps of a thread loaded once for all its rows, the row taps once per row.
// grad_x: a block per (plane, input row, tile of input columns) sums the output rows that read its row into a
// shared-memory row, lanes along W, then folds the columns from shared memory (cuda_block.h): coalesced, no atomics,
// a fixed summation order, bitwise reproducible. Each tap's share is added on its own, weight 0 included
// (tap_adjoint): an infinite or NaN gradient reaches the inputs as PyTorch's adjoint sends it. docs/cuda-kernels.md
// counts the bytes and instructions. The tap tables come from fcn_fast/ops/_resample.py; their shapes and dtypes are
// checked here, their values are clamped where read (bilinear.h).
#include <torch/library.h>

#include <tuple>

#include "fcn_fast/bilinear.h"
#include "fcn_fast/cuda_block.h"
#include "fcn_fast/cuda_launch.h"
#include "fcn_fast/upsample_add.h"

namespace fcn_fast {
namespace {

template <typename scalar_t, typename acc, typename index_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ skip,
                               scalar_t* __restrict__ out, const int32_t* __restrict__ row_index,
                               const acc* __restrict__ row_weight, const int32_t* __restrict__ col_index,
                               const acc* __restrict__ col_weight, index_t planes, index_t in_h, index_t in_w,
                               index_t out_h, index_t out_w, index_t skip_h, index_t skip_w, index_t skip_y,
                               index_t skip_x, acc scale) {
  const index_t tiles = (out_w + cuda::kThreadsPerBlock - 1) / cuda::kThreadsPerBlock;
  FCN_BLOCK_STRIDE_LOOP(index_t, tile, tiles, x) {
    const index_t ox = tile * cuda::kThreadsPerBlock + static_cast<index_t>(threadIdx.x);
    if (ox >= out_w) continue;  // no barrier in this kernel
    PixelTaps<acc> taps;
    load_axis_taps(col_index, col_weight, ox, in_w, &taps.x0, &taps.x1, &taps.wx0, &taps.wx1);
    FCN_BLOCK_STRIDE_LOOP(index_t, oy, out_h, y) {
      load_axis_taps(row_index, row_weight, oy, in_h, &taps.y0, &taps.y1, &taps.wy0, &taps.wy1);
      FCN_BLOCK_STRIDE_LOOP(index_t, plane, planes, z) {
        acc value = sample_taps(x + plane * in_h * in_w, in_w, taps);
        if (skip != nullptr) {
          value += scale * static_cast<acc>(skip[(plane * skip_h + skip_y + oy) * skip_w + skip_x + ox]);
        }
        out[(plane * out_h + oy) * out_w + ox] = static_cast<scalar_t>(value);
      }
    }
  }
}

// Output columns per thread in the row pass: kChunk / kThreadsPerBlock independent loads in flight per output row.
constexpr int kColumnsPerThread = cuda::kChunk / cuda::kThreadsPerBlock;

template <typename scalar_t, typename acc, typename index_t>
__global__ void grad_x_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_x,
                              const int32_t* __restrict__ row_index, const acc* __restrict__ row_weight,
                              const int32_t* __restrict__ row_readers, const int32_t* __restrict__ col_index,
                              const acc* __restrict__ col_weight, const int32_t* __restrict__ col_readers,
                              index_t planes, index_t in_h, index_t in_w, index_t out_h, index_t out_w) {
  __shared__ acc row_sum[cuda::kPaddedChunk];
  const index_t tiles = (in_w + cuda::kThreadsPerBlock - 1) / cuda::kThreadsPerBlock;
  const int t = static_cast<int>(threadIdx.x);
  // Block-uniform loops only: every thread reaches every barrier.
  FCN_BLOCK_STRIDE_LOOP(index_t, tile, tiles, x) {
    const index_t ix = tile * cuda::kThreadsPerBlock + t;
    const cuda::Range mine = cuda::readers_range(col_readers, ix, in_w, out_w);
    const cuda::Range window = cuda::block_window(mine);
    FCN_BLOCK_STRIDE_LOOP(index_t, iy, in_h, y) {
      const cuda::Range rows = cuda::readers_range(row_readers, iy, in_h, out_h);
      FCN_BLOCK_STRIDE_LOOP(index_t, plane, planes, z) {
        const scalar_t* g = grad + plane * out_h * out_w;
        acc total = 0;
        for (int64_t chunk = window.begin; chunk < window.end; chunk += cuda::kChunk) {
          // Row pass: the output rows that read row iy, weighted, summed in increasing oy; lanes along W.
          acc sums[kColumnsPerThread];
          for (int j = 0; j < kColumnsPerThread; ++j) sums[j] = 0;
          for (int64_t oy = rows.begin; oy < rows.end; ++oy) {
            const scalar_t* g_row = g + static_cast<index_t>(oy) * out_w;
            for (int j = 0; j < kColumnsPerThread; ++j) {
              const int64_t ox = chunk + t + j * cuda::kThreadsPerBlock;
              if (ox < window.end) sums[j] += tap_adjoint(row_index, row_weight, oy, iy, static_cast<acc>(g_row[ox]));
            }
          }
          for (int j = 0; j < kColumnsPerThread; ++j) row_sum[cuda::padded(t + j * cuda::kThreadsPerBlock)] = sums[j];
          __syncthreads();
          total = cuda::fold_chunk(total, row_sum, mine, chunk, col_index, col_weight, ix);
          __syncthreads();  // the fold has read the chunk before the next row pass overwrites it
        }
        if (ix < in_w) grad_x[(plane * in_h + iy) * in_w + ix] = static_cast<scalar_t>(total);
      }
    }
  }
}

template <typename scalar_t, typename acc, typename index_t>
__global__ void grad_skip_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_skip, index_t planes,
                                 index_t out_h, index_t out_w, index_t skip_h, index_t skip_w, index_t skip_y,
                                 index_t skip_x, acc scale) {
  const index_t tiles = (skip_w + cuda::kThreadsPerBlock - 1) / cuda::kThreadsPerBlock;
  FCN_BLOCK_STRIDE_LOOP(index_t, tile, tiles, x) {
    const index_t sx = tile * cuda::kThreadsPerBlock + static_cast<index_t>(threadIdx.x);
    if (sx >= skip_w) continue;  // no barrier in this kernel
    // Signed offsets: index_t is signed, so a position left of or above the crop compares below 0.
    const index_t ox = sx - skip_x;
    const bool column_inside = ox >= 0 && ox < out_w;
    FCN_BLOCK_STRIDE_LOOP(index_t, sy, skip_h, y) {
      const index_t oy = sy - skip_y;
      const bool inside = column_inside && oy >= 0 && oy < out_h;
      FCN_BLOCK_STRIDE_LOOP(index_t, plane, planes, z) {
        acc value = 0;
        if (inside) value = scale * static_cast<acc>(grad[(plane * out_h + oy) * out_w + ox]);
        grad_skip[(plane * skip_h + sy) * skip_w + sx] = static_cast<scalar_t>(value);
      }
    }
  }
}

at::Tensor upsample_add_fwd_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& skip_in,
                                 const at::Tensor& row_index, const at::Tensor& row_weight,
                                 const at::Tensor& col_index, const at::Tensor& col_weight, int64_t skip_y,
                                 int64_t skip_x, double skip_scale) {
  const cuda::DeviceGuard guard(x_in.device());
  // Named tensors, not a structured binding: lambdas below capture them (C++17 cannot capture bindings).
  at::Tensor x, skip, out;
  std::tie(x, skip, out) =
      prepare_upsample_add_forward(x_in, skip_in, row_index, row_weight, col_index, col_weight, skip_y, skip_x);
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  const int64_t out_h = out.size(2), out_w = out.size(3);
  const int64_t skip_h = skip.defined() ? skip.size(2) : 0, skip_w = skip.defined() ? skip.size(3) : 0;
  const int64_t planes = out.size(0) * out.size(1);
  const cuda::Stream stream = cuda::current_stream();
  FCN_DISPATCH_FLOATING(x.scalar_type(), "upsample_add_fwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* skip_data = skip.defined() ? skip.data_ptr<scalar_t>() : nullptr;
    cuda::with_index_type({numel, x.numel(), skip.defined() ? skip.numel() : 0}, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      cuda::launch_grid(forward_kernel<scalar_t, acc, index_t>, cuda::plane_grid(out_w, out_h, planes), stream,
          x.data_ptr<scalar_t>(), skip_data, out.data_ptr<scalar_t>(), row_index.data_ptr<int32_t>(),
          row_weight.data_ptr<acc>(), col_index.data_ptr<int32_t>(), col_weight.data_ptr<acc>(),
          static_cast<index_t>(planes), static_cast<index_t>(x.size(2)), static_cast<index_t>(x.size(3)),
          static_cast<index_t>(out_h), static_cast<index_t>(out_w), static_cast<index_t>(skip_h),
          static_cast<index_t>(skip_w), static_cast<index_t>(skip_y), static_cast<index_t>(skip_x),
          static_cast<acc>(skip_scale));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> upsample_add_bwd_cuda(
    const at::Tensor& grad_in, const at::Tensor& row_index, const at::Tensor& row_weight, const at::Tensor& row_readers,
    const at::Tensor& col_index, const at::Tensor& col_weight, const at::Tensor& col_readers, int64_t in_h,
    int64_t in_w, int64_t skip_h, int64_t skip_w, int64_t skip_y, int64_t skip_x, double skip_scale, bool need_x,
    bool need_skip) {
  const cuda::DeviceGuard guard(grad_in.device());
  at::Tensor grad, grad_x, grad_skip;
  std::tie(grad, grad_x, grad_skip) =
      prepare_upsample_add_backward(grad_in, row_index, row_weight, row_readers, col_index, col_weight, col_readers,
                                    in_h, in_w, skip_h, skip_w, skip_y, skip_x, need_x, need_skip);
  if (grad.numel() == 0) {
    grad_x.zero_();
    grad_skip.zero_();
    return {grad_x, grad_skip};
  }
  const int64_t out_h = grad.size(2), out_w = grad.size(3);
  const int64_t planes = grad.size(0) * grad.size(1);
  const cuda::Stream stream = cuda::current_stream();
  FCN_DISPATCH_FLOATING(grad.scalar_type(), "upsample_add_bwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    cuda::with_index_type({grad.numel(), grad_x.numel(), grad_skip.numel()}, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      if (grad_x.numel() > 0) {
        cuda::launch_grid(grad_x_kernel<scalar_t, acc, index_t>, cuda::plane_grid(in_w, in_h, planes), stream,
            grad.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), row_index.data_ptr<int32_t>(),
            row_weight.data_ptr<acc>(), row_readers.data_ptr<int32_t>(), col_index.data_ptr<int32_t>(),
            col_weight.data_ptr<acc>(), col_readers.data_ptr<int32_t>(), static_cast<index_t>(planes),
            static_cast<index_t>(in_h), static_cast<index_t>(in_w), static_cast<index_t>(out_h),
            static_cast<index_t>(out_w));
      }
      if (grad_skip.numel() > 0) {
        cuda::launch_grid(grad_skip_kernel<scalar_t, acc, index_t>, cuda::plane_grid(skip_w, skip_h, planes), stream,
            grad.data_ptr<scalar_t>(), grad_skip.data_ptr<scalar_t>(), static_cast<index_t>(planes),
            static_cast<index_t>(out_h), static_cast<index_t>(out_w), static_cast<index_t>(skip_h),
            static_cast<index_t>(skip_w), static_cast<index_t>(skip_y), static_cast<index_t>(skip_x),
            static_cast<acc>(skip_scale));
      }
    });
  });
  return {grad_x, grad_skip};
}

}  // namespace

FCN_FAST_CUDA_LIBRARY_IMPL(m) {
  m.impl("_upsample_add_fwd", &upsample_add_fwd_cuda);
  m.impl("_upsample_add_bwd", &upsample_add_bwd_cuda);
}

}  // namespace fcn_fast

// upsample_add on CUDA: out = bilinear(x) (tap tables, see bilinear.h) + skip_scale * crop(skip), and its backward.
//
// One thread per output element, consecutive threads along W, so the stores and the skip loads coalesce and the
// 2x2 input taps of a warp fall in a few cache lines. The backward pass is a gather with one thread per input
// element (grad_x: the sum over its readers ranges, in a fixed order, so no atomics and a bitwise reproducible
// result) and one per skip element (grad_skip: the scaled, padded copy). Launch policy and index width:
// cuda_launch.h. The tap tables come from fcn_fast/ops/_resample.py; their shapes and dtypes are checked here, their
// values are clamped where read (bilinear.h).
#include <torch/library.h>

#include <tuple>

#include "fcn_fast/bilinear.h"
#include "fcn_fast/cuda_launch.h"
#include "fcn_fast/upsample_add.h"

namespace fcn_fast {
namespace {

template <typename scalar_t, typename acc, typename index_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ skip,
                               scalar_t* __restrict__ out, const int32_t* __restrict__ row_index,
                               const acc* __restrict__ row_weight, const int32_t* __restrict__ col_index,
                               const acc* __restrict__ col_weight, index_t numel, index_t in_h, index_t in_w,
                               index_t out_h, index_t out_w, index_t skip_h, index_t skip_w, index_t skip_y,
                               index_t skip_x, acc scale) {
  FCN_GRID_STRIDE_LOOP(index_t, i, numel) {
    const index_t ox = i % out_w;
    const index_t row = i / out_w;
    const index_t oy = row % out_h;
    const index_t plane = row / out_h;
    acc value = sample_plane<scalar_t, acc>(x + plane * in_h * in_w, in_h, in_w, row_index, row_weight, col_index,
                                            col_weight, oy, ox);
    if (skip != nullptr) {
      value += scale * static_cast<acc>(skip[(plane * skip_h + skip_y + oy) * skip_w + skip_x + ox]);
    }
    out[i] = static_cast<scalar_t>(value);
  }
}

template <typename scalar_t, typename acc, typename index_t>
__global__ void grad_x_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_x,
                              const int32_t* __restrict__ row_index, const acc* __restrict__ row_weight,
                              const int32_t* __restrict__ row_readers, const int32_t* __restrict__ col_index,
                              const acc* __restrict__ col_weight, const int32_t* __restrict__ col_readers,
                              index_t numel, index_t in_h, index_t in_w, index_t out_h, index_t out_w) {
  FCN_GRID_STRIDE_LOOP(index_t, i, numel) {
    const index_t ix = i % in_w;
    const index_t row = i / in_w;
    const index_t iy = row % in_h;
    const index_t plane = row / in_h;
    const scalar_t* g = grad + plane * out_h * out_w;
    const index_t oy_begin = clamp_range_end(row_readers[2 * iy], out_h);
    const index_t oy_end = clamp_range_end(row_readers[2 * iy + 1], out_h);
    const index_t ox_begin = clamp_range_end(col_readers[2 * ix], out_w);
    const index_t ox_end = clamp_range_end(col_readers[2 * ix + 1], out_w);
    acc total = 0;
    for (index_t oy = oy_begin; oy < oy_end; ++oy) {
      const scalar_t* g_row = g + oy * out_w;
      acc row_sum = 0;
      for (index_t ox = ox_begin; ox < ox_end; ++ox) {
        row_sum += tap_adjoint(col_index, col_weight, ox, ix, static_cast<acc>(g_row[ox]));
      }
      total += tap_adjoint(row_index, row_weight, oy, iy, row_sum);
    }
    grad_x[i] = static_cast<scalar_t>(total);
  }
}

template <typename scalar_t, typename acc, typename index_t>
__global__ void grad_skip_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_skip, index_t numel,
                                 index_t out_h, index_t out_w, index_t skip_h, index_t skip_w, index_t skip_y,
                                 index_t skip_x, acc scale) {
  FCN_GRID_STRIDE_LOOP(index_t, i, numel) {
    const index_t sx = i % skip_w;
    const index_t row = i / skip_w;
    const index_t sy = row % skip_h;
    const index_t plane = row / skip_h;
    // Signed offsets: index_t is signed, so a position left of or above the crop compares below 0.
    const index_t oy = sy - skip_y, ox = sx - skip_x;
    acc value = 0;
    if (oy >= 0 && oy < out_h && ox >= 0 && ox < out_w) {
      value = scale * static_cast<acc>(grad[(plane * out_h + oy) * out_w + ox]);
    }
    grad_skip[i] = static_cast<scalar_t>(value);
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
  const cuda::Stream stream = cuda::current_stream();
  FCN_DISPATCH_FLOATING(x.scalar_type(), "upsample_add_fwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* skip_data = skip.defined() ? skip.data_ptr<scalar_t>() : nullptr;
    cuda::with_index_type({numel, x.numel(), skip.defined() ? skip.numel() : 0}, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      cuda::launch(forward_kernel<scalar_t, acc, index_t>, cuda::blocks_for(numel), stream,
          x.data_ptr<scalar_t>(), skip_data, out.data_ptr<scalar_t>(), row_index.data_ptr<int32_t>(),
          row_weight.data_ptr<acc>(), col_index.data_ptr<int32_t>(), col_weight.data_ptr<acc>(),
          static_cast<index_t>(numel), static_cast<index_t>(x.size(2)), static_cast<index_t>(x.size(3)),
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
  const cuda::Stream stream = cuda::current_stream();
  FCN_DISPATCH_FLOATING(grad.scalar_type(), "upsample_add_bwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    cuda::with_index_type({grad.numel(), grad_x.numel(), grad_skip.numel()}, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      if (grad_x.numel() > 0) {
        cuda::launch(grad_x_kernel<scalar_t, acc, index_t>, cuda::blocks_for(grad_x.numel()), stream,
            grad.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), row_index.data_ptr<int32_t>(),
            row_weight.data_ptr<acc>(), row_readers.data_ptr<int32_t>(), col_index.data_ptr<int32_t>(),
            col_weight.data_ptr<acc>(), col_readers.data_ptr<int32_t>(), static_cast<index_t>(grad_x.numel()),
            static_cast<index_t>(in_h), static_cast<index_t>(in_w), static_cast<index_t>(out_h),
            static_cast<index_t>(out_w));
      }
      if (grad_skip.numel() > 0) {
        cuda::launch(grad_skip_kernel<scalar_t, acc, index_t>, cuda::blocks_for(grad_skip.numel()), stream,
            grad.data_ptr<scalar_t>(), grad_skip.data_ptr<scalar_t>(), static_cast<index_t>(grad_skip.numel()),
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

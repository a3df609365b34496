// upsample_add on CUDA: out = bilinear(x) (tap tables, see bilinear.h) + skip_scale * crop(skip), and its backward.
//
// One thread per output element, consecutive threads along W, so the stores and the skip loads coalesce and the
// 2x2 input taps of a warp fall in a few cache lines. The backward pass is a gather with one thread per input
// element (grad_x: the sum over its readers ranges, in a fixed order, so no atomics and a bitwise reproducible
// result) and one per skip element (grad_skip: the scaled, padded copy). Index math runs in int32 unless a tensor
// has 2^31 elements or more. The tap tables come from fcn_fast/ops/_resample.py; their shapes and dtypes are
// checked here, their values are trusted (checking them would need a device synchronisation).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <limits>

#include "fcn_fast/bilinear.h"

namespace fcn_fast {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU several times over; larger problems loop (grid-stride).
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

int blocks_for(int64_t numel) {
  return static_cast<int>(std::min<int64_t>((numel + kThreads - 1) / kThreads, kMaxBlocks));
}

// int32 indices are safe when every index, and an index plus one grid stride, stays below 2^31.
bool fits_int32(std::initializer_list<int64_t> sizes) {
  const int64_t limit = std::numeric_limits<int32_t>::max() - kMaxBlocks * kThreads;
  for (int64_t s : sizes) {
    if (s >= limit) return false;
  }
  return true;
}

template <typename scalar_t, typename acc, typename index_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ skip,
                               scalar_t* __restrict__ out, const int32_t* __restrict__ row_index,
                               const acc* __restrict__ row_weight, const int32_t* __restrict__ col_index,
                               const acc* __restrict__ col_weight, index_t numel, index_t in_h, index_t in_w,
                               index_t out_h, index_t out_w, index_t skip_h, index_t skip_w, index_t skip_y,
                               index_t skip_x, acc scale) {
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const index_t ox = i % out_w;
    const index_t row = i / out_w;
    const index_t oy = row % out_h;
    const index_t plane = row / out_h;
    acc value = sample_plane<scalar_t, acc>(x + plane * in_h * in_w, in_w, row_index, row_weight, col_index,
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
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const index_t ix = i % in_w;
    const index_t row = i / in_w;
    const index_t iy = row % in_h;
    const index_t plane = row / in_h;
    const scalar_t* g = grad + plane * out_h * out_w;
    const index_t oy_begin = row_readers[2 * iy], oy_end = row_readers[2 * iy + 1];
    const index_t ox_begin = col_readers[2 * ix], ox_end = col_readers[2 * ix + 1];
    acc total = 0;
    for (index_t oy = oy_begin; oy < oy_end; ++oy) {
      const acc wy = tap_weight(row_index, row_weight, oy, iy);
      const scalar_t* g_row = g + oy * out_w;
      acc row_sum = 0;
      for (index_t ox = ox_begin; ox < ox_end; ++ox) {
        row_sum += tap_weight(col_index, col_weight, ox, ix) * static_cast<acc>(g_row[ox]);
      }
      total += wy * row_sum;
    }
    grad_x[i] = static_cast<scalar_t>(total);
  }
}

template <typename scalar_t, typename acc, typename index_t>
__global__ void grad_skip_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_skip, index_t numel,
                                 index_t out_h, index_t out_w, index_t skip_h, index_t skip_w, index_t skip_y,
                                 index_t skip_x, acc scale) {
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
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

void check_cuda_inputs(const at::Tensor& data, std::initializer_list<at::Tensor> tables) {
  for (const at::Tensor& t : tables) {
    TORCH_CHECK(t.device() == data.device(), "tap tables must be on ", data.device(), ", got ", t.device());
  }
}

void check_weight_dtype(const at::Tensor& weight, at::ScalarType dtype, const char* name) {
  const at::ScalarType expected = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(weight.scalar_type() == expected, name, " must be ", expected, " for ", dtype, " data, got ",
              weight.scalar_type());
}

at::Tensor upsample_add_fwd_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& skip_in,
                                 const at::Tensor& row_index, const at::Tensor& row_weight,
                                 const at::Tensor& col_index, const at::Tensor& col_weight, int64_t skip_y,
                                 int64_t skip_x, double skip_scale) {
  TORCH_CHECK(x_in.dim() == 4, "x must be 4D (N, C, h, w), got ", x_in.sizes());
  check_taps(row_index, row_weight, "row");
  check_taps(col_index, col_weight, "col");
  check_weight_dtype(row_weight, x_in.scalar_type(), "row_weight");
  check_weight_dtype(col_weight, x_in.scalar_type(), "col_weight");
  check_cuda_inputs(x_in, {row_index, row_weight, col_index, col_weight});
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t out_h = row_index.size(0), out_w = col_index.size(0);
  at::Tensor skip;
  if (skip_in.has_value()) {
    skip = skip_in->contiguous();
    TORCH_CHECK(skip.device() == x.device(), "skip must be on ", x.device(), ", got ", skip.device());
    TORCH_CHECK(skip.dim() == 4 && skip.size(0) == x.size(0) && skip.size(1) == x.size(1) &&
                    skip.scalar_type() == x.scalar_type(),
                "skip must be (N, C, Hs, Ws) with the N, C and dtype of x, got ", skip.sizes(), " for x ", x.sizes());
    TORCH_CHECK(skip_y >= 0 && skip_x >= 0 && skip_y + out_h <= skip.size(2) && skip_x + out_w <= skip.size(3),
                "skip of ", skip.sizes(), " is too small for an ", out_h, "x", out_w, " crop at (", skip_y, ", ", skip_x,
                ")");
  }
  at::Tensor out = at::empty({x.size(0), x.size(1), out_h, out_w}, x.options());
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, "x has an empty spatial size ", x.sizes());
  const int64_t skip_h = skip.defined() ? skip.size(2) : 0, skip_w = skip.defined() ? skip.size(3) : 0;
  const bool small = fits_int32({numel, x.numel(), skip.defined() ? skip.numel() : 0});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FCN_DISPATCH_FLOATING(x.scalar_type(), "upsample_add_fwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* skip_data = skip.defined() ? skip.data_ptr<scalar_t>() : nullptr;
    auto launch = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      forward_kernel<scalar_t, acc, index_t><<<blocks_for(numel), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), skip_data, out.data_ptr<scalar_t>(), row_index.data_ptr<int32_t>(),
          row_weight.data_ptr<acc>(), col_index.data_ptr<int32_t>(), col_weight.data_ptr<acc>(),
          static_cast<index_t>(numel), static_cast<index_t>(x.size(2)), static_cast<index_t>(x.size(3)),
          static_cast<index_t>(out_h), static_cast<index_t>(out_w), static_cast<index_t>(skip_h),
          static_cast<index_t>(skip_w), static_cast<index_t>(skip_y), static_cast<index_t>(skip_x),
          static_cast<acc>(skip_scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (small) {
      launch(int32_t(0));
    } else {
      launch(int64_t(0));
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> upsample_add_bwd_cuda(
    const at::Tensor& grad_in, const at::Tensor& row_index, const at::Tensor& row_weight, const at::Tensor& row_readers,
    const at::Tensor& col_index, const at::Tensor& col_weight, const at::Tensor& col_readers, int64_t in_h,
    int64_t in_w, int64_t skip_h, int64_t skip_w, int64_t skip_y, int64_t skip_x, double skip_scale, bool need_x,
    bool need_skip) {
  TORCH_CHECK(grad_in.dim() == 4, "grad_out must be 4D (N, C, H, W), got ", grad_in.sizes());
  check_taps(row_index, row_weight, "row");
  check_taps(col_index, col_weight, "col");
  check_weight_dtype(row_weight, grad_in.scalar_type(), "row_weight");
  check_weight_dtype(col_weight, grad_in.scalar_type(), "col_weight");
  check_cuda_inputs(grad_in, {row_index, row_weight, row_readers, col_index, col_weight, col_readers});
  TORCH_CHECK(row_index.size(0) == grad_in.size(2) && col_index.size(0) == grad_in.size(3), "tap tables of ",
              row_index.size(0), "x", col_index.size(0), " outputs do not match grad_out ", grad_in.sizes());
  c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = grad.size(0), c = grad.size(1), out_h = grad.size(2), out_w = grad.size(3);
  at::Tensor grad_x = at::empty({0}, grad.options()), grad_skip = at::empty({0}, grad.options());
  if (need_x) {
    TORCH_CHECK(in_h >= 1 && in_w >= 1, "in_h and in_w must be >= 1, got ", in_h, "x", in_w);
    check_readers(row_readers, in_h, "row");
    check_readers(col_readers, in_w, "col");
    grad_x = at::empty({n, c, in_h, in_w}, grad.options());
  }
  if (need_skip) {
    TORCH_CHECK(skip_y >= 0 && skip_x >= 0 && skip_y + out_h <= skip_h && skip_x + out_w <= skip_w, "skip of ",
                skip_h, "x", skip_w, " is too small for an ", out_h, "x", out_w, " crop at (", skip_y, ", ", skip_x,
                ")");
    grad_skip = at::empty({n, c, skip_h, skip_w}, grad.options());
  }
  if (grad.numel() == 0) {
    grad_x.zero_();
    grad_skip.zero_();
    return {grad_x, grad_skip};
  }
  const bool small = fits_int32({grad.numel(), grad_x.numel(), grad_skip.numel()});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FCN_DISPATCH_FLOATING(grad.scalar_type(), "upsample_add_bwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    auto launch = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      if (grad_x.numel() > 0) {
        grad_x_kernel<scalar_t, acc, index_t><<<blocks_for(grad_x.numel()), kThreads, 0, stream>>>(
            grad.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), row_index.data_ptr<int32_t>(),
            row_weight.data_ptr<acc>(), row_readers.data_ptr<int32_t>(), col_index.data_ptr<int32_t>(),
            col_weight.data_ptr<acc>(), col_readers.data_ptr<int32_t>(), static_cast<index_t>(grad_x.numel()),
            static_cast<index_t>(in_h), static_cast<index_t>(in_w), static_cast<index_t>(out_h),
            static_cast<index_t>(out_w));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (grad_skip.numel() > 0) {
        grad_skip_kernel<scalar_t, acc, index_t><<<blocks_for(grad_skip.numel()), kThreads, 0, stream>>>(
            grad.data_ptr<scalar_t>(), grad_skip.data_ptr<scalar_t>(), static_cast<index_t>(grad_skip.numel()),
            static_cast<index_t>(out_h), static_cast<index_t>(out_w), static_cast<index_t>(skip_h),
            static_cast<index_t>(skip_w), static_cast<index_t>(skip_y), static_cast<index_t>(skip_x),
            static_cast<acc>(skip_scale));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    if (small) {
      launch(int32_t(0));
    } else {
      launch(int64_t(0));
    }
  });
  return {grad_x, grad_skip};
}

}  // namespace

TORCH_LIBRARY_IMPL(fcn_fast, CUDA, m) {
  m.impl("_upsample_add_fwd", &upsample_add_fwd_cuda);
  m.impl("_upsample_add_bwd", &upsample_add_bwd_cuda);
}

}  // namespace fcn_fast

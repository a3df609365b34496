// upsample_add on the CPU: out = bilinear(x) (tap tables, see bilinear.h) + skip_scale * crop(skip), and its backward.
//
// The separable map and its adjoint are resample_cpu.h's (column pass first with a two-slot cache of resampled input
// rows; the adjoint rows first, then a gather per input column); here each output row also adds its skip row, in one
// contiguous loop. Every sum has a fixed order: the result is bitwise reproducible.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "fcn_fast/resample_cpu.h"
#include "fcn_fast/upsample_add.h"

namespace fcn_fast {
namespace {

// Elements a parallel chunk should cover at least, so thread start-up does not dominate small problems.
constexpr int64_t kMinChunkElements = 1 << 15;

int64_t grain_rows(int64_t row_elements) {
  return std::max<int64_t>(1, kMinChunkElements / std::max<int64_t>(1, row_elements));
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const scalar_t* skip, int64_t skip_h, int64_t skip_w, int64_t skip_y,
                    int64_t skip_x, double skip_scale, const at::Tensor& row_index, const at::Tensor& row_weight,
                    const at::Tensor& col_index, const at::Tensor& col_weight, at::Tensor& out) {
  using acc = acc_t<scalar_t>;
  const int64_t planes = x.size(0) * x.size(1), in_h = x.size(2), in_w = x.size(3);
  const int64_t out_h = out.size(2), out_w = out.size(3);
  const Taps<acc> rows = split_taps<acc>(row_index, row_weight, in_h, "row");
  const Taps<acc> cols = split_taps<acc>(col_index, col_weight, in_w, "col");
  const scalar_t* x_data = x.data_ptr<scalar_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();
  const acc scale = static_cast<acc>(skip_scale);

  at::parallel_for(0, planes * out_h, grain_rows(out_w), [&](int64_t begin, int64_t end) {
    std::vector<acc> buffer(2 * out_w);
    ResampledRows<scalar_t, acc> resampled(cols, in_w, in_h * in_w, 1, buffer.data());
    for (int64_t r = begin; r < end; ++r) {
      const int64_t plane = r / out_h, oy = r - plane * out_h;
      const scalar_t* x_plane = x_data + plane * in_h * in_w;
      const int64_t y0 = rows.i0[oy], y1 = rows.i1[oy];
      const acc wy0 = rows.w0[oy], wy1 = rows.w1[oy];
      const acc* h0 = resampled.row(x_plane, plane, y0, y1);
      const acc* h1 = resampled.row(x_plane, plane, y1, y0);
      scalar_t* out_row = out_data + r * out_w;
      if (skip != nullptr) {
        const scalar_t* skip_row = skip + (plane * skip_h + skip_y + oy) * skip_w + skip_x;
        for (int64_t ox = 0; ox < out_w; ++ox) {
          out_row[ox] = static_cast<scalar_t>(blend_rows(wy0, h0[ox], wy1, h1[ox]) + scale * static_cast<acc>(skip_row[ox]));
        }
      } else {
        for (int64_t ox = 0; ox < out_w; ++ox) out_row[ox] = static_cast<scalar_t>(blend_rows(wy0, h0[ox], wy1, h1[ox]));
      }
    }
  });
}

template <typename scalar_t>
void grad_x_kernel(const at::Tensor& grad, const Readers<acc_t<scalar_t>>& rows, const Readers<acc_t<scalar_t>>& cols,
                   at::Tensor& grad_x) {
  using acc = acc_t<scalar_t>;
  const int64_t planes = grad.size(0) * grad.size(1), out_h = grad.size(2), out_w = grad.size(3);
  const int64_t in_h = grad_x.size(2), in_w = grad_x.size(3);
  const scalar_t* g = grad.data_ptr<scalar_t>();
  scalar_t* gx = grad_x.data_ptr<scalar_t>();

  // One unit = one input row: about (out_h / in_h) * 2 gradient rows read for it.
  at::parallel_for(0, planes * in_h, grain_rows(out_w * std::max<int64_t>(1, out_h / std::max<int64_t>(1, in_h))),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc> column_sums(out_w);
    acc* v = column_sums.data();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t plane = r / in_h, iy = r - plane * in_h;
      const scalar_t* g_plane = g + plane * out_h * out_w;
      // Rows pass: v = sum over the output rows oy that read input row iy of weight(oy, iy) * grad[oy, :].
      const int64_t oy_begin = rows.start[iy], oy_end = rows.stop[iy];
      const acc* wy = rows.weight.data() + rows.offset[iy];
      if (oy_begin == oy_end) {
        std::fill(v, v + out_w, acc(0));
      } else {
        const scalar_t* g_row = g_plane + oy_begin * out_w;
        const acc w_first = wy[0];
        for (int64_t ox = 0; ox < out_w; ++ox) v[ox] = w_first * static_cast<acc>(g_row[ox]);
        for (int64_t oy = oy_begin + 1; oy < oy_end; ++oy) {
          const acc w = wy[oy - oy_begin];
          g_row = g_plane + oy * out_w;
          for (int64_t ox = 0; ox < out_w; ++ox) v[ox] += w * static_cast<acc>(g_row[ox]);
        }
      }
      add_zero_twin_rows(rows, iy, g_plane, out_w, v);
      fold_columns(cols, v, in_w, gx + r * in_w);
    }
  });
}

// grad_skip = skip_scale * grad inside the crop window, 0 elsewhere, written once row by row.
template <typename scalar_t>
void grad_skip_kernel(const at::Tensor& grad, int64_t skip_y, int64_t skip_x, double skip_scale, at::Tensor& grad_skip) {
  using acc = acc_t<scalar_t>;
  const int64_t planes = grad.size(0) * grad.size(1), out_h = grad.size(2), out_w = grad.size(3);
  const int64_t skip_h = grad_skip.size(2), skip_w = grad_skip.size(3);
  const scalar_t* g = grad.data_ptr<scalar_t>();
  scalar_t* gs = grad_skip.data_ptr<scalar_t>();
  const acc scale = static_cast<acc>(skip_scale);
  const scalar_t zero = static_cast<scalar_t>(0);

  at::parallel_for(0, planes * skip_h, grain_rows(skip_w), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t plane = r / skip_h, sy = r - plane * skip_h;
      scalar_t* dst = gs + r * skip_w;
      const int64_t oy = sy - skip_y;
      if (oy < 0 || oy >= out_h) {
        std::fill(dst, dst + skip_w, zero);
        continue;
      }
      std::fill(dst, dst + skip_x, zero);
      const scalar_t* src = g + (plane * out_h + oy) * out_w;
      scalar_t* inner = dst + skip_x;
      for (int64_t ox = 0; ox < out_w; ++ox) inner[ox] = static_cast<scalar_t>(scale * static_cast<acc>(src[ox]));
      std::fill(dst + skip_x + out_w, dst + skip_w, zero);
    }
  });
}

at::Tensor upsample_add_fwd_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& skip_in,
                                const at::Tensor& row_index, const at::Tensor& row_weight, const at::Tensor& col_index,
                                const at::Tensor& col_weight, int64_t skip_y, int64_t skip_x, double skip_scale) {
  // Named tensors, not a structured binding: lambdas below capture them (C++17 cannot capture bindings).
  at::Tensor x, skip, out;
  std::tie(x, skip, out) =
      prepare_upsample_add_forward(x_in, skip_in, row_index, row_weight, col_index, col_weight, skip_y, skip_x);
  if (out.numel() == 0) return out;
  FCN_DISPATCH_FLOATING(x.scalar_type(), "upsample_add_fwd_cpu", [&] {
    const scalar_t* skip_data = skip.defined() ? skip.data_ptr<scalar_t>() : nullptr;
    forward_kernel<scalar_t>(x, skip_data, skip.defined() ? skip.size(2) : 0, skip.defined() ? skip.size(3) : 0,
                             skip_y, skip_x, skip_scale, row_index, row_weight, col_index, col_weight, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> upsample_add_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& row_index, const at::Tensor& row_weight, const at::Tensor& row_readers,
    const at::Tensor& col_index, const at::Tensor& col_weight, const at::Tensor& col_readers, int64_t in_h,
    int64_t in_w, int64_t skip_h, int64_t skip_w, int64_t skip_y, int64_t skip_x, double skip_scale, bool need_x,
    bool need_skip) {
  at::Tensor grad, grad_x, grad_skip;
  std::tie(grad, grad_x, grad_skip) =
      prepare_upsample_add_backward(grad_in, row_index, row_weight, row_readers, col_index, col_weight, col_readers,
                                    in_h, in_w, skip_h, skip_w, skip_y, skip_x, need_x, need_skip);
  if (grad.numel() == 0) {
    grad_x.zero_();
    grad_skip.zero_();
    return {grad_x, grad_skip};
  }
  FCN_DISPATCH_FLOATING(grad.scalar_type(), "upsample_add_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    if (grad_x.numel() > 0) {
      const Readers<acc> rows = transpose_taps<acc>(row_index, row_weight, row_readers, in_h, "row");
      const Readers<acc> cols = transpose_taps<acc>(col_index, col_weight, col_readers, in_w, "col");
      grad_x_kernel<scalar_t>(grad, rows, cols, grad_x);
    }
    if (grad_skip.numel() > 0) grad_skip_kernel<scalar_t>(grad, skip_y, skip_x, skip_scale, grad_skip);
  });
  return {grad_x, grad_skip};
}

}  // namespace

TORCH_LIBRARY_IMPL(fcn_fast, CPU, m) {
  m.impl("_upsample_add_fwd", &upsample_add_fwd_cpu);
  m.impl("_upsample_add_bwd", &upsample_add_bwd_cpu);
}

}  // namespace fcn_fast

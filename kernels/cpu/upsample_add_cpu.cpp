// upsample_add on the CPU: out = bilinear(x) (tap tables, see bilinear.h) + skip_scale * crop(skip), and its backward.
//
// The bilinear map is separable and each output row reads only two input rows, so the forward pass first resamples
// an input row along W into an acc_t buffer ("column pass", the only gathering loop) and then blends two such
// buffers per output row with the skip row: contiguous, vectorisable loops. Input rows are used by consecutive
// output rows (the tables are monotone), so a two-slot cache computes each resampled input row once per plane.
// The backward pass runs the adjoint in the opposite order: for each input row, the weighted sum of the output
// gradient rows that read it (contiguous), then a gather over the readers range of each input column. Every sum has
// a fixed order: the result is bitwise reproducible.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fcn_fast/bilinear.h"

namespace fcn_fast {
namespace {

// Elements a parallel chunk should cover at least, so thread start-up does not dominate small problems.
constexpr int64_t kMinChunkElements = 1 << 15;

int64_t grain_rows(int64_t row_elements) {
  return std::max<int64_t>(1, kMinChunkElements / std::max<int64_t>(1, row_elements));
}

// One axis of the tap tables split into separate arrays (the interleaved (out, 2) layout defeats vectorisation).
template <typename acc_t>
struct Taps {
  std::vector<int32_t> i0, i1;
  std::vector<acc_t> w0, w1;
};

template <typename acc_t>
Taps<acc_t> split_taps(const at::Tensor& index, const at::Tensor& weight, int64_t in_size, const char* axis) {
  const int64_t n = index.size(0);
  const int32_t* idx = index.data_ptr<int32_t>();
  const acc_t* w = weight.data_ptr<acc_t>();
  Taps<acc_t> taps;
  taps.i0.resize(n);
  taps.i1.resize(n);
  taps.w0.resize(n);
  taps.w1.resize(n);
  for (int64_t o = 0; o < n; ++o) {
    TORCH_CHECK(idx[2 * o] >= 0 && idx[2 * o] < in_size && idx[2 * o + 1] >= 0 && idx[2 * o + 1] < in_size, axis,
                "_index[", o, "] = (", idx[2 * o], ", ", idx[2 * o + 1], ") is outside the input size ", in_size);
    taps.i0[o] = idx[2 * o];
    taps.i1[o] = idx[2 * o + 1];
    taps.w0[o] = w[2 * o];
    taps.w1[o] = w[2 * o + 1];
  }
  return taps;
}

// The adjoint of one axis: for input position i, the weights of the outputs [start[i], stop[i]) that read it, stored
// from weight[offset[i]] on (tap_weight of bilinear.h, so the same arithmetic as every other backend).
template <typename acc_t>
struct Readers {
  std::vector<int32_t> start, stop;
  std::vector<int64_t> offset;
  std::vector<acc_t> weight;
};

template <typename acc_t>
Readers<acc_t> transpose_taps(const at::Tensor& index, const at::Tensor& weight, const at::Tensor& readers,
                              int64_t in_size, const char* axis) {
  const int64_t out_size = index.size(0);
  const int32_t* idx = index.data_ptr<int32_t>();
  const acc_t* w = weight.data_ptr<acc_t>();
  const int32_t* rd = readers.data_ptr<int32_t>();
  Readers<acc_t> r;
  r.start.resize(in_size);
  r.stop.resize(in_size);
  r.offset.resize(in_size + 1);
  r.offset[0] = 0;
  for (int64_t i = 0; i < in_size; ++i) {
    const int32_t start = rd[2 * i], stop = rd[2 * i + 1];
    TORCH_CHECK(0 <= start && start <= stop && stop <= out_size, axis, "_readers[", i, "] = [", start, ", ", stop,
                ") is not a range inside the output size ", out_size);
    r.start[i] = start;
    r.stop[i] = stop;
    r.offset[i + 1] = r.offset[i] + (stop - start);
  }
  r.weight.resize(r.offset[in_size]);
  for (int64_t i = 0; i < in_size; ++i) {
    for (int64_t o = r.start[i]; o < r.stop[i]; ++o) r.weight[r.offset[i] + o - r.start[i]] = tap_weight(idx, w, o, i);
  }
  return r;
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
    // Two resampled input rows of the current plane, and which input row each slot holds (-1: none).
    std::vector<acc> buffer(2 * out_w);
    acc* slot_data[2] = {buffer.data(), buffer.data() + out_w};
    int64_t slot_row[2] = {-1, -1};
    int64_t current_plane = -1;
    const int32_t* cx0 = cols.i0.data();
    const int32_t* cx1 = cols.i1.data();
    const acc* cw0 = cols.w0.data();
    const acc* cw1 = cols.w1.data();

    // The resampled input row y, computed into the slot that does not hold `keep` unless it is already there.
    auto resampled = [&](const scalar_t* plane, int64_t y, int64_t keep) -> const acc* {
      if (slot_row[0] == y) return slot_data[0];
      if (slot_row[1] == y) return slot_data[1];
      const int s = slot_row[0] == keep ? 1 : 0;
      const scalar_t* in_row = plane + y * in_w;
      acc* dst = slot_data[s];
      for (int64_t ox = 0; ox < out_w; ++ox) {
        dst[ox] = cw0[ox] * static_cast<acc>(in_row[cx0[ox]]) + cw1[ox] * static_cast<acc>(in_row[cx1[ox]]);
      }
      slot_row[s] = y;
      return dst;
    };

    for (int64_t r = begin; r < end; ++r) {
      const int64_t plane = r / out_h, oy = r - plane * out_h;
      if (plane != current_plane) {
        current_plane = plane;
        slot_row[0] = slot_row[1] = -1;
      }
      const scalar_t* x_plane = x_data + plane * in_h * in_w;
      const int64_t y0 = rows.i0[oy], y1 = rows.i1[oy];
      const acc wy0 = rows.w0[oy], wy1 = rows.w1[oy];
      const acc* h0 = resampled(x_plane, y0, y1);
      const acc* h1 = resampled(x_plane, y1, y0);
      scalar_t* out_row = out_data + r * out_w;
      if (skip != nullptr) {
        const scalar_t* skip_row = skip + (plane * skip_h + skip_y + oy) * skip_w + skip_x;
        for (int64_t ox = 0; ox < out_w; ++ox) {
          out_row[ox] = static_cast<scalar_t>(wy0 * h0[ox] + wy1 * h1[ox] + scale * static_cast<acc>(skip_row[ox]));
        }
      } else {
        for (int64_t ox = 0; ox < out_w; ++ox) out_row[ox] = static_cast<scalar_t>(wy0 * h0[ox] + wy1 * h1[ox]);
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
      // Columns pass: gather the outputs of each input column's readers range.
      scalar_t* gx_row = gx + r * in_w;
      for (int64_t ix = 0; ix < in_w; ++ix) {
        const int64_t ox_begin = cols.start[ix], count = cols.stop[ix] - ox_begin;
        const acc* wx = cols.weight.data() + cols.offset[ix];
        const acc* vx = v + ox_begin;
        acc sum = 0;
        for (int64_t k = 0; k < count; ++k) sum += wx[k] * vx[k];
        gx_row[ix] = static_cast<scalar_t>(sum);
      }
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

void check_weight_dtype(const at::Tensor& weight, at::ScalarType dtype, const char* name) {
  const at::ScalarType expected = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(weight.scalar_type() == expected, name, " must be ", expected, " for ", dtype, " data, got ",
              weight.scalar_type());
}

at::Tensor upsample_add_fwd_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& skip_in,
                                const at::Tensor& row_index, const at::Tensor& row_weight, const at::Tensor& col_index,
                                const at::Tensor& col_weight, int64_t skip_y, int64_t skip_x, double skip_scale) {
  TORCH_CHECK(x_in.dim() == 4, "x must be 4D (N, C, h, w), got ", x_in.sizes());
  check_taps(row_index, row_weight, "row");
  check_taps(col_index, col_weight, "col");
  check_weight_dtype(row_weight, x_in.scalar_type(), "row_weight");
  check_weight_dtype(col_weight, x_in.scalar_type(), "col_weight");
  const at::Tensor x = x_in.contiguous();
  const int64_t out_h = row_index.size(0), out_w = col_index.size(0);
  at::Tensor skip;
  if (skip_in.has_value()) {
    skip = skip_in->contiguous();
    TORCH_CHECK(skip.dim() == 4 && skip.size(0) == x.size(0) && skip.size(1) == x.size(1) &&
                    skip.scalar_type() == x.scalar_type(),
                "skip must be (N, C, Hs, Ws) with the N, C and dtype of x, got ", skip.sizes(), " for x ", x.sizes());
    TORCH_CHECK(skip_y >= 0 && skip_x >= 0 && skip_y + out_h <= skip.size(2) && skip_x + out_w <= skip.size(3),
                "skip of ", skip.sizes(), " is too small for an ", out_h, "x", out_w, " crop at (", skip_y, ", ", skip_x,
                ")");
  }
  at::Tensor out = at::empty({x.size(0), x.size(1), out_h, out_w}, x.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, "x has an empty spatial size ", x.sizes());
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
  TORCH_CHECK(grad_in.dim() == 4, "grad_out must be 4D (N, C, H, W), got ", grad_in.sizes());
  check_taps(row_index, row_weight, "row");
  check_taps(col_index, col_weight, "col");
  check_weight_dtype(row_weight, grad_in.scalar_type(), "row_weight");
  check_weight_dtype(col_weight, grad_in.scalar_type(), "col_weight");
  TORCH_CHECK(row_index.size(0) == grad_in.size(2) && col_index.size(0) == grad_in.size(3),
              "tap tables of ", row_index.size(0), "x", col_index.size(0), " outputs do not match grad_out ",
              grad_in.sizes());
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
  FCN_DISPATCH_FLOATING(grad.scalar_type(), "upsample_add_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    if (need_x && grad_x.numel() > 0) {
      if (grad.numel() == 0) {
        grad_x.zero_();
      } else {
        const Readers<acc> rows = transpose_taps<acc>(row_index, row_weight, row_readers, in_h, "row");
        const Readers<acc> cols = transpose_taps<acc>(col_index, col_weight, col_readers, in_w, "col");
        grad_x_kernel<scalar_t>(grad, rows, cols, grad_x);
      }
    }
    if (need_skip && grad_skip.numel() > 0) grad_skip_kernel<scalar_t>(grad, skip_y, skip_x, skip_scale, grad_skip);
  });
  return {grad_x, grad_skip};
}

}  // namespace

TORCH_LIBRARY_IMPL(fcn_fast, CPU, m) {
  m.impl("_upsample_add_fwd", &upsample_add_fwd_cpu);
  m.impl("_upsample_add_bwd", &upsample_add_bwd_cpu);
}

}  // namespace fcn_fast

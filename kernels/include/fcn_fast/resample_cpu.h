// The CPU side of the tap tables (bilinear.h): the one implementation of the separable bilinear map that the CPU
// kernels of upsample_add, upsample_cross_entropy and upsample_argmax share.
//
// Forward runs the column pass first: an input row resampled along W ("column pass", the only gathering loop) is
// reused by the ~factor consecutive output rows that read it, and each output row is then a blend of two resampled
// rows (contiguous, vectorisable). Resampling every output row from scratch would gather factor times as often;
// the gathers (vgatherdps) were half of the fused loss's forward time before this (perf, 70x70 -> 500x500).
// The adjoint runs in the opposite order: rows first (contiguous multiply-adds into a per-input-row buffer), then
// one gather over the readers range of each input column. Every sum has a fixed order: bitwise reproducible.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fcn_fast/bilinear.h"
#include "fcn_fast/common.h"

namespace fcn_fast {

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
// from weight[offset[i]] on (tap_weight of bilinear.h, so the same arithmetic as every other backend), and the
// outputs among them whose weight-0 twin tap adds 0 * grad on its own (tap_zero_twin; interp mode only).
template <typename acc_t>
struct Readers {
  std::vector<int32_t> start, stop;
  std::vector<int64_t> offset;
  std::vector<acc_t> weight;
  std::vector<uint8_t> zero_twin;  // per entry, like weight
  bool any_zero_twin = false;
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
  r.zero_twin.resize(r.offset[in_size]);
  for (int64_t i = 0; i < in_size; ++i) {
    for (int64_t o = r.start[i]; o < r.stop[i]; ++o) {
      const int64_t k = r.offset[i] + o - r.start[i];
      r.weight[k] = tap_weight(idx, w, o, i);
      r.zero_twin[k] = tap_zero_twin(idx, w, o, i);
      r.any_zero_twin = r.any_zero_twin || r.zero_twin[k];
    }
  }
  return r;
}

// One output value from the two resampled input rows it reads: every CPU kernel blends through this one expression,
// so the fused loss recomputes in backward exactly the logits its forward (and upsample_add) produced.
template <typename acc_t>
inline acc_t blend_rows(acc_t w0, acc_t a, acc_t w1, acc_t b) {
  return w0 * a + w1 * b;
}

// Input rows resampled along W for `planes` planes at once (plane p of a slot at p * out_w), kept in two slots
// keyed by (group, input row): consecutive output rows read the same two input rows, so each is resampled once per
// group (an image, or one plane) on a thread that walks output rows in order. storage: 2 * planes * out_w values.
template <typename scalar_t, typename acc_t>
class ResampledRows {
 public:
  ResampledRows(const Taps<acc_t>& cols, int64_t in_w, int64_t plane_stride, int64_t planes, acc_t* storage)
      : cols_(cols), in_w_(in_w), plane_stride_(plane_stride), planes_(planes),
        out_w_(static_cast<int64_t>(cols.i0.size())), slot_data_{storage, storage + planes * out_w_} {}

  // Input row y of the group whose first plane is `first_plane`; `keep` is the other row the caller needs at the
  // same time, which this call must not evict.
  const acc_t* row(const scalar_t* first_plane, int64_t group, int64_t y, int64_t keep) {
    if (group != group_) {
      group_ = group;
      slot_row_[0] = slot_row_[1] = -1;
    }
    if (slot_row_[0] == y) return slot_data_[0];
    if (slot_row_[1] == y) return slot_data_[1];
    const int s = slot_row_[0] == keep ? 1 : 0;
    const int32_t* cx0 = cols_.i0.data();
    const int32_t* cx1 = cols_.i1.data();
    const acc_t* cw0 = cols_.w0.data();
    const acc_t* cw1 = cols_.w1.data();
    for (int64_t p = 0; p < planes_; ++p) {
      const scalar_t* in_row = first_plane + p * plane_stride_ + y * in_w_;
      acc_t* dst = slot_data_[s] + p * out_w_;
      for (int64_t ox = 0; ox < out_w_; ++ox) {
        dst[ox] = cw0[ox] * static_cast<acc_t>(in_row[cx0[ox]]) + cw1[ox] * static_cast<acc_t>(in_row[cx1[ox]]);
      }
    }
    slot_row_[s] = y;
    return slot_data_[s];
  }

 private:
  const Taps<acc_t>& cols_;
  int64_t in_w_, plane_stride_, planes_, out_w_;
  acc_t* slot_data_[2];
  int64_t slot_row_[2] = {-1, -1};
  int64_t group_ = -1;
};

// The column half of the adjoint: out[ix] = sum over the outputs ox that read input column ix of
// weight(ox, ix) * row[ox], in a fixed order.
template <typename scalar_t, typename acc_t>
inline void fold_columns(const Readers<acc_t>& cols, const acc_t* row, int64_t in_w, scalar_t* out) {
  for (int64_t ix = 0; ix < in_w; ++ix) {
    const int64_t ox_begin = cols.start[ix], count = cols.stop[ix] - ox_begin;
    const acc_t* wx = cols.weight.data() + cols.offset[ix];
    const acc_t* vx = row + ox_begin;
    acc_t sum = 0;
    for (int64_t k = 0; k < count; ++k) sum += wx[k] * vx[k];
    if (cols.any_zero_twin) {
      const uint8_t* twin = cols.zero_twin.data() + cols.offset[ix];
      for (int64_t k = 0; k < count; ++k) sum += twin[k] ? acc_t(0) * vx[k] : acc_t(0);
    }
    out[ix] = static_cast<scalar_t>(sum);
  }
}

// The weight-0 twin taps of the rows half of the adjoint (tap_zero_twin): v += 0 * grad row, where any.
template <typename scalar_t, typename acc_t>
inline void add_zero_twin_rows(const Readers<acc_t>& rows, int64_t iy, const scalar_t* grad_plane, int64_t out_w,
                               acc_t* v) {
  if (!rows.any_zero_twin) return;
  for (int64_t oy = rows.start[iy]; oy < rows.stop[iy]; ++oy) {
    if (!rows.zero_twin[rows.offset[iy] + oy - rows.start[iy]]) continue;
    const scalar_t* g_row = grad_plane + oy * out_w;
    for (int64_t ox = 0; ox < out_w; ++ox) v[ox] += acc_t(0) * static_cast<acc_t>(g_row[ox]);
  }
}

// Per-thread scratch as one tensor from the caching allocator (so the benchmarks' allocation counts see it):
// `per_thread` values for each of ATen's threads; a parallel_for body takes its slice with thread_scratch.
inline at::Tensor allocate_thread_scratch(int64_t per_thread, at::ScalarType dtype) {
  return at::empty({static_cast<int64_t>(at::get_num_threads()), std::max<int64_t>(per_thread, 1)},
                   at::TensorOptions().dtype(dtype));
}

template <typename acc_t>
inline acc_t* thread_scratch(at::Tensor& scratch) {
  return scratch.data_ptr<acc_t>() + static_cast<int64_t>(at::get_thread_num()) * scratch.size(1);
}

}  // namespace fcn_fast

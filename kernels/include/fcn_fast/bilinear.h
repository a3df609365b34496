// Bilinear resampling as tap tables, the one description of the geometry that every native kernel reads.
//
// The tables are built once per geometry by fcn_fast/ops/_resample.py (cached, so they cost nothing per call):
//   index[o]   (int32 x2): the two input positions output position o reads on this axis (always in bounds)
//   weight[o]  (acc x2)  : their weights. deconv mode: the Caffe bilinear filler taps; a missing tap repeats the
//                          other position and the two share its weight, halved (no weight is 0, so no inf meets a
//                          0, as in conv_transpose2d). interp mode: PyTorch's taps and weights 1-l, l, weight-0 taps
//                          included (so inf * 0 gives NaN where F.interpolate gives it).
//   readers[i] (int32 x2): [start, stop) of the output positions that read input position i, with any weight
//                          (contiguous because the map o -> index[o] is monotone). Backward kernels gather over this
//                          range: each input pixel sums the gradients of the outputs that read it (0 * grad
//                          included, as PyTorch's adjoints add it), so no atomics and a deterministic result.
// A 2D output pixel (oy, ox) is the separable sum over the 2x2 taps of its row and column, every tap multiplied.
// Tables that did not come from _resample.py (a direct torch.ops call) must not make a kernel read out of bounds: the
// CPU kernels check every entry on the host; the CUDA kernels clamp each index and readers range they read instead,
// since a host check of device tables costs a device sync per call.
#pragma once

#include "fcn_fast/common.h"

namespace fcn_fast {

// Whether host code checks the table entries of tensors like `t`: for CPU tensors, except in the emulated CUDA build
// (docs/emulator.md), whose kernels run on CPU tensors and must show that the CUDA kernels' clamps suffice.
inline bool host_checks_table_entries(const at::Tensor& t) {
#ifdef FCN_FAST_EMULATE_CUDA
  return false;
#else
  return t.is_cpu();
#endif
}

// v clamped into [0, size): a no-op for every table _resample.py builds.
FCN_HD int64_t clamp_index(int64_t v, int64_t size) { return v < 0 ? 0 : (v >= size ? size - 1 : v); }

// [start, stop) of a readers entry clamped into [0, size): a no-op for every table _resample.py builds.
FCN_HD int64_t clamp_range_end(int64_t v, int64_t size) { return v < 0 ? 0 : (v > size ? size : v); }

// Weight with which output position o reads input position i on one axis (0 when it does not read it).
template <typename acc_t>
FCN_HD acc_t tap_weight(const int32_t* index, const acc_t* weight, int64_t o, int64_t i) {
  acc_t w = 0;
  if (index[2 * o] == i) w += weight[2 * o];
  if (index[2 * o + 1] == i) w += weight[2 * o + 1];
  return w;
}

// Whether output o reads input i with both taps, one of weight 0 (interp mode, where PyTorch reads a position twice:
// an axis that keeps its size, a clamped last position). The adjoint's 0 * grad of that tap, NaN for an infinite
// grad as PyTorch's upsample_bilinear2d backward gives, is lost in tap_weight's sum and must be added on its own.
template <typename acc_t>
FCN_HD bool tap_zero_twin(const int32_t* index, const acc_t* weight, int64_t o, int64_t i) {
  return index[2 * o] == i && index[2 * o + 1] == i && (weight[2 * o] == acc_t(0) || weight[2 * o + 1] == acc_t(0));
}

// The adjoint's share of v that output o sends input i on one axis: each tap that names i multiplied on its own,
// as PyTorch's adjoints do (tap_weight(...) * v, but for the 0 * v of a weight-0 twin: see tap_zero_twin).
template <typename acc_t>
FCN_HD acc_t tap_adjoint(const int32_t* index, const acc_t* weight, int64_t o, int64_t i, acc_t v) {
  acc_t s = 0;
  if (index[2 * o] == i) s += weight[2 * o] * v;
  if (index[2 * o + 1] == i) s += weight[2 * o + 1] * v;
  return s;
}

// The 2x2 taps of output pixel (oy, ox), indices clamped: kernels that sample many planes (or rows) at one pixel
// (or column) load them once.
template <typename acc_t>
struct PixelTaps {
  int64_t y0, y1, x0, x1;
  acc_t wy0, wy1, wx0, wx1;
};

// The row half of PixelTaps (y0, y1, wy0, wy1) from row oy, or the column half (x0, x1, wx0, wx1) from column ox.
template <typename acc_t>
FCN_HD void load_axis_taps(const int32_t* index, const acc_t* weight, int64_t o, int64_t in_size, int64_t* i0,
                           int64_t* i1, acc_t* w0, acc_t* w1) {
  *i0 = clamp_index(index[2 * o], in_size);
  *i1 = clamp_index(index[2 * o + 1], in_size);
  *w0 = weight[2 * o];
  *w1 = weight[2 * o + 1];
}

// Bilinear sample of one channel plane (row stride in_w) at the pixel of `taps`.
template <typename scalar_t, typename acc_t>
FCN_HD acc_t sample_taps(const scalar_t* plane, int64_t in_w, const PixelTaps<acc_t>& taps) {
  const scalar_t* r0 = plane + taps.y0 * in_w;
  const scalar_t* r1 = plane + taps.y1 * in_w;
  return taps.wy0 * (taps.wx0 * static_cast<acc_t>(r0[taps.x0]) + taps.wx1 * static_cast<acc_t>(r0[taps.x1])) +
         taps.wy1 * (taps.wx0 * static_cast<acc_t>(r1[taps.x0]) + taps.wx1 * static_cast<acc_t>(r1[taps.x1]));
}

// Bilinear sample of one in_h x in_w channel plane at output (oy, ox): the 2x2 taps of row oy and column ox.
template <typename scalar_t, typename acc_t>
FCN_HD acc_t sample_plane(const scalar_t* plane, int64_t in_h, int64_t in_w, const int32_t* row_index,
                          const acc_t* row_weight, const int32_t* col_index, const acc_t* col_weight, int64_t oy,
                          int64_t ox) {
  PixelTaps<acc_t> taps;
  load_axis_taps(row_index, row_weight, oy, in_h, &taps.y0, &taps.y1, &taps.wy0, &taps.wy1);
  load_axis_taps(col_index, col_weight, ox, in_w, &taps.x0, &taps.x1, &taps.wx0, &taps.wx1);
  return sample_taps(plane, in_w, taps);
}

}  // namespace fcn_fast

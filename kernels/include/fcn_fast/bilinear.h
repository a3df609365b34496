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

// Bilinear sample of one in_h x in_w channel plane at output (oy, ox): the 2x2 taps of row oy and column ox.
template <typename scalar_t, typename acc_t>
FCN_HD acc_t sample_plane(const scalar_t* plane, int64_t in_h, int64_t in_w, const int32_t* row_index,
                          const acc_t* row_weight, const int32_t* col_index, const acc_t* col_weight, int64_t oy,
                          int64_t ox) {
  const int64_t y0 = clamp_index(row_index[2 * oy], in_h), y1 = clamp_index(row_index[2 * oy + 1], in_h);
  const int64_t x0 = clamp_index(col_index[2 * ox], in_w), x1 = clamp_index(col_index[2 * ox + 1], in_w);
  const acc_t wy0 = row_weight[2 * oy], wy1 = row_weight[2 * oy + 1];
  const acc_t wx0 = col_weight[2 * ox], wx1 = col_weight[2 * ox + 1];
  const scalar_t* r0 = plane + y0 * in_w;
  const scalar_t* r1 = plane + y1 * in_w;
  return wy0 * (wx0 * static_cast<acc_t>(r0[x0]) + wx1 * static_cast<acc_t>(r0[x1])) +
         wy1 * (wx0 * static_cast<acc_t>(r1[x0]) + wx1 * static_cast<acc_t>(r1[x1]));
}

}  // namespace fcn_fast

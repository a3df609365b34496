// The one schema block of fcn_fast._C. Each kernel source registers the dispatch key it implements
// (kernels/cpu/*.cpp: CPU, kernels/cuda/*.cu: CUDA). These are the native kernel ops behind the public custom ops
// defined in fcn_fast/ops/*.py, which validate arguments, pick the backend and carry autograd and fake kernels.
// The emulated CUDA build (fcn_fast._C_emu, docs/emulator.md) compiles this file again with FCN_FAST_EXTENSION=_C_emu
// and FCN_FAST_OP_NAMESPACE=fcn_fast_emu: the same schemas in their own namespace.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "fcn_fast/common.h"

#ifndef FCN_FAST_EXTENSION
#define FCN_FAST_EXTENSION _C
#endif
#define FCN_FAST_CAT_(a, b) a##b
#define FCN_FAST_CAT(a, b) FCN_FAST_CAT_(a, b)
#define FCN_FAST_STR_(a) #a
#define FCN_FAST_STR(a) FCN_FAST_STR_(a)

// Importing fcn_fast._C (or _C_emu) from Python loads the library, which runs the registrations below.
PyMODINIT_FUNC FCN_FAST_CAT(PyInit_, FCN_FAST_EXTENSION)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, FCN_FAST_STR(FCN_FAST_EXTENSION),
                                          "fcn_fast native kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace fcn_fast {

// What this binary was built with, read by fcn_fast.available_backends().
static std::string build_info() {
  std::string info = "{";
#ifdef FCN_FAST_WITH_CUDA
  info += "\"cuda\": true";
#else
  info += "\"cuda\": false";
#endif
#ifdef FCN_FAST_EMULATE_CUDA
  info += ", \"emulated_cuda\": true";
#endif
#ifdef _OPENMP
  info += ", \"openmp\": " + std::to_string(_OPENMP);
#else
  info += ", \"openmp\": null";
#endif
  info += "}";
  return info;
}

FCN_FAST_LIBRARY(m) {
  m.def("_build_info() -> str", &build_info);

  // upsample_add: out = crop(bilinear(x)) + skip_scale * crop(skip); geometry comes as tap tables (bilinear.h).
  m.def(
      "_upsample_add_fwd(Tensor x, Tensor? skip, Tensor row_index, Tensor row_weight, Tensor col_index, "
      "Tensor col_weight, int skip_y, int skip_x, float skip_scale) -> Tensor");
  // Returns (grad_x, grad_skip); an output that is not needed comes back empty.
  m.def(
      "_upsample_add_bwd(Tensor grad_out, Tensor row_index, Tensor row_weight, Tensor row_readers, "
      "Tensor col_index, Tensor col_weight, Tensor col_readers, int in_h, int in_w, int skip_h, int skip_w, "
      "int skip_y, int skip_x, float skip_scale, bool need_x, bool need_skip) -> (Tensor, Tensor)");

  // softmax_cross_entropy kernels. logits (N, C, S) with any strides, target (N, S) of any integer dtype,
  // weight: contiguous (C,) of the accumulate dtype (float32; float64 for float64 logits). Labels outside [0, C) are
  // ignored (the Python front end has rejected them unless check_targets=False). Outputs in the accumulate dtype:
  // loss and the weight of the pixel in the "mean" denominator, (N, S) when per_pixel, else partial sums (a length of
  // the backend's choosing) added in a fixed order, whose totals are the sums over all pixels; and lse: the softmax
  // statistics saved for backward, (2, N, S): each pixel's largest logit m and log sum exp(z - m), see softmax_ce.h.
  m.def(
      "_softmax_cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, bool per_pixel) -> (Tensor, Tensor, Tensor)");
  // grad_loss: (N, S) in the accumulate dtype, the gradient of each pixel's loss (an expanded scalar for "mean" and
  // "sum"). Returns grad_logits shaped and, when dense, strided like logits.
  m.def(
      "_softmax_cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, Tensor? weight, "
      "int ignore_index, float label_smoothing) -> Tensor");

  // A reduced loss on the CPU: (loss partial sums: 1-D, a length of the kernel's choosing, added in a fixed order;
  // lse, empty: a backward of a reduced CPU loss reruns this kernel; grad_logits). With pixel_grad, the gradient of
  // every pixel's loss known up front (1 for "sum", 1 / denominator for "mean": a training step's loss.backward()),
  // grad_logits is the backward op's result for it, computed in the forward's sweeps; without, it is empty.
  m.def(
      "_softmax_cross_entropy_fwd_sums(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float? pixel_grad) -> (Tensor, Tensor, Tensor)");
  // The "mean" denominator as a float64 scalar: the summed weights of the labels in [0, C) other than ignore_index
  // (their count without weights).
  m.def("_ce_denominator(Tensor target, Tensor? weight, int num_classes, int ignore_index) -> Tensor");

  // [min, max] of the labels other than ignore_index as int64 ([0, 0] when every label is ignored): one pass for the
  // label check the Python front end runs before the loss kernels (CPU; on CUDA two torch reductions do it).
  m.def("_label_bounds(Tensor target, int ignore_index) -> Tensor");

  // upsample_cross_entropy / upsample_argmax kernels.
  // Per-pixel softmax cross-entropy of crop(bilinear(coarse)) without storing the upsampled logits. Returns
  // (loss, denom_weight, lse) in the accumulate dtype, lse the softmax statistics (2, N, H, W) as above; loss and
  // denom_weight (N, H, W) when per_pixel, else partial sums (1-D, a length of the backend's choosing) added in a
  // fixed order, whose totals are the sums over all pixels: a reduced loss needs no per-pixel buffers. weight is
  // (C,) in the accumulate dtype.
  m.def(
      "_upsample_cross_entropy_fwd(Tensor coarse, Tensor target, Tensor? weight, Tensor row_index, "
      "Tensor row_weight, Tensor col_index, Tensor col_weight, int ignore_index, float label_smoothing, "
      "bool per_pixel) -> (Tensor, Tensor, Tensor)");
  // grad_coarse from the gradient of each pixel's loss (a scalar for every pixel, or (N, H, W)) and the saved lse.
  m.def(
      "_upsample_cross_entropy_bwd(Tensor grad_pixel, Tensor coarse, Tensor target, Tensor? weight, Tensor lse, "
      "Tensor row_index, Tensor row_weight, Tensor row_readers, Tensor col_index, Tensor col_weight, "
      "Tensor col_readers, int ignore_index, float label_smoothing) -> Tensor");
  // Per-pixel argmax over classes of crop(bilinear(coarse)); dtype int64 or uint8.
  m.def(
      "_upsample_argmax(Tensor coarse, Tensor row_index, Tensor row_weight, Tensor col_index, Tensor col_weight, "
      "ScalarType dtype) -> Tensor");
}

}  // namespace fcn_fast

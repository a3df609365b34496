"""upsample_cross_entropy and upsample_argmax: FCN's bilinear upsampling fused with the per-pixel softmax
cross-entropy (training) or with the per-pixel argmax (inference), so the full-resolution logits are never stored.

Every output pixel interpolates its C logits from the coarse map on the fly through the tap tables of
fcn_fast/ops/_resample.py. The forward pass saves the softmax statistics of every output pixel (its largest logit and
log sum exp relative to it); the backward pass recomputes each pixel's softmax from the coarse map and those and
gathers grad_coarse directly (each coarse pixel sums the output pixels that read it: no atomics, bitwise
deterministic). Kernels: kernels/cpu/upsample_cross_entropy_cpu.cpp,
kernels/cuda/upsample_cross_entropy_cuda.cu, fcn_fast/ops/triton_upsample_cross_entropy.py.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from fcn_fast import _backends
from fcn_fast._validation import check_bool, check_tensor, describe
from fcn_fast.ops import _ce_common, _eager
from fcn_fast.ops._dispatch import Kernels, OpKernels, acc_dtype
from fcn_fast.ops._resample import Geometry, upsample_reference, upsample_reference_backward

OP = "upsample_cross_entropy"
ARGMAX_OP = "upsample_argmax"
LABEL_DTYPES = (torch.int64, torch.uint8)


def _check_coarse(op: str, coarse) -> None:
    check_tensor(op, "coarse", coarse, ndim=4)
    if min(coarse.shape[1:]) < 1:
        raise ValueError(f"{op}: coarse must have at least one class and one pixel, got {describe(coarse)}")


def _validate(coarse, target, factor, mode, offset, align_corners, weight, ignore_index, reduction,
              label_smoothing, check_targets) -> Tuple[Geometry, Optional[torch.Tensor]]:
    """Everything but the label values, which the custom op checks (see _upsample_cross_entropy_op)."""
    _check_coarse(OP, coarse)
    weight = _ce_common.check_ce_options(OP, coarse, target, weight, ignore_index, reduction, label_smoothing)
    check_bool(OP, "check_targets", check_targets)
    if target.dim() != 3 or target.shape[0] != coarse.shape[0]:
        raise ValueError(f"{OP}: target must be (N, H, W) with the N of coarse (N, C, h, w), got target: "
                         f"{describe(target)}; coarse: {describe(coarse)}")
    if min(target.shape[1:]) < 1:
        raise ValueError(f"{OP}: target must have at least one pixel, got {describe(target)}")
    geometry = Geometry.checked(OP, coarse, factor, mode, tuple(target.shape[1:]), offset, align_corners)
    return geometry, weight


# ---- reference: the composition, upsample then F.cross_entropy (full-resolution logits) ----------------------------

def _reference_logits(coarse: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    # Rounded to coarse's dtype first, as upsample_add returns them, then upcast as the kernels accumulate.
    return upsample_reference(coarse, geometry).to(acc_dtype(coarse.dtype))


def _reference_forward(coarse, target, weight, geometry, ignore_index, label_smoothing, per_pixel):
    """(per-pixel loss, per-pixel weight in the "mean" denominator, both (N, H, W) whatever per_pixel says (the other
    backends then return partial sums: the ground truth keeps the simplest form), softmax statistics (2, N, H, W))."""
    z = _reference_logits(coarse, geometry)
    valid = _ce_common.valid_labels(target, coarse.shape[1], ignore_index)
    labels = torch.where(valid, target.long(), torch.full_like(target, ignore_index, dtype=torch.long))
    loss = F.cross_entropy(z, labels, weight=weight, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    class_w = weight if weight is not None else z.new_ones(coarse.shape[1])
    denom = torch.where(valid, class_w[torch.where(valid, target.long(), 0)], 0)
    return loss, denom, _ce_common.softmax_stats(z)


def _reference_backward(grad_pixel, coarse, target, weight, lse, geometry, ignore_index, label_smoothing):
    """dloss/dcoarse: the softmax cross-entropy gradient (formula in kernels/include/fcn_fast/softmax_ce.h) at full
    resolution, then the adjoint of the upsampling through PyTorch's own ops. The softmax is recomputed (lse is not
    needed), and each pixel's incoming gradient scales the coefficients before they meet the softmax, as in the
    kernels: an incoming gradient of 1/0 (a "mean" over zero weight) then gives NaN as PyTorch does, not +-inf."""
    num_classes, eps = coarse.shape[1], label_smoothing
    z = _reference_logits(coarse, geometry)
    valid = _ce_common.valid_labels(target, num_classes, ignore_index)
    safe = torch.where(valid, target.long(), 0)
    class_w = weight if weight is not None else z.new_ones(num_classes)
    w_t = class_w[safe]
    g = torch.where(valid, grad_pixel.expand(valid.shape), 0.0)  # ignored pixels: softmax * 0
    grad = torch.softmax(z, 1) * (g * ((1 - eps) * w_t + eps / num_classes * class_w.sum()))[:, None]
    grad -= F.one_hot(safe, num_classes).permute(0, 3, 1, 2) * (g * (1 - eps) * w_t)[:, None]
    grad -= (eps / num_classes) * class_w[None, :, None, None] * g[:, None]
    return upsample_reference_backward(grad, geometry, coarse.shape).to(coarse.dtype)


def _reference_argmax(coarse, geometry, dtype):
    return upsample_reference(coarse, geometry).argmax(1).to(dtype)


# ---- backend implementations ---------------------------------------------------------------------------------------
# forward(coarse, target, weight, geometry, ignore_index, label_smoothing, per_pixel) -> (loss, denom_weight, lse)
# backward(grad_pixel, coarse, target, weight, lse, geometry, ignore_index, label_smoothing) -> grad_coarse
# argmax(coarse, geometry, dtype) -> labels

class _Reference(Kernels):
    forward = staticmethod(_reference_forward)
    backward = staticmethod(_reference_backward)
    argmax = staticmethod(_reference_argmax)


class _Native(Kernels):
    def forward(self, coarse, target, weight, geometry, ignore_index, label_smoothing, per_pixel):
        rows, cols = geometry.taps(coarse.device, coarse.dtype)
        return self.ops._upsample_cross_entropy_fwd(
            coarse, target, weight, rows.index, rows.weight, cols.index, cols.weight, ignore_index, label_smoothing,
            per_pixel)

    def backward(self, grad_pixel, coarse, target, weight, lse, geometry, ignore_index, label_smoothing):
        rows, cols = geometry.taps(coarse.device, coarse.dtype)
        return self.ops._upsample_cross_entropy_bwd(
            grad_pixel, coarse, target, weight, lse, rows.index, rows.weight, rows.readers, cols.index, cols.weight,
            cols.readers, ignore_index, label_smoothing)

    def argmax(self, coarse, geometry, dtype):
        rows, cols = geometry.taps(coarse.device, coarse.dtype)
        return self.ops._upsample_argmax(coarse, rows.index, rows.weight, cols.index, cols.weight, dtype)


class _Triton(Kernels):
    module = "fcn_fast.ops.triton_upsample_cross_entropy"


KERNELS = OpKernels(OP, reference=_Reference, cpu=_Native, cuda=_Native, triton=_Triton)


# ---- torch.library registration ----------------------------------------------------------------------------------

def _unpack(coarse: torch.Tensor, out_h, out_w, factor, mode, offset_y, offset_x, align_corners) -> Geometry:
    return Geometry(mode, (coarse.shape[2], coarse.shape[3]), (out_h, out_w), factor, (offset_y, offset_x),
                    align_corners)


def _upsample_cross_entropy_impl(coarse: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                                 factor: int, mode: str, offset_y: int, offset_x: int, align_corners: bool,
                                 ignore_index: int, reduction: str, label_smoothing: float, check_targets: bool,
                                 backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, lse, denom): the reduced loss, the per-pixel softmax statistics backward needs
    (_ce_common.stats_shape) and the summed weight of the counted pixels (the "mean" divisor)."""
    # The label check reads the values, so it runs here, inside the opaque op, still before any kernel: under
    # torch.compile(fullgraph=True) too, where a data-dependent branch in the public function would break the graph.
    if check_targets:
        _ce_common.check_targets(OP, target, coarse.shape[1], ignore_index)
    geometry = _unpack(coarse, target.shape[1], target.shape[2], factor, mode, offset_y, offset_x, align_corners)
    # A reduced loss asks the kernels for partial sums: per-pixel loss and weight buffers would be half of the
    # forward's memory (the softmax statistics, two floats per pixel, are all that backward keeps).
    loss, denom, lse = KERNELS[backend].forward(coarse.contiguous(), target.contiguous(), weight, geometry,
                                                ignore_index, label_smoothing, reduction == "none")
    denom_total = _ce_common.sum_in_fixed_order(denom)
    reduced = _ce_common.reduce_pixel_losses(loss, denom_total, reduction)
    return reduced.to(coarse.dtype), lse, denom_total


_upsample_cross_entropy_op = torch.library.custom_op("fcn_fast::upsample_cross_entropy", mutates_args=())(
    _upsample_cross_entropy_impl)


@_upsample_cross_entropy_op.register_fake
def _(coarse, target, weight, factor, mode, offset_y, offset_x, align_corners, ignore_index, reduction,
      label_smoothing, check_targets, backend):
    acc = acc_dtype(coarse.dtype)
    loss = coarse.new_empty(target.shape if reduction == "none" else ())
    return loss, target.new_empty(_ce_common.stats_shape(target.shape), dtype=acc), coarse.new_empty((), dtype=acc)


_eager.register_per_sample_vmap(_upsample_cross_entropy_op)


def _upsample_cross_entropy_backward_impl(grad: torch.Tensor, coarse: torch.Tensor, target: torch.Tensor,
                                          weight: Optional[torch.Tensor], lse: torch.Tensor, denom: torch.Tensor,
                                          factor: int, mode: str, offset_y: int, offset_x: int, align_corners: bool,
                                          ignore_index: int, reduction: str, label_smoothing: float,
                                          backend: str) -> torch.Tensor:
    geometry = _unpack(coarse, target.shape[1], target.shape[2], factor, mode, offset_y, offset_x, align_corners)
    # The gradient of each pixel's loss: one scalar for "sum"/"mean", a map for "none".
    grad_pixel = grad.to(lse.dtype)
    if reduction == "mean":
        grad_pixel = grad_pixel / denom
    return KERNELS[backend].backward(grad_pixel.contiguous(), coarse.contiguous(), target.contiguous(), weight, lse,
                                     geometry, ignore_index, label_smoothing)


_upsample_cross_entropy_backward_op = torch.library.custom_op("fcn_fast::upsample_cross_entropy_backward",
                                                              mutates_args=())(_upsample_cross_entropy_backward_impl)


@_upsample_cross_entropy_backward_op.register_fake
def _(grad, coarse, target, weight, lse, denom, factor, mode, offset_y, offset_x, align_corners, ignore_index,
      reduction, label_smoothing, backend):
    return torch.empty_like(coarse, memory_format=torch.contiguous_format)


_eager.register_per_sample_vmap(_upsample_cross_entropy_backward_op)


def _setup_context(ctx, inputs, output):
    coarse, target, weight = inputs[:3]
    _, lse, denom = output
    ctx.save_for_backward(coarse, target, weight, lse, denom)
    *geometry_and_options, _check_targets, backend = inputs[3:]
    ctx.args = (*geometry_and_options, backend)  # the backward op's arguments after the tensors
    ctx.num_args = len(inputs)
    ctx.mark_non_differentiable(lse, denom)
    # No zero-filled gradients for lse and denom (a per-pixel buffer autograd would otherwise allocate).
    ctx.set_materialize_grads(False)


_upsample_cross_entropy_op.register_autograd(_ce_common.make_loss_backward(OP, _upsample_cross_entropy_backward_op),
                                             setup_context=_setup_context)
_UpsampleCrossEntropyFunction = _eager.autograd_function(
    "_UpsampleCrossEntropyFunction", _upsample_cross_entropy_impl, _setup_context,
    _ce_common.make_loss_backward(OP, _upsample_cross_entropy_backward_impl))
_UpsampleCrossEntropyTransformFunction = _eager.transform_function(
    "_UpsampleCrossEntropyTransformFunction", OP, _upsample_cross_entropy_op, _setup_context,
    _ce_common.make_loss_backward(OP, _upsample_cross_entropy_backward_op))


def _upsample_argmax_impl(coarse: torch.Tensor, factor: int, mode: str, out_h: int, out_w: int, offset_y: int,
                          offset_x: int, align_corners: bool, dtype: torch.dtype, backend: str) -> torch.Tensor:
    geometry = _unpack(coarse, out_h, out_w, factor, mode, offset_y, offset_x, align_corners)
    if coarse.shape[0] == 0:
        return coarse.new_empty((0, out_h, out_w), dtype=dtype)
    return KERNELS[backend].argmax(coarse.contiguous(), geometry, dtype)


_upsample_argmax_op = torch.library.custom_op("fcn_fast::upsample_argmax", mutates_args=())(_upsample_argmax_impl)


@_upsample_argmax_op.register_fake
def _(coarse, factor, mode, out_h, out_w, offset_y, offset_x, align_corners, dtype, backend):
    return coarse.new_empty((coarse.shape[0], out_h, out_w), dtype=dtype)


_eager.register_per_sample_vmap(_upsample_argmax_op)


# ---- public API ---------------------------------------------------------------------------------------------------

def upsample_cross_entropy(coarse: torch.Tensor, target: torch.Tensor, *, factor: int, mode: str = "deconv",
                           offset=(0, 0), align_corners: bool = False, weight: Optional[torch.Tensor] = None,
                           ignore_index: int = 255, reduction: str = "mean", label_smoothing: float = 0.0,
                           check_targets: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """Softmax cross-entropy of bilinearly upsampled coarse logits, without storing the upsampled logits.

    Equals ``softmax_cross_entropy(upsample_add(coarse, factor=factor, mode=mode, out_size=target.shape[-2:],
    offset=offset, align_corners=align_corners), target, weight=weight, ignore_index=ignore_index,
    reduction=reduction, label_smoothing=label_smoothing)``, i.e. ``F.cross_entropy`` semantics on those logits.

    Args:
        coarse: Tensor[N, C, h, w], float32/float64/float16/bfloat16: the coarse class scores.
        target: Tensor[N, H, W] of an integer dtype (int64, int32, int16, int8, uint8): labels in [0, C) or
            ``ignore_index``. (H, W) is the output size of the upsampling.
        factor, mode, offset, align_corners: the upsampling, as in :func:`fcn_fast.upsample_add` (``mode="deconv"``
            is FCN's fixed bilinear deconvolution cropped at ``offset``; ``"interp"`` is ``F.interpolate``).
        weight: optional Tensor[C] of class weights (any float dtype, on coarse's device).
        ignore_index: label of pixels that do not count.
        reduction: ``"mean"`` (divides by the summed class weights of the counted pixels; NaN when every pixel is
            ignored, as PyTorch gives), ``"sum"`` or ``"none"`` (Tensor[N, H, W]).
        label_smoothing: in [0, 1], as ``F.cross_entropy`` defines it (weights included).
        check_targets: raise a ValueError naming labels outside [0, C) other than ignore_index (one pass over the
            target and one host sync). ``False`` skips that check; such labels are then ignored like ignore_index.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None (see ``fcn_fast.use_backend``).

    Returns:
        The loss in coarse's dtype (accumulated in float32, float64 for float64; float32 inside autocast, as
        ``F.cross_entropy``). Differentiable in ``coarse`` only (torch.func.grad and vmap too; not twice);
        backward is a deterministic gather straight into grad_coarse. Memory: besides the inputs, the softmax
        statistics (two float32 (N, H, W) planes, kept for backward) and for reduction="none" the per-pixel loss and
        weight (two more); never anything of size N*C*H*W (except on the reference backend, which is the plain
        composition).
    """
    geometry, weight = _validate(coarse, target, factor, mode, offset, align_corners, weight, ignore_index, reduction,
                                 label_smoothing, check_targets)
    coarse = _eager.autocast_float32(coarse)
    name = _backends.resolve_backend(backend, coarse.device, OP)
    run = _eager.runner(_UpsampleCrossEntropyFunction.apply, _UpsampleCrossEntropyTransformFunction.apply,
                        _upsample_cross_entropy_op, coarse, target, weight)
    loss, _, _ = run(
        coarse, target, weight, geometry.factor, geometry.mode, geometry.offset[0], geometry.offset[1],
        geometry.align_corners, int(ignore_index), reduction, float(label_smoothing), check_targets, name)
    return loss


def upsample_argmax(coarse: torch.Tensor, *, factor: int, mode: str = "deconv", out_size: Sequence[int],
                    offset=(0, 0), align_corners: bool = False, dtype: torch.dtype = torch.int64,
                    backend: Optional[str] = None) -> torch.Tensor:
    """Per-pixel argmax over classes of bilinearly upsampled coarse logits, without storing the upsampled logits.

    Equals ``upsample_add(coarse, factor=factor, mode=mode, out_size=out_size, offset=offset,
    align_corners=align_corners).argmax(1).to(dtype)``: ties go to the lowest class and a NaN logit wins (the first
    NaN class), as in ``torch.argmax``.

    Args:
        coarse: Tensor[N, C, h, w], float32/float64/float16/bfloat16.
        out_size: (H, W) of the labels.
        dtype: ``torch.int64`` (default) or ``torch.uint8`` (C <= 256).

    Returns:
        Tensor[N, H, W] of ``dtype``. Not differentiable (labels have no gradient).
    """
    _check_coarse(ARGMAX_OP, coarse)
    if dtype not in LABEL_DTYPES:
        raise TypeError(f"{ARGMAX_OP}: dtype must be torch.int64 or torch.uint8, got {dtype!r}")
    if dtype == torch.uint8 and coarse.shape[1] > 256:
        raise ValueError(f"{ARGMAX_OP}: dtype=torch.uint8 holds at most 256 classes, coarse has {describe(coarse)}")
    if out_size is None:
        raise ValueError(f"{ARGMAX_OP}: out_size (H, W) is required")
    geometry = Geometry.checked(ARGMAX_OP, coarse, factor, mode, out_size, offset, align_corners)
    name = _backends.resolve_backend(backend, coarse.device, ARGMAX_OP)
    # No autograd here: the eager path is the implementation itself.
    run = _upsample_argmax_impl if _eager.takes_eager_path(coarse) else _upsample_argmax_op
    return run(
        coarse, geometry.factor, geometry.mode, geometry.out_hw[0], geometry.out_hw[1], geometry.offset[0],
        geometry.offset[1], geometry.align_corners, dtype, name)


class UpsampleCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`upsample_cross_entropy`.

    ``forward(coarse, target, factor=..., offset=(0, 0), align_corners=False)`` with a coarse Tensor[N, C, h, w], or
    ``forward(coarse_output, target)`` with a model's CoarseOutput (see ``fcn_fast.models``), which carries
    ``.logits .factor .offset .mode .align_corners``.
    """

    def __init__(self, weight: Optional[torch.Tensor] = None, ignore_index: int = 255, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, mode: str = "deconv", check_targets: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.mode, self.check_targets, self.backend = mode, check_targets, backend

    def forward(self, coarse, target: torch.Tensor, *, factor: Optional[int] = None, offset=(0, 0),
                align_corners: bool = False) -> torch.Tensor:
        mode = self.mode
        if not isinstance(coarse, torch.Tensor):  # a model's CoarseOutput: logits plus geometry
            coarse, factor, offset, mode, align_corners = (coarse.logits, coarse.factor, coarse.offset, coarse.mode,
                                                           coarse.align_corners)
        if factor is None:
            raise ValueError(f"{OP}: factor is required with a coarse tensor (or pass a model's CoarseOutput)")
        return upsample_cross_entropy(coarse, target, factor=factor, mode=mode, offset=offset,
                                      align_corners=align_corners, weight=self.weight, ignore_index=self.ignore_index,
                                      reduction=self.reduction, label_smoothing=self.label_smoothing,
                                      check_targets=self.check_targets, backend=self.backend)

    def extra_repr(self) -> str:
        return _ce_common.loss_repr(self, first=[f"mode={self.mode!r}"],
                                    flags=[] if self.check_targets else ["check_targets=False"])

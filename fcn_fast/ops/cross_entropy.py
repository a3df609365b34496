"""softmax_cross_entropy: per-pixel softmax cross-entropy over class-strided logits, with F.cross_entropy's semantics.

Public function, reference, validation, the backends' implementations (``KERNELS``, see _dispatch.py) and the
torch.library registrations (custom op, autograd, fake kernel) live here; the kernels live in
kernels/cpu/cross_entropy_cpu.cpp, kernels/cuda/cross_entropy_cuda.cu and fcn_fast/ops/triton_cross_entropy.py, the
per-pixel math they share in kernels/include/fcn_fast/softmax_ce.h and fcn_fast/ops/triton_common.py.

Every backend sees logits as (N, C, S) (S: the flattened spatial dims, 1 for (N, C) scores) and the target as (N, S),
both views of the caller's tensors. The forward saves two floats per pixel for backward, the softmax statistics
(each pixel's largest logit and log sum exp relative to it, kernels/include/fcn_fast/softmax_ce.h); backward
recomputes the probabilities from them. On the CPU a reduced loss whose logits need a gradient also gets the gradient
for ``loss.backward()`` (incoming gradient 1) in the forward's sweeps, one read and one exp per logit in all instead
of two; backward hands it on when the incoming gradient is 1 and recomputes otherwise (README, "Softmax
cross-entropy", has the measurements).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fcn_fast import _backends
from fcn_fast._validation import check_bool, check_tensor, describe
from fcn_fast.ops import _ce_common, _eager
from fcn_fast.ops._dispatch import Kernels, OpKernels, acc_dtype

OP = "softmax_cross_entropy"


def _validate(logits, target, weight, ignore_index, reduction, label_smoothing, check_targets) -> Optional[torch.Tensor]:
    check_tensor(OP, "logits", logits, min_ndim=2)
    weight = _ce_common.check_ce_options(OP, logits, target, weight, ignore_index, reduction, label_smoothing)
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"{OP}: target must be logits' shape without the class dim 1: logits (N, C, d1, ...) needs "
                         f"target (N, d1, ...); got logits: {describe(logits)}; target: {describe(target)}")
    if logits.shape[1] == 0:
        raise ValueError(f"{OP}: logits must have at least one class, got {describe(logits)}")
    check_bool(OP, "check_targets", check_targets)
    return weight


def _flat(logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, C, S) and (N, S) views (copies only when the spatial dims cannot be merged, e.g. a sliced tensor)."""
    n, c = logits.shape[0], logits.shape[1]
    spatial = math.prod(logits.shape[2:])
    return logits.reshape(n, c, spatial), target.reshape(n, spatial)


# ---- reference: F.cross_entropy in the accumulate dtype ----------------------------------------------------------

def _reference_pixels(logits, target, weight, ignore_index, label_smoothing):
    """Per-pixel (loss, denominator weight) of F.cross_entropy, computed in float32 (float64 for float64)."""
    z = logits.to(acc_dtype(logits.dtype))
    valid = _ce_common.valid_labels(target, z.shape[1], ignore_index)
    safe_target = torch.where(valid, target, 0).long()  # labels the caller let through unchecked are ignored
    loss = F.cross_entropy(z, safe_target, weight=weight, reduction="none", label_smoothing=label_smoothing)
    loss = torch.where(valid, loss, 0.0)  # where, not *: ignored pixels give 0 as in PyTorch, even for NaN logits
    denom = (weight[safe_target] if weight is not None else torch.ones_like(loss)) * valid
    return loss, denom, safe_target, valid


def _reference_forward(logits, target, weight, ignore_index, label_smoothing, per_pixel=True):
    # Per-pixel values whatever per_pixel says: each is its own partial sum (the ground truth keeps the simplest form).
    loss, denom, _, _ = _reference_pixels(logits, target, weight, ignore_index, label_smoothing)
    return loss, denom, _ce_common.softmax_stats(logits.to(acc_dtype(logits.dtype)))


def _reference_backward(grad_pixels, logits, target, lse, weight, ignore_index, label_smoothing):
    # The gradient in closed form (softmax_ce.h has the derivation): a custom op's body runs below autograd, so it
    # cannot differentiate F.cross_entropy itself.
    z = logits.to(acc_dtype(logits.dtype))
    num_classes = z.shape[1]
    valid = _ce_common.valid_labels(target, num_classes, ignore_index)
    safe_target = torch.where(valid, target, 0).long()
    class_w = weight if weight is not None else z.new_ones(num_classes)
    g = torch.where(valid, grad_pixels, 0.0)  # ignored pixels: p * 0 (NaN where their logits are NaN/inf, as in
    # PyTorch), also when an all-ignored "mean" makes the incoming gradient 1/0
    eps = label_smoothing
    w_t = class_w[safe_target]
    prob = torch.softmax(z, dim=1)
    grad = prob * (g * ((1 - eps) * w_t + eps / num_classes * class_w.sum())).unsqueeze(1)
    grad = grad - F.one_hot(safe_target, num_classes).movedim(-1, 1) * (g * (1 - eps) * w_t).unsqueeze(1)
    grad = grad - (eps / num_classes) * class_w.view(1, -1, 1) * g.unsqueeze(1)
    return grad.to(logits.dtype)


# ---- backend implementations on (N, C, S) / (N, S) views ---------------------------------------------------------
# forward(logits, target, weight, ignore_index, label_smoothing, per_pixel) -> (loss, denom_weight, lse), acc dtype:
#   loss and denom_weight per pixel, or (per_pixel False, a reduced loss) partial sums of them of the backend's
#   choosing; lse: the softmax statistics (2, N, S) (_ce_common.stats_shape: each pixel's max logit m and
#   log sum exp(z - m))
# backward(grad_pixels, logits, target, lse, weight, ignore_index, label_smoothing) -> grad_logits
# With gradient_in_forward, a reduced loss takes reduced_forward and reduced_backward instead (see _Cpu).

class _Kernels(Kernels):
    gradient_in_forward = False


class _Reference(_Kernels):
    forward = staticmethod(_reference_forward)
    backward = staticmethod(_reference_backward)


class _Native(_Kernels):
    def forward(self, logits, target, weight, ignore_index, label_smoothing, per_pixel=True):
        return self.ops._softmax_cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, per_pixel)

    def backward(self, grad_pixels, logits, target, lse, weight, ignore_index, label_smoothing):
        return self.ops._softmax_cross_entropy_bwd(grad_pixels, logits, target, lse, weight, ignore_index,
                                                   label_smoothing)


class _Cpu(_Native):
    """The CPU kernels sum a reduced loss in their sweeps (no per-pixel loss and weight buffers) and can write the
    gradient for an incoming gradient of 1 in the same sweeps."""

    gradient_in_forward = True

    def reduced_forward(self, flat_logits, flat_target, weight, ignore_index, label_smoothing, reduction, need_grad):
        """(loss, lse, denominator, gradient for an incoming gradient of 1, or empty).

        The "mean" denominator comes first, from one pass over the labels, because the gradient the kernel writes
        already carries 1 / denominator. lse comes back empty: every backward of this loss runs the kernel again
        (reduced_backward)."""
        acc = acc_dtype(flat_logits.dtype)
        denom_total = self.ops._ce_denominator(flat_target, weight, flat_logits.shape[1], ignore_index).to(acc)
        # The gradient of every pixel's loss for a loss gradient of 1, as _backward computes it for any other.
        pixel_grad = float(_pixel_grad(torch.ones((), dtype=acc), denom_total, reduction)) if need_grad else None
        loss_sums, lse, grad = self.ops._softmax_cross_entropy_fwd_sums(
            flat_logits, flat_target, weight, ignore_index, label_smoothing, pixel_grad)
        loss = _ce_common.sum_in_fixed_order(loss_sums)
        return (_ce_common.mean(loss, denom_total) if reduction == "mean" else loss), lse, denom_total, grad

    def reduced_backward(self, pixel_grad, flat_logits, flat_target, weight, ignore_index, label_smoothing):
        """The gradient for any incoming gradient (``pixel_grad``: every pixel's share of it), from the forward's
        sweeps: one formula for every CPU gradient of a reduced loss, so backward is reentrant bitwise."""
        _, _, grad_logits = self.ops._softmax_cross_entropy_fwd_sums(
            flat_logits, flat_target, weight, ignore_index, label_smoothing, float(pixel_grad))
        return grad_logits


class _Triton(_Kernels):
    module = "fcn_fast.ops.triton_cross_entropy"


KERNELS = OpKernels(OP, reference=_Reference, cpu=_Cpu, cuda=_Native, triton=_Triton)


def _pixel_grad(loss_grad: torch.Tensor, denom_total: torch.Tensor, reduction: str) -> torch.Tensor:
    """The gradient of every pixel's loss of a reduced loss, from the loss's gradient (in the accumulate dtype)."""
    return loss_grad / denom_total if reduction == "mean" else loss_grad


# ---- torch.library registration ----------------------------------------------------------------------------------
# Outputs: the loss (what the public function returns), then for backward only: the softmax statistics (empty for a
# reduced CPU loss, whose backward runs the forward kernel again), the "mean" denominator and the CPU's gradient from
# the forward (empty on the other backends and where none is needed).

def _output_shapes(logits, target, reduction, backend):
    loss_shape = target.shape if reduction == "none" else ()
    if KERNELS[backend].gradient_in_forward and reduction != "none":
        return loss_shape, (0,)
    return loss_shape, _ce_common.stats_shape((logits.shape[0], math.prod(logits.shape[2:])))


def _gradient_in_forward(logits: torch.Tensor, reduction: str, need_grad: bool, backend: str) -> bool:
    return need_grad and reduction != "none" and KERNELS[backend].gradient_in_forward and logits.numel() > 0


def _softmax_cross_entropy_impl(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                                ignore_index: int, reduction: str, label_smoothing: float, check_targets: bool,
                                need_grad: bool, backend: str
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, lse, denominator, gradient of loss.backward() or an empty tensor); need_grad: logits will get
    a gradient (only the CPU kernels use it, see the module docstring)."""
    if check_targets:  # here, not in the public function: it reads label values, which torch.compile cannot trace
        _ce_common.check_targets(OP, target, logits.shape[1], ignore_index)
    flat_logits, flat_target = _flat(logits, target)
    kernels = KERNELS[backend]
    if kernels.gradient_in_forward and reduction != "none":
        out, lse, denom_total, grad = kernels.reduced_forward(
            flat_logits, flat_target, weight, ignore_index, label_smoothing, reduction,
            _gradient_in_forward(logits, reduction, need_grad, backend))
        return out.to(logits.dtype), lse, denom_total, grad.reshape(logits.shape) if grad.numel() else grad
    loss, denom, lse = kernels.forward(flat_logits, flat_target, weight, ignore_index, label_smoothing,
                                       reduction == "none")
    denom_total = _ce_common.sum_in_fixed_order(denom)
    out = _ce_common.reduce_pixel_losses(loss, denom_total, reduction)
    out = out.reshape(target.shape) if reduction == "none" else out
    return out.to(logits.dtype), lse, denom_total, logits.new_empty(0)


_softmax_cross_entropy_op = torch.library.custom_op("fcn_fast::softmax_cross_entropy", mutates_args=())(
    _softmax_cross_entropy_impl)


@_softmax_cross_entropy_op.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, check_targets, need_grad, backend):
    loss_shape, stats = _output_shapes(logits, target, reduction, backend)
    acc = acc_dtype(logits.dtype)
    grad = (torch.empty_like(logits) if _gradient_in_forward(logits, reduction, need_grad, backend)
            else logits.new_empty(0))
    return logits.new_empty(loss_shape), logits.new_empty(stats, dtype=acc), logits.new_empty((), dtype=acc), grad


_eager.register_per_sample_vmap(_softmax_cross_entropy_op)


def _backward(grad, logits, target, weight, lse, denom_total, forward_grad, ignore_index, reduction, label_smoothing,
              backend, copy_forward_grad):
    flat_logits, flat_target = _flat(logits, target)
    if flat_logits.numel() == 0:
        return torch.zeros_like(logits)
    grad = grad.to(lse.dtype)
    pixel_grad = _pixel_grad(grad, denom_total, reduction)
    kernels = KERNELS[backend]
    if kernels.gradient_in_forward and reduction != "none":
        # The forward's gradient is the one for an incoming gradient of exactly 1 (loss.backward()). Any other (a
        # scaled loss, a sum of losses, a retained graph's second backward) runs the forward's sweeps again with its
        # own pixel gradient rather than the lse-based backward kernel.
        if forward_grad.numel() and bool(grad == 1):
            return forward_grad.clone() if copy_forward_grad else forward_grad
        grad_logits = kernels.reduced_backward(pixel_grad, flat_logits, flat_target, weight, ignore_index,
                                               label_smoothing)
        return grad_logits.reshape(logits.shape)
    # Every pixel's loss of a reduced loss enters with the same factor: an expanded scalar, never materialized.
    grad_pixels = grad.reshape(flat_target.shape) if reduction == "none" else pixel_grad.expand(flat_target.shape)
    grad_logits = kernels.backward(grad_pixels, flat_logits, flat_target, lse, weight, ignore_index, label_smoothing)
    return grad_logits.reshape(logits.shape)


def _softmax_cross_entropy_backward_impl(grad: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                                         weight: Optional[torch.Tensor], lse: torch.Tensor, denom_total: torch.Tensor,
                                         forward_grad: torch.Tensor, ignore_index: int, reduction: str,
                                         label_smoothing: float, backend: str) -> torch.Tensor:
    # A custom op's output may not alias its input: the forward's gradient is copied (the traced path only).
    return _backward(grad, logits, target, weight, lse, denom_total, forward_grad, ignore_index, reduction,
                     label_smoothing, backend, copy_forward_grad=True)


_softmax_cross_entropy_backward_op = torch.library.custom_op("fcn_fast::softmax_cross_entropy_backward",
                                                             mutates_args=())(_softmax_cross_entropy_backward_impl)


@_softmax_cross_entropy_backward_op.register_fake
def _(grad, logits, target, weight, lse, denom_total, forward_grad, ignore_index, reduction, label_smoothing,
      backend):
    return torch.empty_like(logits)


_eager.register_per_sample_vmap(_softmax_cross_entropy_backward_op)


def _setup_context(ctx, inputs, output, *, keep_forward_grad_apart=False):
    logits, target, weight, ignore_index, reduction, label_smoothing, _check_targets, _need_grad, backend = inputs
    _, lse, denom_total, forward_grad = output
    if keep_forward_grad_apart:
        ctx.save_for_backward(logits, target, weight, lse, denom_total)
        ctx.forward_grad = forward_grad
    else:
        ctx.save_for_backward(logits, target, weight, lse, denom_total, forward_grad)
    ctx.args = (ignore_index, reduction, label_smoothing, backend)  # the backward op's arguments after the tensors
    ctx.num_args = len(inputs)
    ctx.mark_non_differentiable(lse, denom_total, forward_grad)
    # No zero-filled gradients for lse and denom (a per-pixel buffer autograd would otherwise allocate).
    ctx.set_materialize_grads(False)


def _eager_setup_context(ctx, inputs, output):
    # The forward's gradient is kept outside the saved tensors so that backward can hand it on and drop its own
    # reference: the engine and AccumulateGrad then own it alone (they may add into it in place, which must not reach
    # a tensor a retained graph still holds). A second backward of a retained graph recomputes.
    _setup_context(ctx, inputs, output, keep_forward_grad_apart=True)


def _take_forward_grad(ctx):
    forward_grad, ctx.forward_grad = ctx.forward_grad, _NO_FORWARD_GRAD  # handed on once
    return (forward_grad,)


def _eager_backward_impl(*args):
    return _backward(*args, copy_forward_grad=False)


_NO_FORWARD_GRAD = torch.empty(0)
_softmax_cross_entropy_op.register_autograd(_ce_common.make_loss_backward(OP, _softmax_cross_entropy_backward_op),
                                            setup_context=_setup_context)
_SoftmaxCrossEntropyFunction = _eager.autograd_function(
    "_SoftmaxCrossEntropyFunction", _softmax_cross_entropy_impl, _eager_setup_context,
    _ce_common.make_loss_backward(OP, _eager_backward_impl, handed_on=_take_forward_grad))
_SoftmaxCrossEntropyTransformFunction = _eager.transform_function(
    "_SoftmaxCrossEntropyTransformFunction", OP, _softmax_cross_entropy_op, _setup_context,
    _ce_common.make_loss_backward(OP, _softmax_cross_entropy_backward_op))


# ---- public API ---------------------------------------------------------------------------------------------------

def softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, weight: Optional[torch.Tensor] = None,
                          ignore_index: int = 255, reduction: str = "mean", label_smoothing: float = 0.0,
                          check_targets: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """Softmax cross-entropy over the class dim 1, exactly ``F.cross_entropy`` with class-index targets.

    Args:
        logits: Tensor[N, C, d1, ...] (or [N, C]), float32/float64/float16/bfloat16, any strides (channels-last
            too). Computed in float32 (float64 for float64), never materializing the probabilities.
        target: Tensor[N, d1, ...] of class indices, any integer dtype (int64, int32, uint8, ...).
        weight: optional Tensor[C] of class weights (any float dtype, logits' device).
        ignore_index: label whose pixels contribute nothing (default 255, the VOC boundary label; pass -100 for
            PyTorch's default).
        reduction: ``"mean"`` (sum of weighted losses / sum of the weights of non-ignored pixels: NaN when every pixel
            is ignored, as in PyTorch), ``"sum"`` or ``"none"`` (Tensor[N, d1, ...]).
        label_smoothing: float in [0, 1], PyTorch's definition (weights included).
        check_targets: raise a ValueError naming labels outside [0, C) other than ignore_index (one pass over the
            target and a host sync). False skips it: such labels are then ignored like ignore_index (kernels never
            index with them).
        backend: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None (see ``fcn_fast.use_backend``).

    Returns:
        The loss in logits' dtype (float32 inside autocast, as ``F.cross_entropy``): a scalar, or Tensor[N, d1, ...]
        for ``reduction="none"``. Differentiable with respect to logits (torch.func.grad and vmap too; not twice:
        docs/backends.md).
    """
    weight = _validate(logits, target, weight, ignore_index, reduction, label_smoothing, check_targets)
    logits = _eager.autocast_float32(logits)
    name = _backends.resolve_backend(backend, logits.device, OP)
    run = _eager.runner(_SoftmaxCrossEntropyFunction.apply, _SoftmaxCrossEntropyTransformFunction.apply,
                        _softmax_cross_entropy_op, logits, target, weight)
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _, _, _ = run(logits, target, weight, int(ignore_index), reduction, float(label_smoothing), check_targets,
                        need_grad, name)
    return loss


class SoftmaxCrossEntropyLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` (same arguments, defaults and behaviour for class-index targets)
    running :func:`softmax_cross_entropy`; ``backend=`` picks the kernels."""

    def __init__(self, weight: Optional[torch.Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            # PyTorch's deprecated pair, mapped to a reduction as nn.CrossEntropyLoss does (with its warning).
            from torch.nn import _reduction

            reduction = _reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing, self.backend = ignore_index, reduction, label_smoothing, backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return softmax_cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                     reduction=self.reduction, label_smoothing=self.label_smoothing,
                                     backend=self.backend)

    def extra_repr(self) -> str:
        return _ce_common.loss_repr(self)

"""What softmax_cross_entropy and upsample_cross_entropy share: argument validation (label range, class weights,
reduction, smoothing) and the reduction of per-pixel losses, with F.cross_entropy's semantics."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from fcn_fast import _extension
from fcn_fast._validation import INT_DTYPES, check_float, check_int, check_tensor, describe
from fcn_fast.ops import _eager
from fcn_fast.ops._dispatch import acc_dtype

REDUCTIONS = ("none", "mean", "sum")


def check_targets(op: str, target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """ValueError naming each label outside [0, num_classes) other than ignore_index and how many pixels carry it.

    PyTorch raises a device-side assert here (pytorch issues 108345, 113704); this costs one pass over the target
    and one host sync, which ``check_targets=False`` skips (kernels then treat such labels as ignored)."""
    if target.numel() == 0:
        return
    # Cheap passes first; the full mask only to word the error. On the CPU one native pass (the torch passes below
    # cost ~2 ms at 500x500, a tenth of the fused loss); on other devices one reduction, then a select and one more.
    if target.device.type == "cpu" and _extension.has_cpu_kernels():
        low, high = torch.ops.fcn_fast._label_bounds(target, ignore_index).tolist()
        if low >= 0 and high < num_classes:
            return
    else:
        low, high = torch.aminmax(target)
        if int(low) >= 0 and int(high) < num_classes:
            return
        target = target.long()  # compared with Python ints below: see valid_labels
        low, high = torch.aminmax(torch.where(target == ignore_index, 0, target))
        if int(low) >= 0 and int(high) < num_classes:
            return
    target = target.long()
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        values, counts = torch.unique(target[bad], return_counts=True)
        shown = ", ".join(f"{int(v)} ({int(c)} pixels)" for v, c in list(zip(values.tolist(), counts.tolist()))[:8])
        more = "" if values.numel() <= 8 else f" and {values.numel() - 8} more values"
        raise ValueError(
            f"{op}: target has labels outside [0, {num_classes}) that are not ignore_index={ignore_index}: "
            f"{shown}{more}")


def valid_labels(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Pixels that count: labels in [0, num_classes) other than ignore_index (out-of-range labels, possible only with
    check_targets=False, are ignored as the native kernels ignore them). Compared in int64, as the kernels compare: a
    Python int compared with a uint8/int8 tensor is cast to its dtype and wraps (-100 would match label 156)."""
    target = target.long()
    return (target != ignore_index) & (target >= 0) & (target < num_classes)


def check_ce_options(op: str, logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                     ignore_index, reduction: str, label_smoothing) -> Optional[torch.Tensor]:
    """Checks everything but the label values and the logits/target shapes (op-specific); returns the class weights
    as a contiguous float tensor on the logits' device (float64 for float64 logits), or None."""
    check_tensor(op, "target", target, dtypes=INT_DTYPES)
    if target.device != logits.device:
        raise ValueError(f"{op}: logits and target must be on one device, got logits: {describe(logits)}; "
                         f"target: {describe(target)}")
    check_int(op, "ignore_index", ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_float(op, "label_smoothing", label_smoothing, minimum=0, maximum=1)
    num_classes = logits.shape[1]
    if weight is None:
        return None
    check_tensor(op, "weight", weight, ndim=1)
    if weight.shape[0] != num_classes:
        raise ValueError(f"{op}: weight must have one entry per class ({num_classes}), got {describe(weight)}")
    if weight.device != logits.device:
        raise ValueError(f"{op}: weight must be on the logits' device, got weight: {describe(weight)}; "
                         f"logits: {describe(logits)}")
    return weight.to(acc_dtype(logits.dtype)).contiguous()


def stats_shape(pixel_shape) -> Tuple[int, ...]:
    """Shape of the softmax statistics a forward saves for backward (kernels/include/fcn_fast/softmax_ce.h): two
    planes of ``pixel_shape``, each pixel's largest logit m and log sum_c exp(z_c - m)."""
    return (2, *pixel_shape)


def softmax_stats(z: torch.Tensor) -> torch.Tensor:
    """The softmax statistics of logits z (N, C, ...) in plain PyTorch: (max over dim 1, log sum exp(z - max))."""
    m = z.amax(1)
    return torch.stack([m, torch.logsumexp(z - m.unsqueeze(1), 1)])


# torch.sum splits a reduction of more than 32768 elements (ATen's GRAIN_SIZE) over the threads, so its result
# depends on their number; a reduction over the last dim of a 2-D tensor goes row by row, one thread per row.
_FIXED_ORDER_CHUNK = 16384


def sum_in_fixed_order(values: torch.Tensor) -> torch.Tensor:
    """values.sum(), the same bits for any number of CPU threads: chunks of 16384 elements summed row-wise, then
    their sums, until one chunk is left (other devices: torch.sum, whose order does not depend on the CPU threads)."""
    values = values.reshape(-1)
    if values.device.type != "cpu":
        return values.sum()
    while values.numel() > _FIXED_ORDER_CHUNK:
        rows = values.numel() // _FIXED_ORDER_CHUNK
        head = values[:rows * _FIXED_ORDER_CHUNK].view(rows, _FIXED_ORDER_CHUNK).sum(1)
        values = torch.cat([head, values[rows * _FIXED_ORDER_CHUNK:].sum().reshape(1)])
    return values.sum()


def mean(total: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """total / denominator, NaN when the denominator is 0 as in PyTorch: its "mean" cross-entropy is the weighted
    NLL mean (0 / 0 then) plus the smoothing term, so a smoothing term does not make it +-inf."""
    return (total / denominator).masked_fill(denominator == 0, float("nan"))


def reduce_pixel_losses(loss: torch.Tensor, denom_weight: torch.Tensor, reduction: str) -> torch.Tensor:
    """F.cross_entropy's reductions of per-pixel losses (or of partial sums of them): "mean" divides by the summed
    class weights of the pixels that are not ignored (their count without weights), so an all-ignored mean is
    NaN, as in PyTorch. Sums are bitwise independent of the CPU thread count."""
    if reduction == "none":
        return loss
    total = sum_in_fixed_order(loss)
    if reduction == "sum":
        return total
    return mean(total, sum_in_fixed_order(denom_weight))


def make_loss_backward(op: str, backward_op, handed_on=lambda ctx: ()):
    """The autograd backward of a fused loss whose setup_context saved (input, target, weight, lse, denom) and set
    ``ctx.args`` (the backward op's arguments after those tensors) and ``ctx.num_args`` (how many inputs the forward
    took). ``backward_op`` is the custom backward op (the registered autograd) or its implementation (the eager
    Function, fcn_fast/ops/_eager.py). ``handed_on(ctx)`` gives tensors kept on ctx apart from the saved ones, passed
    after them. A gradient taken with create_graph=True raises, naming ``op``, when differentiated."""

    def backward(ctx, grad, *_grads_of_saved_outputs):
        grad_input = None
        if ctx.needs_input_grad[0] and grad is not None:  # None: set_materialize_grads(False) and no loss gradient
            saved = ctx.saved_tensors
            grad_input = backward_op(grad, *saved, *handed_on(ctx), *ctx.args)
            if torch.is_grad_enabled():  # create_graph=True
                grad_input, = _eager.forbid_double_backward(op, (grad_input,), (grad, saved[0]))
        return grad_input, *([None] * (ctx.num_args - 1))

    return backward


def loss_repr(loss, *, first: Sequence[str] = (), shown: Sequence[str] = (), flags: Sequence[str] = ()) -> str:
    """``extra_repr`` of a cross-entropy loss module: ``first``, its ignore_index and reduction, ``shown``, then what
    differs from the defaults (weight, label_smoothing, ``flags``, backend)."""
    parts = [*first, f"ignore_index={loss.ignore_index}", f"reduction={loss.reduction!r}", *shown]
    if loss.weight is not None:
        parts.append(f"weight=Tensor[{loss.weight.shape[0]}]")
    if loss.label_smoothing:
        parts.append(f"label_smoothing={loss.label_smoothing}")
    parts += flags
    if loss.backend is not None:
        parts.append(f"backend={loss.backend!r}")
    return ", ".join(parts)

"""The eager path of the fused ops: the registered custom op's own implementation, setup_context and backward, run as
a plain ``torch.autograd.Function``.

Every op is a ``torch.library.custom_op`` (fake kernel, registered autograd, opcheck), and that is what torch.compile
and torch.export trace: one opaque node. In eager mode, though, a call through the custom op's Python autograd and
dispatch layers cost ~0.25 ms per forward+backward on the CPU (measured: a 16x16 -> 34x34 upsample_add step took
~390 us through the custom op, ~180 us through this Function, ~480 us as eager PyTorch), which is most of the time
of the small FCN calls. So the public functions take this path when nothing is tracing them and the tensors are
plain CPU/CUDA tensors, and the custom op otherwise (tracing, meta or fake tensors, tensor subclasses). Both paths
run the same functions; tests check that they agree bitwise. Under torch.func transforms (grad, vmap) a third
Function runs the custom op (``transform_function``).

Autocast and double backward are handled here too, once for every path: ``autocast_float32``/``autocast_promote``
apply autocast's policies to the inputs, ``forbid_double_backward`` makes a gradient taken with create_graph=True
raise when differentiated.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch._C._functorch import TransformType
from torch._functorch import pyfunctorch

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain(tensors) -> bool:
    return all(t is None or (type(t) in _PLAIN_TYPES and t.device.type in ("cpu", "cuda")) for t in tensors)


def takes_eager_path(*tensors: Optional[torch.Tensor]) -> bool:
    """True outside torch.compile/export tracing and torch.func transforms when every tensor is a plain CPU or CUDA
    tensor."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return _plain(tensors)


def runner(eager: Callable, transformed: Callable, traced: Callable, *tensors: Optional[torch.Tensor]) -> Callable:
    """What runs a differentiable op's call on ``tensors``: ``eager`` (the Function below) for untraced calls on
    plain tensors, ``transformed`` (``transform_function``) under torch.func transforms, and ``traced`` (the custom
    op) otherwise: while torch.compile/export traces, and for meta, fake or subclassed tensors."""
    if torch.compiler.is_compiling():
        return traced
    if torch._C._are_functorch_transforms_active():
        return transformed
    return eager if _plain(tensors) else traced


def autograd_function(name: str, forward: Callable, setup_context: Callable, backward: Callable):
    """``torch.autograd.Function`` subclass running the custom op's implementation ``forward(*inputs)`` and the
    setup_context(ctx, inputs, output) / backward(ctx, *grads) registered with the custom op.

    The old-style forward(ctx, *inputs) on purpose: a Function that defines setup_context has its arguments bound
    with inspect.signature on every call, which alone cost as much as the small kernels."""

    def run(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(run),
        "backward": staticmethod(backward),
    })


def transform_function(name: str, op: str, custom_op: Callable, setup_context: Callable, backward: Callable):
    """``torch.autograd.Function`` subclass running the custom op with its registered setup_context and backward,
    in the form torch.func transforms take: forward without ctx, setup_context, and a vmap rule generated from them.

    The custom op's own autograd is an old-style Function, which torch.func.grad refuses. Under vmap the forward
    and backward custom ops run once per sample (``register_per_sample_vmap``), on plain tensors: every backend
    works, and the label checks and the CPU loss's incoming-gradient test read plain values.
    Backward runs without grad mode (torch.func.grad asks for create_graph=True, which the backward op's inputs
    would otherwise carry into an autograd Function of their own); a second grad transform around it, which would
    differentiate the gradient, gets an error naming ``op``."""

    def run(*inputs):
        return custom_op(*inputs)

    def run_backward(ctx, *grads):
        levels = [i.key() for i in pyfunctorch.retrieve_all_functorch_interpreters()]
        if sum(k in (TransformType.Grad, TransformType.Jvp) for k in levels) > 1:
            raise RuntimeError(double_backward_error(op))
        with torch.no_grad():
            return backward(ctx, *grads)

    def jvp(ctx, *tangents):
        raise NotImplementedError(f"{op}: forward-mode AD (torch.func.jvp, jacfwd, hessian) is not supported; "
                                  f"reverse mode (torch.func.grad, vjp, jacrev) is")

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(run),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(run_backward),
        "jvp": staticmethod(jvp),
        "generate_vmap_rule": True,
    })


def register_per_sample_vmap(custom_op) -> None:
    """A vmap rule for ``custom_op`` that runs it once per sample on plain tensors and stacks the results: what
    PyTorch's fallback for ops without a batching rule does, without its performance warning on every call."""

    def rule(info, in_dims, *args):
        def run(pick):
            return custom_op(*[a if d is None else pick(a, d) for a, d in zip(args, in_dims)])

        if info.batch_size:
            samples = [run(lambda a, d: a.select(d, i)) for i in range(info.batch_size)]
            tuples = isinstance(samples[0], tuple)
            outputs = [torch.stack(parts) for parts in zip(*samples)] if tuples else [torch.stack(samples)]
        else:  # an empty batch: the outputs' shapes from one sample of zeros
            sample = run(lambda a, d: a.new_zeros(a.shape[:d] + a.shape[d + 1:]))
            tuples = isinstance(sample, tuple)
            outputs = [o.new_empty((0, *o.shape)) for o in (sample if tuples else (sample,))]
        return (tuple(outputs), (0,) * len(outputs)) if tuples else (outputs[0], 0)

    custom_op.register_vmap(rule)


def double_backward_error(op: str) -> str:
    return (f"{op}: double backward is not supported: its gradient was taken with create_graph=True (or inside "
            f"another torch.func transform) and is being differentiated, but {op}'s backward is not differentiable")


class _Undifferentiable(torch.autograd.Function):
    """The gradients it is given, as they are, with a grad_fn (reaching ``depends_on``) that raises when run."""

    @staticmethod
    def forward(ctx, op, num_grads, *tensors):
        ctx.op = op
        return tuple(t.view_as(t) for t in tensors[:num_grads])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(double_backward_error(ctx.op))


def forbid_double_backward(op: str, grads: Tuple[Optional[torch.Tensor], ...],
                           depends_on: Tuple[Optional[torch.Tensor], ...]) -> Tuple[Optional[torch.Tensor], ...]:
    """``grads`` as a backward returns them, computed from ``depends_on`` (the incoming gradient and the saved
    inputs). Under ``create_graph=True`` (grad mode on during backward) and when one of those requires grad, they
    get a grad_fn that raises, naming ``op``, if anything differentiates them: the backward kernels are not
    differentiable, and a gradient without grad_fn would pass for a constant (a silently wrong second derivative)."""
    if not torch.is_grad_enabled():
        return grads
    sources = [t for t in depends_on if t is not None and t.requires_grad]
    tensors = [g for g in grads if g is not None]
    if not sources or not tensors:
        return grads
    wrapped = iter(_Undifferentiable.apply(op, len(tensors), *tensors, *sources))
    return tuple(None if g is None else next(wrapped) for g in grads)


def _autocast_on(device_type: str) -> bool:
    # Autocast always exists for "cpu" and "cuda": not asking for those keeps this traceable by Dynamo before torch
    # 2.13, which cannot trace torch.amp.is_autocast_available.
    if device_type not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


def autocast_float32(t: torch.Tensor) -> torch.Tensor:
    """Inside autocast for ``t``'s device: a float16/bfloat16 ``t`` as float32 (autocast's float32 policy, the one
    F.cross_entropy follows); ``t`` itself otherwise."""
    if t.dtype in (torch.float16, torch.bfloat16) and _autocast_on(t.device.type):
        return t.float()
    return t


def autocast_promote(a: torch.Tensor, b: Optional[torch.Tensor]):
    """Inside autocast for ``a``'s device: ``a`` and ``b`` of different float dtypes both in the wider one
    (autocast's promote policy, as for torch.cat; the eager composition's ``up(x) + skip`` promotes too)."""
    if b is None or a.dtype == b.dtype or not (a.is_floating_point() and b.is_floating_point()):
        return a, b
    if not _autocast_on(a.device.type):
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)

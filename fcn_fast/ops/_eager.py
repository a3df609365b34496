"""The eager path of the fused ops: the registered custom op's own implementation, setup_context and backward, run as
a plain ``torch.autograd.Function``.

Every op is a ``torch.library.custom_op`` (fake kernel, registered autograd, opcheck), and that is what torch.compile
and torch.export trace: one opaque node. In eager mode, though, a call through the custom op's Python autograd and
dispatch layers cost ~0.25 ms per forward+backward on the CPU (measured: a 16x16 -> 34x34 upsample_add step took
~390 us through the custom op, ~180 us through this Function, ~480 us as eager PyTorch), which is most of the time
of the small FCN calls. So the public functions take this path when nothing is tracing them and the tensors are
plain CPU/CUDA tensors, and the custom op otherwise (tracing, meta or fake tensors, tensor subclasses). Both paths
run the same functions; tests check that they agree bitwise.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def takes_eager_path(*tensors: Optional[torch.Tensor]) -> bool:
    """True outside torch.compile/export tracing when every tensor is a plain CPU or CUDA tensor."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or (type(t) in _PLAIN_TYPES and t.device.type in ("cpu", "cuda")) for t in tensors)


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

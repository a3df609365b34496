"""The eager path of the public ops (a plain autograd.Function, fcn_fast/ops/_eager.py) against the registered custom
op it stands in for: same outputs and gradients, bitwise, on every backend; and the custom op wherever something
traces the call (torch.compile, meta tensors)."""

from __future__ import annotations

import pytest
import torch

import fcn_fast
from fcn_fast.ops import _eager
from harness import backend_params, device_for

BACKENDS = backend_params()
# Triton's interpreter computes masked-out lanes of -inf/NaN tiles with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning")


def _inputs(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(2, 5, 6, 7, generator=gen).to(device)
    skip = torch.randn(2, 5, 17, 19, generator=gen).to(device)
    target = torch.randint(0, 5, (2, 12, 13), generator=gen)
    target[0, :2] = 255
    return coarse, skip, target.to(device)


# Each case: (public call, the same call through torch.ops.fcn_fast.<op>) on (coarse, skip, target, backend).
CASES = {
    "upsample_add": (
        lambda c, s, t, b: fcn_fast.upsample_add(c, s, factor=2, mode="deconv", out_size=(12, 13), skip_offset=(2, 3),
                                                 skip_scale=0.5, backend=b),
        lambda c, s, t, b: torch.ops.fcn_fast.upsample_add(c, s, 2, "deconv", 12, 13, 0, 0, 2, 3, 0.5, False, b),
    ),
    "softmax_cross_entropy": (
        lambda c, s, t, b: fcn_fast.softmax_cross_entropy(s[:, :, :12, :13], t, label_smoothing=0.1, backend=b),
        lambda c, s, t, b: torch.ops.fcn_fast.softmax_cross_entropy(s[:, :, :12, :13], t, None, 255, "mean", 0.1,
                                                                    True, True, b)[0],
    ),
    "upsample_cross_entropy": (
        lambda c, s, t, b: fcn_fast.upsample_cross_entropy(c, t, factor=2, offset=(1, 1), reduction="sum", backend=b),
        lambda c, s, t, b: torch.ops.fcn_fast.upsample_cross_entropy(c, t, None, 2, "deconv", 1, 1, False, 255, "sum",
                                                                     0.0, True, b)[0],
    ),
    "upsample_argmax": (
        lambda c, s, t, b: fcn_fast.upsample_argmax(c, factor=2, out_size=(12, 13), offset=(1, 1), backend=b),
        lambda c, s, t, b: torch.ops.fcn_fast.upsample_argmax(c, 2, "deconv", 12, 13, 1, 1, False, torch.int64, b),
    ),
}


@pytest.mark.parametrize("incoming", ["one", "random"])  # one: the CPU CE's gradient from the forward is handed on
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(CASES))
def test_eager_path_matches_the_custom_op(op, backend, incoming):
    public, through_op = CASES[op]
    results = []
    for call in (public, through_op):
        coarse, skip, target = _inputs(device_for(backend))
        differentiable = op != "upsample_argmax"
        coarse.requires_grad_(differentiable)
        skip.requires_grad_(differentiable)
        out = call(coarse, skip, target, backend)
        grads = []
        if differentiable:
            torch.manual_seed(1)
            out.backward(torch.ones_like(out) if incoming == "one" else torch.randn_like(out))
            grads = [t.grad if t.grad is not None else torch.zeros(()) for t in (coarse, skip)]
        results.append([out.detach(), *grads])
    for eager, custom in zip(*results):
        assert torch.equal(eager, custom)


def test_the_custom_op_is_what_tracing_sees():
    coarse, skip, _ = _inputs("cpu")
    assert _eager.takes_eager_path(coarse, skip, None)
    assert not _eager.takes_eager_path(coarse.to("meta"))
    seen = []

    def probe(x):
        seen.append(_eager.takes_eager_path(x))
        return fcn_fast.upsample_add(x, factor=2, mode="deconv", backend="reference")

    out = torch.compile(probe, backend="eager", fullgraph=True)(coarse)
    assert seen == [False]
    torch.testing.assert_close(out, fcn_fast.upsample_add(coarse, factor=2, mode="deconv", backend="reference"))
    # Meta tensors go through the custom op's fake kernel, as before there was an eager path.
    meta = fcn_fast.upsample_add(coarse.to("meta"), skip.to("meta")[:, :, :14, :16], factor=2, mode="deconv",
                                 backend="reference")
    assert meta.device.type == "meta" and meta.shape == (2, 5, 14, 16)

"""The Triton kernels' autotune configurations (triton_common.autotune): a GPU picks one by timing, the interpreter
runs only the first, so each one is run here on its own and must give the default's results: the same bits where a
kernel computes every element alike whatever its tile, the same values within rounding where a sum inside a tile
may associate differently. Reduced losses run the defaults whatever is tuned (their partial sums are per program)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import fcn_fast
from harness import assert_close, backend_params, device_for

# slow: every configuration under the interpreter takes about five minutes on two loaded cores.
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning")]

TRITON = [p for p in backend_params(include_reference=False) if p.id == "triton"]


@contextlib.contextmanager
def _only(kernels, config):
    """Every kernel in ``kernels`` runs ``config`` alone: what a GPU runs once tuning has chosen it."""
    saved = [(k.configs, k.cache) for k in kernels]
    try:
        for k in kernels:
            k.configs, k.cache = [config], {}
        yield
    finally:
        for k, (configs, cache) in zip(kernels, saved):
            k.configs, k.cache = configs, cache


def _run_each_config(configs, kernels, run):
    default = run()
    for config in configs[1:]:
        with _only(kernels, config):
            yield config, default, run()


def _grads(fn, *tensors, seed=0):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    return (out.detach(), *torch.autograd.grad(out, tensors, grad_out if out.dim() else None))


@pytest.mark.parametrize("backend", TRITON)
def test_upsample_add_configs(backend):
    from fcn_fast.ops import triton_upsample_add as module

    device = device_for(backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 5, 6, generator=gen).to(device)
    skip = torch.randn(1, 2, 23, 27, generator=gen).to(device)

    def run():
        return _grads(lambda x, s: fcn_fast.upsample_add(x, s, factor=4, skip_offset=(1, 2), backend=backend), x, skip)

    kernels = (module._forward_kernel, module._grad_x_kernel, module._grad_skip_kernel)
    for config, (out, gx, gs), (out_c, gx_c, gs_c) in _run_each_config(module.CONFIGS, kernels, run):
        assert torch.equal(out_c, out), config
        assert torch.equal(gs_c, gs), config
        assert_close(gx_c, gx, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_softmax_cross_entropy_configs(backend, reduction):
    from fcn_fast.ops import triton_cross_entropy as module

    device = device_for(backend)
    gen = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(2, 5, 7, 9, generator=gen)).to(device)
    target = torch.randint(0, 5, (2, 7, 9), generator=gen).to(device)
    target[0, 0] = 255

    def run():
        return _grads(lambda z: fcn_fast.softmax_cross_entropy(z, target, reduction=reduction, label_smoothing=0.1,
                                                               backend=backend), logits)

    kernels = (module._forward_kernel, module._backward_kernel)
    for config, default, tuned in _run_each_config(module.CONFIGS, kernels, run):
        for a, b in zip(tuned, default):
            assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_upsample_cross_entropy_configs(backend, reduction):
    from fcn_fast.ops import triton_upsample_cross_entropy as module

    device = device_for(backend)
    gen = torch.Generator().manual_seed(2)
    coarse = torch.randn(2, 3, 4, 5, generator=gen).to(device)
    target = torch.randint(0, 3, (2, 13, 17), generator=gen).to(device)

    def run():
        loss, grad = _grads(lambda c: fcn_fast.upsample_cross_entropy(c, target, factor=4, reduction=reduction,
                                                                      label_smoothing=0.1, backend=backend), coarse)
        labels = fcn_fast.upsample_argmax(coarse, factor=4, out_size=(13, 17), backend=backend)
        return loss, grad, labels

    kernels = (module._forward_kernel, module._argmax_kernel)
    for config, default, tuned in _run_each_config(module.CONFIGS, kernels, run):
        assert_close(tuned[0], default[0], rtol=1e-6, atol=1e-6)
        assert torch.equal(tuned[2], default[2]), config
    backward = (module._backward_kernel,)
    for config, default, tuned in _run_each_config(module.BACKWARD_CONFIGS, backward, run):
        assert_close(tuned[1], default[1], rtol=1e-6, atol=1e-6)

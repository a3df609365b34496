"""The Triton upsample-CE kernels' choice between int32 and int64 positions inside one image, decided on the host:
checked without allocating 2**31 elements, by the decision function and by running the int64 kernels on small
inputs (the threshold lowered), which must give the int32 kernels' results bit for bit."""

from __future__ import annotations

import pytest
import torch

import fcn_fast
from harness import backend_params, device_for

pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning")

TRITON = [p for p in backend_params(include_reference=False) if p.id == "triton"]


@pytest.fixture
def kernels():
    pytest.importorskip("triton")
    from fcn_fast.ops import triton_upsample_cross_entropy

    return triton_upsample_cross_entropy


def test_int64_positions_from_2_31(kernels):
    limit = 2**31 - 1
    assert not kernels._index_64(500 * 500, 63 * 63, block=128)
    assert not kernels._index_64(limit - 128, 10, block=128)
    assert kernels._index_64(limit - 127, 10, block=128)  # the last block's rounded-up positions pass int32
    assert kernels._index_64(46341 * 46341, 10, block=16)  # output pixels of one image
    assert kernels._index_64(10, 2**31, block=16)  # coarse pixels of one image (interp mode can downsample)


def test_too_many_programs_is_refused(kernels):
    kernels._check_programs("upsample_cross_entropy", 2**31 - 1, 1, 2**31 - 1)
    with pytest.raises(ValueError, match=r"upsample_cross_entropy: .* 2147483648 programs \(2 images x "
                                         r"1073741824 blocks\)"):
        kernels._check_programs("upsample_cross_entropy", 2**31, 2, 2**30)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("mode", ["deconv", "interp"])
def test_int64_kernels_equal_the_int32_kernels(backend, mode, kernels, monkeypatch):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(2, 3, 5, 6, generator=gen)
    target = torch.randint(0, 3, (2, 17, 19), generator=gen)
    geometry = dict(factor=4, mode=mode)

    def run():
        x = coarse.to(device).requires_grad_()
        loss = fcn_fast.upsample_cross_entropy(x, target.to(device), reduction="none", label_smoothing=0.1,
                                               backend=backend, **geometry)
        (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
        labels = fcn_fast.upsample_argmax(x.detach(), out_size=(17, 19), backend=backend, **geometry)
        return loss.detach(), grad, labels

    narrow = run()
    monkeypatch.setattr(kernels, "POSITION_LIMIT", 16)  # every image now takes the int64 path
    assert kernels._index_64(17 * 19, 5 * 6, block=16)
    wide = run()
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)

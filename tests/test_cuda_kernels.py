"""The CUDA kernels' tiled designs (docs/cuda-kernels.md) on the emulated CUDA backend, against the float64 reference:
the shapes their tiling has edges at (factors 1 to 32, widths that are not a multiple of the 256-thread block, column
windows over several shared-memory chunks, rows and planes over several blocks), half precision, and the emulator's
knobs (a one-block grid, so every block-stride loop wraps; the int64 index path). Every call runs under the two
thread schedules and must agree bitwise (fcn_fast/_emulator.py)."""

from __future__ import annotations

import pytest
import torch

import fcn_fast
from fcn_fast import _emulator, _extension
from harness import assert_close

pytestmark = pytest.mark.skipif(not _extension.emulated_built(),
                                reason="fcn_fast._C_emu is not built (FCN_FAST_BUILD_EMULATED=1)")

BACKEND = "cuda_emulated"
KNOBS = {"default": {}, "one_block": {"max_blocks": 1}, "int64": {"int64_indices": True}}
# (factor, coarse h, coarse w): factor 1; widths of 150/300/620 output columns (not multiples of 256); a factor-8
# window of 256 input columns spans 2056 output columns (three 1024-column chunks); factor 32 with few columns.
SHAPES = [(1, 5, 300), (2, 4, 150), (8, 3, 40), (8, 2, 300), (32, 2, 3)]
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    grad_out = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape).to(out.dtype)
    (out * grad_out).sum().backward() if out.dim() else out.backward()
    return out.detach(), [t.grad for t in tensors]


# Every shape in fp32 and bf16 on the default grid; the knobs (the emulator is slow) on factors 2 and 8 in fp32.
_ADD_CASES = ([(*shape, dtype, "default") for shape in SHAPES for dtype in (torch.float32, torch.bfloat16)]
              + [(*shape, torch.float32, knob) for shape in SHAPES if shape[0] in (2, 8) for knob in KNOBS
                 if knob != "default"])


@pytest.mark.parametrize("factor,h,w,dtype,knob", _ADD_CASES)
def test_upsample_add_tiles(factor, h, w, dtype, knob):
    gen = torch.Generator().manual_seed(factor * 100 + w)
    x = torch.randn(1, 2, h, w, generator=gen).to(dtype)
    out_hw = (h * factor - 1, w * factor - 3) if factor > 1 else (h, w)
    skip = torch.randn(1, 2, out_hw[0] + 2, out_hw[1] + 5, generator=gen).to(dtype)
    kwargs = dict(factor=factor, mode="deconv" if factor > 1 else "interp", out_size=out_hw, skip_offset=(1, 2))

    def fused(x, skip):
        return fcn_fast.upsample_add(x, skip, backend=BACKEND, **kwargs)

    def reference(x, skip):
        return fcn_fast.upsample_add(x.double(), skip.double(), backend="reference", **kwargs)

    with _emulator.options(**KNOBS[knob]):
        out, (gx, gs) = _grads(fused, x, skip)
    ref, (rx, rs) = _grads(reference, x, skip)
    rtol, atol = TOL[dtype]
    assert_close(out.double(), ref, rtol=rtol, atol=atol)
    assert_close(gx.double(), rx, rtol=rtol, atol=atol * factor * factor)
    assert_close(gs.double(), rs, rtol=rtol, atol=atol)


# Every factor on the default grid; the knobs on factor 8.
_UCE_CASES = [(*shape, knob) for shape in SHAPES if shape[0] > 1 for knob in KNOBS
              if knob == "default" or shape[0] == 8]


@pytest.mark.parametrize("factor,h,w,knob", _UCE_CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_upsample_cross_entropy_tiles(factor, h, w, reduction, knob):
    gen = torch.Generator().manual_seed(factor * 10 + w)
    coarse = 3 * torch.randn(2, 3, h, w, generator=gen)
    out_hw = (h * factor - 2, w * factor - 1)
    target = torch.randint(0, 3, (2, *out_hw), generator=gen)
    target[:, ::7, ::5] = 255
    kwargs = dict(factor=factor, mode="deconv", offset=(1, 0), reduction=reduction, label_smoothing=0.1)

    def fused(c):
        return fcn_fast.upsample_cross_entropy(c, target, backend=BACKEND, **kwargs)

    def reference(c):
        return fcn_fast.upsample_cross_entropy(c.double(), target, backend="reference", **kwargs)

    with _emulator.options(**KNOBS[knob]):
        loss, (grad,) = _grads(fused, coarse)
        labels = fcn_fast.upsample_argmax(coarse, factor=factor, out_size=out_hw, offset=(1, 0), backend=BACKEND)
    ref_loss, (ref_grad,) = _grads(reference, coarse)
    assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    ref_labels = fcn_fast.upsample_argmax(coarse.double(), factor=factor, out_size=out_hw, offset=(1, 0),
                                          backend="reference")
    assert torch.equal(labels, ref_labels)


# Every reduction in fp32 and fp16 on the default grid; the knobs in fp32 on "mean" and "none".
_CE_CASES = ([(reduction, dtype, "default") for reduction in ("mean", "sum", "none")
              for dtype in (torch.float32, torch.float16)]
             + [(reduction, torch.float32, knob) for reduction in ("mean", "none") for knob in KNOBS
                if knob != "default"])


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nc"])
@pytest.mark.parametrize("reduction,dtype,knob", _CE_CASES)
def test_softmax_cross_entropy_pixel_groups(layout, reduction, dtype, knob):
    """Images of 1030 pixels: a group of 4 x 256 pixels per block and a second, almost empty, one."""
    gen = torch.Generator().manual_seed(3)
    if layout == "nc":
        logits = 3 * torch.randn(1030, 5, generator=gen)
        target = torch.randint(0, 5, (1030,), generator=gen)
    else:
        logits = 3 * torch.randn(3, 5, 10, 103, generator=gen)
        target = torch.randint(0, 5, (3, 10, 103), generator=gen)
        if layout == "channels_last":
            logits = logits.to(memory_format=torch.channels_last)
    target.view(-1)[::9] = 255
    logits = logits.to(dtype)

    def fused(z):
        return fcn_fast.softmax_cross_entropy(z, target, reduction=reduction, backend=BACKEND)

    def reference(z):
        return fcn_fast.softmax_cross_entropy(z.double(), target, reduction=reduction, backend="reference")

    with _emulator.options(**KNOBS[knob]):
        loss, (grad,) = _grads(fused, logits)
    ref_loss, (ref_grad,) = _grads(reference, logits)
    rtol, atol = TOL[dtype]
    assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)

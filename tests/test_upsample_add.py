"""upsample_add against the PyTorch code it replaces (F.conv_transpose2d with FCN's bilinear kernel or
F.interpolate, crop, scaled skip add), through the shared op tester (tests/op_tester.py); then what is particular to
this op: which gradients are computed, the skip's gradient, the module, and the Python errors for bad input
(backend selection: test_backends.py)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import fcn_fast
from fcn_fast.nn import UpsampleAdd
from harness import assert_close, backend_params, device_for
from op_tester import OpTester, Sample, choose, draw_values, finite_abs, integer

NATIVE_BACKENDS = backend_params(include_reference=False)
ALL_BACKENDS = backend_params()


# ---- the reference: plain PyTorch ------------------------------------------------------------------------------------

def caffe_bilinear_kernel(channels: int, factor: int, dtype: torch.dtype) -> torch.Tensor:
    """FCN's fixed deconvolution weight (Caffe's "bilinear" filler), depthwise: (C, 1, K, K), K = 2f - f % 2."""
    size = 2 * factor - factor % 2
    f = (size + 1) // 2
    center = f - 1 if size % 2 == 1 else f - 0.5
    filt = 1 - (torch.arange(size, dtype=torch.float64) - center).abs() / f
    return (filt[:, None] * filt[None, :]).to(dtype).expand(channels, 1, size, size)


def deconv_size(in_size: int, factor: int) -> int:
    return (in_size - 1) * factor + 2 * factor - factor % 2


def upsample_reference(x: torch.Tensor, *, factor: int, mode: str = "interp", out_size: Optional[Sequence[int]] = None,
                       offset=(0, 0), align_corners: bool = False) -> torch.Tensor:
    """What FCN code writes: the fixed bilinear F.conv_transpose2d then a crop, or F.interpolate."""
    h, w = x.shape[-2:]
    if mode == "interp":
        size = tuple(out_size) if out_size is not None else (h * factor, w * factor)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    full = F.conv_transpose2d(x, caffe_bilinear_kernel(x.shape[1], factor, x.dtype), stride=factor, groups=x.shape[1])
    oy, ox = offset
    oh, ow = out_size if out_size is not None else (full.shape[2] - oy, full.shape[3] - ox)
    return full[:, :, oy:oy + oh, ox:ox + ow]


def upsample_add_reference(x, skip=None, *, factor, mode="interp", out_size=None, offset=(0, 0), skip_offset=(0, 0),
                           skip_scale=1.0, align_corners=False):
    out = upsample_reference(x, factor=factor, mode=mode, out_size=out_size, offset=offset,
                             align_corners=align_corners)
    if skip is not None:
        (sy, sx), (h, w) = skip_offset, out.shape[-2:]
        out = out + skip_scale * skip[:, :, sy:sy + h, sx:sx + w]
    return out


def onednn_bfloat16_spreads_nan(backend: str, dtype: torch.dtype, x: torch.Tensor, mode: str) -> Optional[str]:
    """PyTorch's bfloat16 depthwise F.conv_transpose2d on the CPU (oneDNN) turns a NaN or inf of one channel into NaN
    in other channels (``torch.backends.mkldnn.enabled = False`` does not): the reference backend runs it."""
    if backend == "reference" and dtype == torch.bfloat16 and mode == "deconv" and not x.to(dtype).isfinite().all():
        return "PyTorch's bfloat16 depthwise conv_transpose2d (oneDNN) spreads NaN/inf across channels"
    return None


def out_hw(in_hw, factor, mode, out_size=None, offset=(0, 0), **_):
    if out_size is not None:
        return tuple(out_size)
    if mode == "interp":
        return in_hw[0] * factor, in_hw[1] * factor
    return deconv_size(in_hw[0], factor) - offset[0], deconv_size(in_hw[1], factor) - offset[1]


def crop_edges(in_size: int, out_size: int, factor: int, mode: str, offset: int):
    """The input rows (or columns) the first and last output rows read: where a crop border meets the input."""
    if mode == "interp":
        return [0, 1, in_size - 2, in_size - 1]
    rows = []
    for o in (offset, offset + out_size - 1):
        rows += [o // factor, o // factor - 1]
    return rows


def draw_geometry(draw, small: bool):
    """(in_hw, options) of an upsampling: factors 1-32 (1-4 under the interpreter), offsets and out sizes at their
    limits (0, the last one) or anywhere, H or W of 1, downsampling interp too."""
    mode = choose(draw, ("deconv", "interp"))
    if small:
        factor = integer(draw, 1, 4)
    else:
        factor = choose(draw, (integer(draw, 1, 4), choose(draw, (8, 16, 32)), integer(draw, 1, 32)))
    # Small: the reference's transposed convolution costs K^2 per input pixel, the interpreter far more.
    max_in = 1 if small and factor > 2 else 3 if small else 2 if factor > 8 else 5
    h, w = integer(draw, 1, max_in), integer(draw, 1, max_in)
    max_out = 12 if small else 40
    options = dict(factor=factor, mode=mode)
    if mode == "deconv":
        offset, size = [], []
        for full in (deconv_size(h, factor), deconv_size(w, factor)):
            o = choose(draw, (0, full - 1, integer(draw, 0, full - 1)))
            room = min(full - o, max_out)
            size.append(choose(draw, (room, 1, integer(draw, 1, room))))
            offset.append(o)
        options.update(offset=tuple(offset), out_size=tuple(size))
    else:
        options["align_corners"] = draw(st.booleans())
        if h * factor <= max_out and w * factor <= max_out and draw(st.booleans()):
            options["out_size"] = None  # the default, (h * factor, w * factor)
        else:
            options["out_size"] = (integer(draw, 1, min(max_out, h * factor + 3)),
                                   integer(draw, 1, min(max_out, w * factor + 3)))
    return (h, w), options


# ---- the tester ----------------------------------------------------------------------------------------------------

def case(id, x_shape, factor, mode="interp", skip_hw=None, tiny=True, seed=0, **options) -> Sample:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64)
    skip = None if skip_hw is None else torch.randn(*x_shape[:2], *skip_hw, generator=gen, dtype=torch.float64)
    return Sample(id, dict(x=x, skip=skip), dict(factor=factor, mode=mode, **options), tiny=tiny)


SAMPLES = [
    case("1x1-interp-f1", (2, 3, 1, 1), 1, skip_hw=(1, 1)),
    case("1x1-deconv-f32", (1, 2, 1, 1), 32, "deconv", skip_hw=(70, 66), skip_offset=(3, 1), skip_scale=0.5),
    case("7x13-interp-f2", (2, 3, 7, 13), 2, skip_hw=(16, 30), skip_offset=(1, 3), skip_scale=-0.75),
    case("7x13-interp-f2-noskip", (2, 3, 7, 13), 2),
    case("7x13-deconv-f2-crop", (2, 3, 7, 13), 2, "deconv", out_size=(10, 20), offset=(1, 2), skip_hw=(12, 23),
         skip_offset=(2, 1), skip_scale=0.01),
    case("7x13-deconv-f2-crop-noskip", (2, 3, 7, 13), 2, "deconv", out_size=(10, 20), offset=(1, 2)),
    case("5x6-deconv-f3", (1, 2, 5, 6), 3, "deconv", skip_hw=(17, 20)),
    case("4x4-deconv-f8-crop4", (1, 2, 4, 4), 8, "deconv", out_size=(20, 24), offset=(4, 4)),
    case("2x3-deconv-f16", (1, 2, 2, 3), 16, "deconv", offset=(7, 9), skip_hw=(44, 60), skip_offset=(1, 2),
         skip_scale=2.0),
    case("2x3-deconv-f16-noskip", (1, 2, 2, 3), 16, "deconv", offset=(7, 9)),
    case("3x2-interp-f8-align", (1, 2, 3, 2), 8, align_corners=True, skip_hw=(24, 16)),
    case("9x7-interp-down", (1, 3, 9, 7), 1, out_size=(5, 4), skip_hw=(6, 4), skip_offset=(1, 0)),
    case("6x5-interp-f4-size", (1, 2, 6, 5), 4, out_size=(21, 19)),
    case("empty-batch", (0, 3, 7, 13), 2, "deconv", out_size=(10, 20), offset=(1, 2), skip_hw=(12, 23)),
    case("fcn8s-upscore2", (1, 21, 16, 16), 2, "deconv", skip_hw=(44, 44), skip_offset=(5, 5), skip_scale=0.01,
         tiny=False),
    case("fcn8s-upscore8", (1, 3, 70, 70), 8, "deconv", out_size=(500, 500), offset=(31, 31), tiny=False),
    case("63x65-interp-f4", (1, 2, 63, 65), 4, skip_hw=(252, 260), tiny=False),
    case("63x65-deconv-f2", (2, 2, 63, 65), 2, "deconv", skip_hw=(130, 134), skip_offset=(2, 1), skip_scale=0.3,
         tiny=False),
]


def with_values(sample: Sample, id: str, x=None, skip=None, **options) -> Sample:
    """``sample`` with x (and skip) changed by the given functions of their values."""
    tensors = dict(sample.tensors)
    if x is not None:
        tensors["x"] = x(tensors["x"].clone())
    if skip is not None:
        tensors["skip"] = skip(tensors["skip"].clone())
    return Sample(id, tensors, {**sample.options, **options}, sample.tiny)


def _set(index, value):
    def change(t):
        t[index] = value
        return t
    return change


INF, NAN = math.inf, math.nan
DECONV = case("deconv", (1, 3, 4, 4), 2, "deconv", out_size=(7, 8), offset=(1, 0), skip_hw=(9, 9),
              skip_offset=(1, 1), skip_scale=0.5)
DECONV3 = case("deconv3", (1, 2, 3, 3), 3, "deconv", skip_hw=(12, 13), skip_offset=(1, 2))
INTERP = case("interp", (1, 3, 3, 4), 2, skip_hw=(7, 9), skip_offset=(1, 1))
ALIGNED = case("aligned", (1, 2, 3, 3), 2, out_size=(5, 5), align_corners=True)
SPECIAL_SAMPLES = [
    # A class masked with -inf: -inf wherever the class is upsampled, never NaN (a missing tap adds nothing).
    with_values(DECONV, "deconv-class-neg-inf", x=_set((slice(None), 2), -INF)),
    with_values(DECONV3, "deconv-f3-class-neg-inf", x=_set((slice(None), 0), -INF)),
    with_values(case("deconv-f1", (1, 2, 3, 3), 1, "deconv"), "deconv-f1-inf-point", x=_set((0, 1, 1, 1), INF)),
    with_values(DECONV, "deconv-corner-inf", x=_set((0, 0, 0, 0), INF)),
    with_values(DECONV, "deconv-last-corner-neg-inf", x=_set((0, 2, 3, 3), -INF)),
    with_values(DECONV, "deconv-inf-meets-neg-inf", x=lambda t: _set((0, 1, 1, 2), -INF)(_set((0, 1, 1, 1), INF)(t))),
    with_values(DECONV, "deconv-nan-point", x=_set((0, 1, 2, 1), NAN)),
    with_values(INTERP, "interp-class-neg-inf", x=_set((slice(None), 1), -INF)),
    with_values(INTERP, "interp-corner-inf", x=_set((0, 0, 0, 0), INF)),
    with_values(INTERP, "interp-last-corner-inf", x=_set((0, 2, 2, 3), INF)),
    with_values(ALIGNED, "interp-aligned-inf-point", x=_set((0, 1, 1, 1), INF)),
    with_values(INTERP, "interp-nan-point", x=_set((0, 0, 1, 2), NAN)),
    # PyTorch computes the source index scale * (o + 0.5) - 0.5 with one rounding (a fused multiply-add): at
    # output row 1 of 2 -> 6 its weight for row 1 is 2^-26, not 0, so a class masked with -inf stays -inf there.
    with_values(case("interp-2x2-to-6x5", (1, 2, 2, 2), 3, out_size=(6, 5)), "interp-source-index-rounding",
                x=_set((0, 0), -INF)),
    with_values(DECONV, "skip-inf-nan-in-and-out-of-crop",
                skip=lambda t: _set((0, 0, 0, 0), NAN)(_set((0, 1, 1, 1), INF)(_set((0, 2, 8, 8), -INF)(t)))),
    with_values(DECONV, "skip-scale-zero-inf-skip", skip=_set((0, 0, 2, 2), INF), skip_scale=0.0),
    with_values(DECONV, "huge-1e30", x=lambda t: _set((0, 0, 1, 1), -1e30)(_set((0, 0, 0, 0), 1e30)(t))),
    with_values(DECONV, "max-3e38-overflows-with-skip", x=lambda t: t.fill_(3e38), skip=lambda t: t.fill_(3e38),
                skip_scale=2.0),
    with_values(INTERP, "all-equal-3e38", x=lambda t: t.fill_(-3e38)),
    with_values(DECONV, "subnormal", x=lambda t: t.sign() * 1e-39, skip=lambda t: t * 1e-39),
]


class TestUpsampleAdd(OpTester):
    differentiable = ("x", "skip")

    def op(self, backend, x, skip=None, **options):
        return fcn_fast.upsample_add(x, skip, backend=backend, **options)

    def reference(self, float_dtype, x, skip=None, **options):
        return upsample_add_reference(x, skip, **options)

    def samples(self):
        return SAMPLES

    def known_deviation(self, backend, dtype, sample):
        return onednn_bfloat16_spreads_nan(backend, dtype, sample.tensors["x"], sample.options["mode"])

    def layout_sample(self):
        return SAMPLES[4]

    def special_samples(self):
        return SPECIAL_SAMPLES

    def gradcheck_samples(self):
        # Small skips: gradcheck perturbs every input element.
        return [
            case("deconv-f2-crop", (1, 2, 3, 4), 2, "deconv", out_size=(6, 7), offset=(1, 1), skip_hw=(7, 9),
                 skip_offset=(1, 2), skip_scale=0.3),
            case("deconv-f4", (1, 1, 2, 2), 4, "deconv", skip_hw=(13, 12), skip_offset=(1, 0), skip_scale=-2.0),
            case("interp-f3-align", (1, 2, 3, 4), 3, align_corners=True, skip_hw=(10, 13), skip_offset=(1, 1),
                 skip_scale=0.5),
            case("interp-down", (1, 2, 5, 4), 1, out_size=(3, 7), skip_hw=(3, 7)),
        ]

    def thread_samples(self):
        return [case("deconv-f8", (2, 8, 40, 40), 8, "deconv", offset=(4, 4), skip_hw=(330, 330), tiny=False),
                case("interp-f4-channels", (2, 16, 30, 33), 4, skip_hw=(121, 133), skip_offset=(1, 1), tiny=False)]

    def scales(self, dtype, inputs, options, expected, grad_out, rounded_in_dtype):
        """Bilinear weights are not negative: the same composition on |x|, |skip|, |skip_scale| (and |grad_out|)
        bounds every term of each output (and gradient) element. Infinities and NaN count as 0: where they reach
        an output it is compared exactly."""
        absolute = {n: (None if t is None else finite_abs(t).requires_grad_(True)) for n, t in inputs.items()}
        opts = {**options, "skip_scale": abs(options.get("skip_scale", 1.0))}
        out = upsample_add_reference(absolute["x"], absolute["skip"], **opts)
        leaves = [t for t in absolute.values() if t is not None]
        grads = torch.autograd.grad(out, leaves, finite_abs(grad_out))
        return out.detach(), dict(zip([n for n, t in absolute.items() if t is not None], grads))

    def property_sample(self, draw, dtype, small):
        (h, w), options = draw_geometry(draw, small)
        n, c = integer(draw, 0, 2), integer(draw, 1, 2 if small else 4)
        oh, ow = out_hw((h, w), **options)
        edges = {2: crop_edges(h, oh, options["factor"], options["mode"], options.get("offset", (0, 0))[0]),
                 3: crop_edges(w, ow, options["factor"], options["mode"], options.get("offset", (0, 0))[1])}
        x = draw_values(draw, (n, c, h, w), dtype, edges)
        skip = None
        if draw(st.booleans()):
            margin = (integer(draw, 0, 3), integer(draw, 0, 3))
            sy, sx = integer(draw, 0, margin[0]), integer(draw, 0, margin[1])
            skip_edges = {2: [sy - 1, sy, sy + oh - 1, sy + oh], 3: [sx - 1, sx, sx + ow - 1, sx + ow]}
            skip = draw_values(draw, (n, c, oh + margin[0], ow + margin[1]), dtype, skip_edges)
            options.update(skip_offset=(sy, sx), skip_scale=choose(draw, (1.0, 0.5, -2.0, 0.01, 0.0)))
        return Sample("drawn", dict(x=x, skip=skip), options)

    def opcheck_calls(self, backend):
        x, skip = (t.to(device_for(backend)) for t in (SAMPLES[4].tensors["x"], SAMPLES[4].tensors["skip"]))
        x, skip = x.float().requires_grad_(), skip.float().requires_grad_()
        grad = torch.randn(x.shape[0], x.shape[1], 10, 20, device=x.device)
        return [
            (torch.ops.fcn_fast.upsample_add.default,
             (x, skip, 2, "deconv", 10, 20, 1, 2, 2, 1, 0.01, False, backend)),
            (torch.ops.fcn_fast.upsample_add_backward.default,
             (grad, 7, 13, skip.shape[2], skip.shape[3], 2, "deconv", 1, 2, 2, 1, 0.01, False, True, True, backend)),
        ]


# ---- gradients: only those asked for; the skip's -------------------------------------------------------------------

def _inputs(sample: Sample, device):
    x, skip = sample.tensors["x"], sample.tensors["skip"]
    return x.float().to(device), skip.float().to(device)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_grad_of_one_input_only(backend):
    """Only the gradients asked for are computed, and each equals its part of the full backward."""
    sample = SAMPLES[4]
    x, skip = _inputs(sample, device_for(backend))
    x.requires_grad_(True)
    skip.requires_grad_(True)
    grad_out = torch.randn(2, 3, 10, 20, generator=torch.Generator().manual_seed(1)).to(x.device)
    want_x, want_skip = torch.autograd.grad(fcn_fast.upsample_add(x, skip, backend=backend, **sample.options), [x, skip],
                                            grad_out)
    out = fcn_fast.upsample_add(x, skip.detach(), backend=backend, **sample.options)
    (grad_x,) = torch.autograd.grad(out, [x], grad_out)
    out = fcn_fast.upsample_add(x.detach(), skip, backend=backend, **sample.options)
    (grad_skip,) = torch.autograd.grad(out, [skip], grad_out)
    assert torch.equal(grad_x, want_x) and torch.equal(grad_skip, want_skip)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_whole_unscaled_skip_takes_the_output_gradient(backend):
    """A skip added whole (no crop, scale 1) gets the output's gradient itself, as autograd passes it through an add,
    not a copy; a scaled skip still gets its own tensor."""
    device = device_for(backend)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 5, 6, generator=gen).to(device).requires_grad_(True)
    skip = torch.randn(2, 3, 10, 12, generator=gen).to(device).requires_grad_(True)
    grad_out = torch.randn(2, 3, 10, 12, generator=gen).to(device)
    _, grad_skip = torch.autograd.grad(fcn_fast.upsample_add(x, skip, factor=2, backend=backend), [x, skip], grad_out)
    assert grad_skip.data_ptr() == grad_out.data_ptr()
    scaled = fcn_fast.upsample_add(x, skip, factor=2, skip_scale=0.5, backend=backend)
    _, grad_skip = torch.autograd.grad(scaled, [x, skip], grad_out)
    assert grad_skip.data_ptr() != grad_out.data_ptr() and torch.equal(grad_skip, grad_out * 0.5)

# ---- module -----------------------------------------------------------------------------------------------------------

def test_module_repr_and_forward():
    module = UpsampleAdd(factor=2, mode="deconv", skip_offset=(5, 5), skip_scale=0.01)
    assert repr(module) == "UpsampleAdd(factor=2, mode='deconv', skip_offset=(5, 5), skip_scale=0.01)"
    assert repr(UpsampleAdd(8, out_size=(64, 64), align_corners=True, backend="reference")) == (
        "UpsampleAdd(factor=8, mode='interp', out_size=(64, 64), align_corners=True, backend='reference')")
    x, skip = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 44, 44)
    want = fcn_fast.upsample_add(x, skip, factor=2, mode="deconv", skip_offset=(5, 5), skip_scale=0.01,
                                 backend="reference")
    assert_close(module(x, skip), want)


# ---- bad input: a Python error naming the argument, before any kernel ----------------------------------------------

def _bad_inputs():
    x, skip = torch.randn(1, 2, 4, 5), torch.randn(1, 2, 12, 14)
    deconv = dict(factor=2, mode="deconv")  # full output 10x12
    return [
        ("x-rank", (torch.randn(2, 4, 5), None, dict(factor=2)), ValueError, r"x must have 4 dimensions.*\(2, 4, 5\)"),
        ("x-not-tensor", ([[1.0]], None, dict(factor=2)), TypeError, "x must be a torch.Tensor"),
        ("x-int", (torch.ones(1, 2, 4, 5, dtype=torch.int64), None, dict(factor=2)), TypeError,
         "x must have dtype in.*int64"),
        ("x-empty-hw", (torch.randn(1, 2, 0, 5), None, dict(factor=2)), ValueError, r"x must have a spatial size.*0, 5"),
        ("skip-rank", (x, torch.randn(2, 8, 10), dict(factor=2)), ValueError, "skip must have 4 dimensions"),
        ("skip-batch", (x, torch.randn(2, 2, 8, 10), dict(factor=2)), ValueError,
         r"skip must have the N and C of x.*\(1, 2, 4, 5\).*\(2, 2, 8, 10\)"),
        ("skip-channels", (x, torch.randn(1, 3, 8, 10), dict(factor=2)), ValueError, "skip must have the N and C of x"),
        ("skip-dtype", (x, skip.double(), dict(factor=2)), TypeError, "x and skip must have one dtype.*float64"),
        ("skip-device", (x, torch.empty(1, 2, 8, 10, device="meta"), dict(factor=2)), ValueError,
         "x and skip must be on one device.*meta"),
        ("skip-int", (x, torch.ones(1, 2, 8, 10, dtype=torch.int32), dict(factor=2)), TypeError, "skip must have dtype"),
        ("skip-too-small", (x, torch.randn(1, 2, 7, 10), dict(factor=2)), ValueError,
         r"skip of \(7, 10\) is too small for an 8x10 crop"),
        ("skip-offset-out-of-range", (x, skip, dict(factor=2, skip_offset=(4, 5))), ValueError,
         r"too small for an 8x10 crop at skip_offset \(4, 5\)"),
        ("skip-offset-negative", (x, skip, dict(factor=2, skip_offset=(-1, 0))), ValueError,
         r"skip_offset\[0\] must be >= 0, got -1"),
        ("skip-offset-type", (x, skip, dict(factor=2, skip_offset=(1, 2, 3))), TypeError, "skip_offset must be"),
        ("skip-scale-type", (x, skip, dict(factor=2, skip_scale="0.1")), TypeError, "skip_scale must be a float"),
        ("factor-zero", (x, None, dict(factor=0)), ValueError, "factor must be >= 1, got 0"),
        ("factor-float", (x, None, dict(factor=2.5)), TypeError, r"factor must be an int, got 2\.5"),
        ("factor-bool", (x, None, dict(factor=True)), TypeError, "factor must be an int"),
        ("mode", (x, None, dict(factor=2, mode="nearest")), ValueError, "mode must be one of"),
        ("offset-negative", (x, None, dict(deconv, offset=(0, -2))), ValueError, r"offset\[1\] must be >= 0, got -2"),
        ("offset-out-of-range", (x, None, dict(deconv, offset=(10, 0))), ValueError,
         r"out_size .* at offset \(10, 0\) does not fit in the deconvolution output \(10, 12\)"),
        ("offset-interp", (x, None, dict(factor=2, offset=(1, 1))), ValueError, "offset applies to mode='deconv'"),
        ("out-size-too-large", (x, None, dict(deconv, out_size=(11, 12))), ValueError,
         r"out_size \(11, 12\) at offset \(0, 0\) does not fit in the deconvolution output \(10, 12\)"),
        ("out-size-crop-too-large", (x, None, dict(deconv, out_size=(8, 12), offset=(3, 1))), ValueError,
         r"out_size \(8, 12\) at offset \(3, 1\) does not fit"),
        ("out-size-zero", (x, None, dict(factor=2, out_size=(0, 4))), ValueError, r"out_size\[0\] must be >= 1"),
        ("align-corners-deconv", (x, None, dict(deconv, align_corners=True)), ValueError,
         "align_corners applies to mode='interp' only"),
    ]


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("x,skip,kwargs,error,message", [(*b[1], b[2], b[3]) for b in BAD_INPUTS],
                         ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=NATIVE_BACKENDS[0].marks)])
def test_bad_input(backend, x, skip, kwargs, error, message):
    with pytest.raises(error, match=message):
        fcn_fast.upsample_add(x, skip, backend=backend, **kwargs)


def test_bad_input_through_module():
    with pytest.raises(ValueError, match="skip must have the N and C of x"):
        UpsampleAdd(factor=2)(torch.randn(1, 2, 4, 5), torch.randn(1, 3, 8, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("align_corners", [False, True])
def test_interp_taps_are_pytorchs_bit_for_bit(dtype, align_corners):
    """Every tap weight equals what F.interpolate's CPU kernel uses (read off by interpolating one-hot rows), up- and
    downsampling: its source index rounded once (FMA) and floored in float32, also for float64 inputs."""
    from fcn_fast.ops._resample import _interp_taps

    for n in range(1, 24):
        for m in range(1, 150, 5):
            if m == n:
                continue
            one_hot = torch.eye(n, dtype=dtype).reshape(n, 1, n, 1).expand(n, 1, n, 3).contiguous()
            used = F.interpolate(one_hot, size=(m, 5), mode="bilinear", align_corners=align_corners)[:, 0, :, 0].T
            index, weight = _interp_taps(n, m, align_corners, dtype == torch.float64)
            ours = torch.zeros(m, n, dtype=torch.float64)
            for k in range(2):
                ours.index_put_((torch.arange(m), index[:, k]), weight[:, k], accumulate=True)
            assert torch.equal(ours.to(dtype), used), f"{n} -> {m}"

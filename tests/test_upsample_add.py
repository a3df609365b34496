"""upsample_add: every backend against the reference (float64 ground truth), gradients, layouts, determinism,
torch.library/compile integration and the Python errors for bad input (backend selection: test_backends.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fcn_fast
from fcn_fast import _backends
from fcn_fast.nn import UpsampleAdd
from fcn_fast.ops._resample import deconv_output_size
from harness import DTYPES, HAS_CUDA, TOLERANCES, assert_close, backend_params, device_for

NATIVE_BACKENDS = backend_params(include_reference=False)
ALL_BACKENDS = backend_params()


@dataclass(frozen=True)
class Case:
    id: str
    x_shape: Tuple[int, int, int, int]
    factor: int
    mode: str = "interp"
    out_size: Optional[Tuple[int, int]] = None
    offset: Tuple[int, int] = (0, 0)
    skip_hw: Optional[Tuple[int, int]] = None  # None: no skip
    skip_offset: Tuple[int, int] = (0, 0)
    skip_scale: float = 1.0
    align_corners: bool = False
    tiny: bool = field(default=True)  # small enough for the Triton interpreter

    def kwargs(self):
        return dict(factor=self.factor, mode=self.mode, out_size=self.out_size, offset=self.offset,
                    skip_offset=self.skip_offset, skip_scale=self.skip_scale, align_corners=self.align_corners)


CASES = [
    Case("1x1-interp-f1", (2, 3, 1, 1), 1, skip_hw=(1, 1)),
    Case("1x1-deconv-f32", (1, 2, 1, 1), 32, "deconv", skip_hw=(70, 66), skip_offset=(3, 1), skip_scale=0.5),
    Case("7x13-interp-f2", (2, 3, 7, 13), 2, skip_hw=(16, 30), skip_offset=(1, 3), skip_scale=-0.75),
    Case("7x13-deconv-f2-crop", (2, 3, 7, 13), 2, "deconv", out_size=(10, 20), offset=(1, 2), skip_hw=(12, 23),
         skip_offset=(2, 1), skip_scale=0.01),
    Case("5x6-deconv-f3", (1, 2, 5, 6), 3, "deconv", skip_hw=(17, 20)),
    Case("4x4-deconv-f8-crop4", (1, 2, 4, 4), 8, "deconv", out_size=(20, 24), offset=(4, 4)),
    Case("2x3-deconv-f16", (1, 2, 2, 3), 16, "deconv", offset=(7, 9), skip_hw=(44, 60), skip_offset=(1, 2),
         skip_scale=2.0),
    Case("3x2-interp-f8-align", (1, 2, 3, 2), 8, align_corners=True, skip_hw=(24, 16)),
    Case("9x7-interp-down", (1, 3, 9, 7), 1, out_size=(5, 4), skip_hw=(6, 4), skip_offset=(1, 0)),
    Case("6x5-interp-f4-size", (1, 2, 6, 5), 4, out_size=(21, 19)),
    Case("fcn8s-upscore2", (1, 21, 16, 16), 2, "deconv", skip_hw=(44, 44), skip_offset=(5, 5), skip_scale=0.01,
         tiny=False),
    Case("fcn8s-upscore8", (1, 3, 70, 70), 8, "deconv", out_size=(500, 500), offset=(31, 31), tiny=False),
    Case("63x65-interp-f4", (1, 2, 63, 65), 4, skip_hw=(252, 260), tiny=False),
    Case("63x65-deconv-f2", (2, 2, 63, 65), 2, "deconv", skip_hw=(130, 134), skip_offset=(2, 1), skip_scale=0.3,
         tiny=False),
]


def _inputs(case: Case, dtype, device, *, with_skip=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.x_shape, generator=gen, dtype=torch.float64).to(dtype)
    skip = None
    if with_skip and case.skip_hw is not None:
        skip = torch.randn(case.x_shape[:2] + case.skip_hw, generator=gen, dtype=torch.float64).to(dtype)
    return x.to(device), (skip.to(device) if skip is not None else None)


def _run(backend, x, skip, grad_out=None, **kwargs):
    """Forward, then the gradients of x (and skip) for grad_out (random when None). Returns (out, grads, grad_out)."""
    x = x.detach().requires_grad_(True)
    leaves = [x]
    if skip is not None:
        skip = skip.detach().requires_grad_(True)
        leaves.append(skip)
    out = fcn_fast.upsample_add(x, skip, backend=backend, **kwargs)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grad_out = grad_out.to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, grads, grad_out


def _expected(x, skip, grad_out, **kwargs):
    """The reference in float64 on the very same (rounded) inputs: the exact answer every dtype is held to."""
    double = lambda t: None if t is None else t.detach().cpu().double()  # noqa: E731
    out, grads, _ = _run("reference", double(x), double(skip), double(grad_out), **kwargs)
    return out, grads


def _check_against_reference(backend, case: Case, dtype, *, with_skip=True):
    x, skip = _inputs(case, dtype, device_for(backend), with_skip=with_skip)
    out, grads, grad_out = _run(backend, x, skip, **case.kwargs())
    want, want_grads = _expected(x, skip, grad_out, **case.kwargs())
    assert out.dtype == dtype and out.device == x.device and out.is_contiguous()
    assert_close(out, want, dtype)
    for got, expected in zip(grads, want_grads):
        assert got.shape == expected.shape and got.dtype == dtype
        assert_close(got, expected, dtype)


# ---- values and gradients against the reference ------------------------------------------------------------------

@pytest.mark.parametrize("case", [c for c in CASES], ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_reference(backend, dtype, case):
    if backend == "triton" and not HAS_CUDA and not case.tiny:
        pytest.skip("Triton interpreter: tiny cases only (slow)")
    _check_against_reference(backend, case, dtype)


@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[6]], ids=lambda c: c.id)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_without_skip(backend, case):
    _check_against_reference(backend, case, torch.float32, with_skip=False)


@pytest.mark.parametrize("layout", ["channels_last", "strided", "expanded-skip"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_layouts(backend, layout):
    case = CASES[3]
    x, skip = _inputs(case, torch.float32, device_for(backend))
    if layout == "channels_last":
        x, skip = x.to(memory_format=torch.channels_last), skip.to(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    elif layout == "strided":
        # Transposed storage and every other column: neither contiguous nor channels_last.
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
        skip = torch.cat([skip, skip], 3)[..., ::2]
        assert not x.is_contiguous() and not skip.is_contiguous()
    else:
        skip = skip[:1].expand_as(skip)
    out, grads, grad_out = _run(backend, x, skip, **case.kwargs())
    want, want_grads = _expected(x, skip, grad_out, **case.kwargs())
    assert out.is_contiguous()
    assert_close(out, want, torch.float32)
    for got, expected in zip(grads, want_grads):
        assert_close(got, expected, torch.float32)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batch(backend):
    case = CASES[3]
    x, skip = _inputs(case, torch.float32, device_for(backend))
    out, (grad_x, grad_skip), _ = _run(backend, x[:0], skip[:0], **case.kwargs())
    assert out.shape == (0, 3, 10, 20) and grad_x.shape == (0,) + x.shape[1:] and grad_skip.shape == (0,) + skip.shape[1:]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_grad_of_one_input_only(backend):
    """Only the gradients asked for are computed, and each equals its part of the full backward."""
    case = CASES[3]
    x, skip = _inputs(case, torch.float32, device_for(backend))
    _, (want_x, want_skip), grad_out = _run(backend, x, skip, **case.kwargs())
    out = fcn_fast.upsample_add(x.requires_grad_(True), skip, backend=backend, **case.kwargs())
    (grad_x,) = torch.autograd.grad(out, [x], grad_out)
    x.requires_grad_(False)
    skip.requires_grad_(True)
    out = fcn_fast.upsample_add(x, skip, backend=backend, **case.kwargs())
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

# ---- hypothesis: random geometry against the reference -------------------------------------------------------------

@st.composite
def geometries(draw, max_factor=8, max_size=9):
    mode = draw(st.sampled_from(["deconv", "interp"]))
    factor = draw(st.integers(1, max_factor))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, max_size)), draw(st.integers(1, max_size))
    kwargs = dict(factor=factor, mode=mode)
    if mode == "deconv":
        full = (deconv_output_size(h, factor), deconv_output_size(w, factor))
        offset = (draw(st.integers(0, full[0] - 1)), draw(st.integers(0, full[1] - 1)))
        out = (draw(st.integers(1, full[0] - offset[0])), draw(st.integers(1, full[1] - offset[1])))
        kwargs.update(offset=offset, out_size=out)
    else:
        align = draw(st.booleans())
        if draw(st.booleans()):
            out = (h * factor, w * factor)
        else:
            out = (draw(st.integers(1, h * factor + 3)), draw(st.integers(1, w * factor + 3)))
            kwargs["out_size"] = out
        kwargs["align_corners"] = align
    skip_hw = None
    if draw(st.booleans()):
        margin = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
        skip_hw = (out[0] + margin[0], out[1] + margin[1])
        kwargs["skip_offset"] = (draw(st.integers(0, margin[0])), draw(st.integers(0, margin[1])))
        kwargs["skip_scale"] = draw(st.sampled_from([1.0, 0.5, -2.0, 0.01, 1e-4]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    seed = draw(st.integers(0, 2**16))
    return (n, c, h, w), skip_hw, kwargs, dtype, seed


def _check_random_geometry(backend, geometry):
    x_shape, skip_hw, kwargs, dtype, seed = geometry
    gen = torch.Generator().manual_seed(seed)
    device = device_for(backend)
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    skip = None
    if skip_hw is not None:
        skip = torch.randn(x_shape[:2] + skip_hw, generator=gen, dtype=torch.float64).to(dtype).to(device)
    out, grads, grad_out = _run(backend, x, skip, **kwargs)
    want, want_grads = _expected(x, skip, grad_out, **kwargs)
    assert_close(out, want, dtype)
    for got, expected in zip(grads, want_grads):
        assert_close(got, expected, dtype)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(geometry=geometries(max_factor=16))
def test_random_geometry_cpu(geometry):
    if not _backends.available_backends()["cpu"]:
        pytest.skip(_backends.available_backends()["cpu"].reason)
    _check_random_geometry("cpu", geometry)


@pytest.mark.parametrize("backend", [p for p in NATIVE_BACKENDS if p.values[0] != "cpu"])
def test_random_geometry_gpu_backends(backend):
    # Fewer examples under the Triton interpreter; the same 300 as the CPU on a GPU.
    examples = 300 if HAS_CUDA else 40

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(geometry=geometries(max_factor=8, max_size=5))
    def check(geometry):
        _check_random_geometry(backend, geometry)

    check()


# ---- autograd, torch.library, torch.compile -------------------------------------------------------------------------

# Small skips: gradcheck perturbs every input element.
GRADCHECK_CASES = [
    Case("deconv-f2-crop", (1, 2, 3, 4), 2, "deconv", out_size=(6, 7), offset=(1, 1), skip_hw=(7, 9),
         skip_offset=(1, 2), skip_scale=0.3),
    Case("deconv-f4", (1, 1, 2, 2), 4, "deconv", skip_hw=(13, 12), skip_offset=(1, 0), skip_scale=-2.0),
    Case("interp-f3-align", (1, 2, 3, 4), 3, align_corners=True, skip_hw=(10, 13), skip_offset=(1, 1), skip_scale=0.5),
    Case("interp-down", (1, 2, 5, 4), 1, out_size=(3, 7), skip_hw=(3, 7)),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", [p for p in ALL_BACKENDS if p.values[0] != "triton"])
def test_gradcheck(backend, case):
    x, skip = _inputs(case, torch.float64, device_for(backend))
    x.requires_grad_(True)
    skip.requires_grad_(True)
    fn = lambda a, b: fcn_fast.upsample_add(a, b, backend=backend, **case.kwargs())  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, skip))


def _op_args(case: Case, backend, requires_grad=True):
    x, skip = _inputs(case, torch.float32, device_for(backend))
    x.requires_grad_(requires_grad)
    skip.requires_grad_(requires_grad)
    out_h, out_w = case.out_size
    return (x, skip, case.factor, case.mode, out_h, out_w, case.offset[0], case.offset[1], case.skip_offset[0],
            case.skip_offset[1], case.skip_scale, case.align_corners, backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_opcheck(backend):
    args = _op_args(CASES[3], backend)
    torch.library.opcheck(torch.ops.fcn_fast.upsample_add.default, args)
    x, skip = args[0].detach(), args[1].detach()
    grad = torch.randn(x.shape[0], x.shape[1], 10, 20, device=x.device)
    bwd_args = (grad, 7, 13, skip.shape[2], skip.shape[3], 2, "deconv", 1, 2, 2, 1, 0.01, False, True, True, backend)
    torch.library.opcheck(torch.ops.fcn_fast.upsample_add_backward.default, bwd_args)


class _Head(torch.nn.Module):
    """FCN-8s's first fusion (upscore2 + crop(score_pool4)) between two pointwise ops, as in a model."""

    def __init__(self, backend):
        super().__init__()
        self.up = UpsampleAdd(factor=2, mode="deconv", skip_offset=(5, 5), skip_scale=0.01, backend=backend)

    def forward(self, x, skip):
        return torch.relu(self.up(x * 2.0, skip)) - 1.0


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=NATIVE_BACKENDS[0].marks)])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    model = _Head(backend)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    skip = torch.randn(1, 3, 24, 24, requires_grad=True)
    eager_out = model(x, skip)
    out = compiled(x, skip)
    torch.testing.assert_close(out, eager_out)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (x, skip), g), torch.autograd.grad(eager_out, (x, skip), g))


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
def test_backward_is_deterministic(backend):
    tiny = backend == "triton" and not HAS_CUDA
    case = CASES[3] if tiny else Case("det", (2, 8, 40, 40), 8, "deconv", offset=(4, 4), skip_hw=(330, 330))
    x, skip = _inputs(case, torch.float32, device_for(backend))
    out1, grads1, grad_out = _run(backend, x, skip, **case.kwargs())
    out2, grads2, _ = _run(backend, x, skip, grad_out, **case.kwargs())
    assert torch.equal(out1, out2)
    for a, b in zip(grads1, grads2):
        assert torch.equal(a, b)


# ---- modules, backend selection ------------------------------------------------------------------------------------

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

"""The shared op tester: every fcn_fast op against the plain PyTorch composition it replaces, on every backend.

An op's test module subclasses :class:`OpTester` (pytest collects the subclass, ``Test<Op>``) and gives it

- ``op(backend, **inputs)``: the fcn_fast call;
- ``reference(dtype, **inputs)``: the PyTorch code the op replaces, written in the test, run on the inputs upcast to
  the accumulate dtype (float32; float64 for float64), whose outputs the tester rounds to ``dtype``;
- ``samples()``, ``special_samples()``, ``gradcheck_samples()``, ``thread_samples()``: named :class:`Sample` inputs;
- ``property_sample(draw, dtype, small)``: one random sample for the hypothesis property test;
- ``scales(...)``: how large the rounding error of a correct implementation may be, per element (the default is
  the largest finite value of what is compared).

and inherits the same tests: values and gradients against the reference for backends x dtypes x samples, memory
layouts (contiguous, channels_last, sliced, transposed, expanded), special values (NaN, +-inf, huge, denormal, all
equal), float64 gradcheck, torch.library.opcheck, torch.compile(fullgraph=True), bitwise determinism, bitwise
1-vs-2-thread results, and a derandomized hypothesis property test that draws all of those at once.

Comparison (:func:`assert_matches`): NaN positions and infinities (with their sign) exactly; finite values within
``tol * scale + 2 eps(dtype) |expected|`` where ``tol`` is a small multiple of the accumulate dtype's epsilon and
``scale`` the op's error bound for that element, so a tolerance never exceeds what the values can explain.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from harness import DTYPES, backend_params, device_for

LAYOUTS = ("contiguous", "channels_last", "sliced", "transposed", "expanded")
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
REDUCTIONS = ("mean", "sum", "none")

PROPERTY_EXAMPLES = 500  # per op and backend (reference, cpu, the emulated CUDA, GPU backends)
INTERPRETED_EXAMPLES = 50  # per op under the Triton interpreter (about 0.1-1 s a call)

# A correct implementation differs from the reference by a few roundings of the accumulate dtype per term that
# makes up a value; the op's scales() say how large those terms are.
TOLERANCE_ULPS = 64


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def interpreted(backend: str) -> bool:
    """Triton kernels running under Triton's (slow) CPU interpreter."""
    return backend == "triton" and device_for(backend).type == "cpu"


def special_values(dtype: torch.dtype) -> List[float]:
    """NaN, +-inf, huge (+-1e30, +-3e38: inf in float16), a subnormal of ``dtype``, zero."""
    sub = torch.finfo(dtype).tiny / 4
    return [math.nan, math.inf, -math.inf, 1e30, -1e30, 3e38, -3e38, sub, -sub, 0.0]


def finite_abs(t: torch.Tensor) -> torch.Tensor:
    """|t| with NaN and infinities as 0: the magnitudes behind the finite values an op returns."""
    return t.abs().nan_to_num(nan=0.0, posinf=0.0)


# ---- memory layouts --------------------------------------------------------------------------------------------------

def layout_applies(layout: str, t: torch.Tensor) -> bool:
    if layout == "channels_last":
        return t.dim() == 4
    if layout == "transposed":
        return t.dim() >= 2
    return True


def relayout(values: torch.Tensor, layout: str, requires_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(base, view): ``view`` holds ``values`` in the memory layout ``layout`` and is a differentiable view of
    ``base`` (the leaf that requires grad). "expanded" repeats the first batch entry (stride 0 over dim 0), so its
    values are ``values[:1]`` broadcast: the reference must read the view, not ``values``."""
    if not layout_applies(layout, values):
        layout = "contiguous"
    if layout == "contiguous":
        base = values.clone().contiguous()
        view_of = lambda b: b  # noqa: E731
    elif layout == "channels_last":
        base = values.contiguous(memory_format=torch.channels_last)
        view_of = lambda b: b  # noqa: E731
    elif layout == "sliced":
        # Every other element of a wider last dimension, starting at 1: an offset and a stride of 2.
        base = torch.zeros(*values.shape[:-1], 2 * values.shape[-1] + 1, dtype=values.dtype, device=values.device)
        base[..., 1::2] = values
        view_of = lambda b: b[..., 1::2]  # noqa: E731
    elif layout == "transposed":
        base = values.transpose(-1, -2).contiguous()
        view_of = lambda b: b.transpose(-1, -2)  # noqa: E731
    elif layout == "expanded":
        base = values[:1].clone()
        view_of = lambda b: b.expand(values.shape)  # noqa: E731
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if requires_grad:
        base.requires_grad_(True)
    return base, view_of(base)


# ---- comparison ------------------------------------------------------------------------------------------------------

def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale=None, what: str = "",
                   rounded_in_dtype: bool = False) -> None:
    """``actual`` equals ``expected`` (the reference, already rounded to ``dtype``): NaN where it is NaN, the same
    infinities, and finite values within ``tolerance(dtype) * scale + 2 eps(dtype) |expected|`` (plus a few
    subnormal steps). ``scale`` (broadcastable, float64) bounds the magnitude of the terms behind each value;
    default: the largest finite |expected|. ``rounded_in_dtype``: ``actual`` was computed with intermediate results
    rounded to a float16/bfloat16 ``dtype`` (PyTorch's own half-precision ops), which allows a few eps(dtype) of
    the scale."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().cpu().to(torch.float64)
    e = expected.detach().cpu().to(torch.float64)
    nan_a, nan_e = a.isnan(), e.isnan()
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(f"{what}: NaN at different positions: actual NaN at {_where(nan_a & ~nan_e)} where "
                             f"expected is {_values(e, nan_a & ~nan_e)}; expected NaN at {_where(nan_e & ~nan_a)} "
                             f"where actual is {_values(a, nan_e & ~nan_a)}")
    inf = (a.isinf() | e.isinf()) & ~nan_e
    if not torch.equal(a[inf], e[inf]):
        bad = inf & (a != e)
        raise AssertionError(f"{what}: infinities differ at {_where(bad)}: actual {_values(a, bad)}, expected "
                             f"{_values(e, bad)}")
    finite = ~(inf | nan_e)
    if not finite.any():
        return
    info = torch.finfo(dtype)
    tol, floor = tolerance(dtype), 4 * info.tiny * info.eps
    if rounded_in_dtype:
        tol, floor = tol + 8 * info.eps, 4 * floor
    if scale is None:
        scale = e[finite].abs().max()
    scale = torch.as_tensor(scale, dtype=torch.float64).expand(e.shape)
    allowed = tol * scale + 2 * info.eps * e.abs() + floor
    bad = finite & ~((a - e).abs() <= allowed)
    if bad.any():
        err = ((a - e).abs() / allowed)[finite].max()
        raise AssertionError(f"{what}: {int(bad.sum())} of {int(finite.sum())} finite values differ (worst: "
                             f"{float(err):.3g}x the tolerance) at {_where(bad)}: actual {_values(a, bad)}, expected "
                             f"{_values(e, bad)}, allowed +-{_values(allowed, bad)}")


def _where(mask: torch.Tensor, limit: int = 4) -> str:
    idx = mask.nonzero().tolist()
    return f"{idx[:limit]}{' ...' if len(idx) > limit else ''} ({len(idx)} in all)"


def _values(t: torch.Tensor, mask: torch.Tensor, limit: int = 4) -> str:
    return str([float(v) for v in t[mask].flatten()[:limit]])


# ---- samples -----------------------------------------------------------------------------------------------------

@dataclass
class Sample:
    """One call of an op. ``tensors``: its tensor arguments (floating ones in float64 and cast to the tested dtype,
    integer ones as they are; None for an absent optional tensor); ``options``: its other keyword arguments."""

    id: str
    tensors: Dict[str, Optional[torch.Tensor]]
    options: Dict[str, Any] = field(default_factory=dict)
    tiny: bool = True  # runs under the Triton interpreter in the default suite (else: with the slow tests)
    layout: str = "contiguous"  # of the tensors the layout tests rearrange

    def with_tensors(self, **tensors) -> "Sample":
        return replace(self, tensors={**self.tensors, **tensors})


@dataclass
class Run:
    """What one backend (or the reference) returned: the output, the gradients of the differentiable inputs, and
    the inputs it was called with (views in the tested layout)."""

    out: torch.Tensor
    grads: Dict[str, torch.Tensor]
    inputs: Dict[str, Optional[torch.Tensor]]


def _seeded(shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class OpTester:
    """Base class of the per-op testers (see the module docstring). Class attributes a subclass may change:"""

    differentiable: Tuple[str, ...] = ()  # tensor arguments that get gradients (empty: no backward tests)
    relayouted: Optional[Tuple[str, ...]] = None  # tensors the layout tests rearrange (None: all)
    dtypes: Tuple[torch.dtype, ...] = tuple(DTYPES)

    # ---- what a subclass provides ------------------------------------------------------------------------------

    def op(self, backend: str, **inputs) -> torch.Tensor:
        raise NotImplementedError

    def reference(self, float_dtype: torch.dtype, **inputs) -> torch.Tensor:
        raise NotImplementedError

    def samples(self) -> List[Sample]:
        raise NotImplementedError

    def special_samples(self) -> List[Sample]:
        return []

    def gradcheck_samples(self) -> List[Sample]:
        return []

    def thread_samples(self) -> List[Sample]:
        return []

    def layout_sample(self) -> Sample:
        return self.samples()[0]

    def property_sample(self, draw, dtype: torch.dtype, small: bool) -> Sample:
        raise NotImplementedError

    def known_deviation(self, backend: str, dtype: torch.dtype, sample: Sample) -> Optional[str]:
        """Why ``backend`` cannot give the reference's answer on ``sample`` for a cause outside fcn_fast (a bug of
        PyTorch's own kernels that the reference backend runs), or None: it must give it."""
        return None

    def opcheck_calls(self, backend: str) -> List[Tuple[Any, tuple]]:
        """(torch.ops overload, positional args) pairs for torch.library.opcheck."""
        return []

    def input_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype a floating sample tensor is passed in when the op is tested in ``dtype``."""
        return dtype

    def scales(self, dtype: torch.dtype, ref_inputs: Dict[str, Optional[torch.Tensor]], options: Dict[str, Any],
               expected: Run, grad_out: Optional[torch.Tensor], rounded_in_dtype: bool) -> Tuple[Any, Dict[str, Any]]:
        """Per-element error scales (float64, broadcastable) of the output and of each gradient. ``ref_inputs``:
        the inputs in float64 as the op saw them; ``rounded_in_dtype``: see :func:`assert_matches`. Default: the
        largest finite value (None)."""
        return None, {}

    def assert_outputs_match(self, actual: Run, expected: Run, dtype: torch.dtype, out_scale, grad_scales,
                             ref_inputs, options, rounded_in_dtype: bool) -> None:
        assert_matches(actual.out, expected.out, dtype, out_scale, "output", rounded_in_dtype)
        for name, grad in expected.grads.items():
            got = actual.grads[name]
            assert got.dtype == actual.inputs[name].dtype, f"grad {name}: dtype {got.dtype}"
            assert_matches(got, grad, dtype, grad_scales.get(name), f"grad {name}", rounded_in_dtype)

    # ---- running ---------------------------------------------------------------------------------------------

    def _inputs(self, sample: Sample, dtype: torch.dtype, device, layout: str, requires_grad: bool):
        """(leaves, views): the sample's tensors in ``dtype`` on ``device`` as views in ``layout``."""
        names = self.relayouted if self.relayouted is not None else tuple(sample.tensors)
        views = {}
        for name, value in sample.tensors.items():
            if value is None:
                views[name] = None
                continue
            if value.is_floating_point():
                value = value.to(self.input_dtype(name, dtype))
            value = value.to(device)
            grad = requires_grad and name in self.differentiable
            if name in names:
                _, views[name] = relayout(value, layout, grad)
            else:
                views[name] = value.clone().requires_grad_(grad) if grad else value
        return views

    def grad_out_for(self, out: torch.Tensor, kind: str = "random", seed: int = 1) -> torch.Tensor:
        """The incoming gradient: exactly one for a scalar when ``kind == "one"``, else random."""
        if out.dim() == 0 and kind == "one":
            return torch.ones((), dtype=out.dtype, device=out.device)
        return _seeded(out.shape, seed).to(out.dtype).to(out.device)

    def _backward(self, out, inputs, grad_out) -> Dict[str, torch.Tensor]:
        names = [n for n in self.differentiable if inputs.get(n) is not None]
        if not names:
            return {}
        grads = torch.autograd.grad(out, [inputs[n] for n in names], grad_out, allow_unused=True)
        return {n: (g if g is not None else torch.zeros_like(inputs[n])) for n, g in zip(names, grads)}

    def run(self, backend: str, sample: Sample, dtype: torch.dtype, layout: str = "contiguous",
            grad_kind: str = "random") -> Tuple[Run, Optional[torch.Tensor]]:
        if interpreted(backend) and dtype == torch.bfloat16:
            sample = _without_bfloat16_subnormals(sample)
        inputs = self._inputs(sample, dtype, device_for(backend), layout, requires_grad=bool(self.differentiable))
        out = self.op(backend, **inputs, **sample.options)
        grad_out = None
        grads = {}
        if self.differentiable:
            grad_out = self.grad_out_for(out, grad_kind)
            grads = self._backward(out, inputs, grad_out)
        return Run(out, grads, inputs), grad_out

    def expected(self, dtype: torch.dtype, inputs: Dict[str, Optional[torch.Tensor]], options,
                 grad_out: Optional[torch.Tensor]) -> Run:
        """The reference on the very inputs (values as the op saw them) in the accumulate dtype, rounded to
        ``dtype``."""
        acc = acc_dtype(dtype)
        ref_inputs = {}
        for name, t in inputs.items():
            if t is None:
                ref_inputs[name] = None
                continue
            t = t.detach().cpu().contiguous()
            if t.is_floating_point():
                t = t.to(acc)
                if name in self.differentiable:
                    t.requires_grad_(True)
            ref_inputs[name] = t
        out = self.reference(dtype, **ref_inputs, **options)
        grads = {}
        if self.differentiable and grad_out is not None:
            grads = self._backward(out, ref_inputs, grad_out.detach().cpu().to(acc))
            grads = {n: g.to(inputs[n].dtype) for n, g in grads.items()}
        return Run(out.detach().to(dtype) if out.is_floating_point() else out.detach(), grads, ref_inputs)

    def check(self, backend: str, sample: Sample, dtype: torch.dtype, layout: str = "contiguous",
              grad_kind: str = "random") -> None:
        """The op on ``backend`` against the reference: output and gradients, with the op's error scales."""
        actual, grad_out = self.run(backend, sample, dtype, layout, grad_kind)
        assert actual.out.device.type == device_for(backend).type
        if actual.out.is_floating_point():
            assert actual.out.dtype == dtype, f"output dtype {actual.out.dtype}, inputs {dtype}"
        expected = self.expected(dtype, actual.inputs, sample.options, grad_out)
        ref64 = {n: (None if t is None else t.detach().cpu().to(torch.float64) if t.is_floating_point() else
                     t.detach().cpu()) for n, t in actual.inputs.items()}
        # The reference backend is PyTorch in the inputs' dtype: float16/bfloat16 intermediates are rounded.
        rounded = backend == "reference" and dtype in (torch.float16, torch.bfloat16)
        out_scale, grad_scales = self.scales(dtype, ref64, sample.options, expected,
                                             None if grad_out is None else grad_out.detach().cpu().double(), rounded)
        self.assert_outputs_match(actual, expected, dtype, out_scale, grad_scales, ref64, sample.options, rounded)

    # ---- parametrization -----------------------------------------------------------------------------------------

    def pytest_generate_tests(self, metafunc):
        name = metafunc.function.__name__
        axes = [a for a in ("backend", "dtype", "sample", "layout") if a in metafunc.fixturenames]
        if not axes:
            return
        params = []
        for b in backend_params():
            backend = b.values[0]
            if not self.runs_test(name, backend):
                continue
            for values in self._axis_values(name, axes, backend):
                marks = list(b.marks) + self.marks_for(name, backend, **values)
                ident = "-".join([b.id] + [_ident(values[a]) for a in axes if a != "backend"])
                params.append(pytest.param(*[backend if a == "backend" else values[a] for a in axes], marks=marks,
                                           id=ident))
        metafunc.parametrize(",".join(axes), params)

    def _axis_values(self, test: str, axes: Sequence[str], backend: str):
        dtypes = self.dtypes_for(test, backend)
        samples = self.samples_for(test)
        layouts = LAYOUTS if "layout" in axes else (None,)
        for dtype in (dtypes if "dtype" in axes else (None,)):
            for sample in (samples if "sample" in axes else (None,)):
                for layout in layouts:
                    yield {k: v for k, v in dict(dtype=dtype, sample=sample, layout=layout).items() if k in axes}

    def samples_for(self, test: str) -> List[Sample]:
        return {"test_matches_reference": self.samples, "test_special_values": self.special_samples,
                "test_gradcheck": self.gradcheck_samples, "test_thread_count_does_not_change_bits": self.thread_samples,
                "test_layouts": lambda: [self.layout_sample()]}.get(test, lambda: [None])()

    def dtypes_for(self, test: str, backend: str) -> Sequence[torch.dtype]:
        if test == "test_layouts":
            return (torch.float32, torch.bfloat16)
        return self.dtypes

    def runs_test(self, test: str, backend: str) -> bool:
        """Whether ``test`` is generated for ``backend``: determinism and thread tests are about fcn_fast's own
        kernels (the reference backend is PyTorch); thread counts do not reach the Triton interpreter or a GPU."""
        if test == "test_deterministic":
            return backend != "reference"
        if test == "test_thread_count_does_not_change_bits":
            return backend != "reference" and device_for(backend).type == "cpu" and not interpreted(backend)
        return True

    def marks_for(self, test: str, backend: str, sample: Optional[Sample] = None, dtype=None, **_) -> list:
        """Interpreted Triton: what is not tiny, and float64 gradcheck, run only with the slow tests. A known
        deviation outside fcn_fast is an expected failure."""
        marks = []
        if interpreted(backend) and ((sample is not None and not sample.tiny) or test == "test_gradcheck"):
            marks.append(pytest.mark.slow)
        deviation = sample is not None and dtype is not None and self.known_deviation(backend, dtype, sample)
        if deviation:
            marks.append(pytest.mark.xfail(reason=deviation, strict=False))
        return marks

    # ---- the tests -------------------------------------------------------------------------------------------

    def test_matches_reference(self, backend, dtype, sample):
        self.check(backend, sample, dtype, sample.layout, grad_kind="random")

    def test_layouts(self, backend, dtype, layout):
        """Inputs read in place with their strides (no layout changes the answer); gradients of the input's shape."""
        self.check(backend, self.layout_sample(), dtype, layout)

    def test_special_values(self, backend, dtype, sample):
        self.check(backend, sample, dtype, sample.layout)

    def test_gradcheck(self, backend, sample):
        if not self.differentiable:
            pytest.skip("the op has no gradient")  # pragma: no cover (generated only for differentiable ops)
        inputs = self._inputs(sample, torch.float64, device_for(backend), "contiguous", requires_grad=True)
        names = [n for n in self.differentiable if inputs.get(n) is not None]

        def fn(*tensors):
            return self.op(backend, **{**inputs, **dict(zip(names, tensors))}, **sample.options)

        assert torch.autograd.gradcheck(fn, tuple(inputs[n] for n in names))

    def test_opcheck(self, backend):
        calls = self.opcheck_calls(backend)
        assert calls
        for overload, args in calls:
            torch.library.opcheck(overload, args)

    def test_compile_fullgraph(self, backend):
        """torch.compile traces the op as one node (fullgraph): the compiled call equals the eager one."""
        torch._dynamo.reset()
        sample = self.layout_sample()
        inputs = self._inputs(sample, torch.float32, device_for(backend), "contiguous",
                              requires_grad=bool(self.differentiable))
        names = [n for n in self.differentiable if inputs.get(n) is not None]

        def fn(*tensors):
            # Pointwise ops on either side: the op is one node of a larger graph.
            out = self.op(backend, **{**inputs, **{n: 2.0 * t for n, t in zip(names, tensors)}}, **sample.options)
            return out * 3.0 if out.is_floating_point() else out

        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        leaves = [inputs[n] for n in names]
        eager_out, compiled_out = fn(*leaves), compiled(*leaves)
        torch.testing.assert_close(compiled_out, eager_out, equal_nan=True)
        if names:
            grad_out = self.grad_out_for(eager_out)
            torch.testing.assert_close(torch.autograd.grad(compiled_out, leaves, grad_out),
                                       torch.autograd.grad(eager_out, leaves, grad_out), equal_nan=True)

    def determinism_sample(self, backend: str) -> Sample:
        """Large enough to split over threads and kernel blocks, except under the Triton interpreter."""
        samples = self.thread_samples()
        return samples[0] if samples and not interpreted(backend) else self.layout_sample()

    def test_deterministic(self, backend):
        """Two runs give the same bits (backward passes are gathers, reductions in a fixed order)."""
        sample = self.determinism_sample(backend)
        first, _ = self.run(backend, sample, torch.float32, sample.layout)
        second, _ = self.run(backend, sample, torch.float32, sample.layout)
        _assert_same_bits(first, second)

    def test_thread_count_does_not_change_bits(self, backend, sample):
        """1 and 2 threads give the same bits, for an incoming gradient of one (which a CPU loss may compute in its
        forward) and a random one."""
        threads = torch.get_num_threads()
        for grad_kind in ("one", "random"):
            runs = []
            try:
                for n in (1, 2):
                    torch.set_num_threads(n)
                    runs.append(self.run(backend, sample, torch.float32, sample.layout, grad_kind)[0])
            finally:
                torch.set_num_threads(threads)
            _assert_same_bits(*runs)

    def test_property(self, backend):
        """Random samples: shapes and layouts, special values anywhere, every option. Derandomized: a failure
        reproduces, and hypothesis prints the smallest failing sample it found. On one thread: the samples are
        small (the thread tests cover the kernels' parallel paths), and a second thread of tiny ops on a shared CI
        core mostly waits."""
        small = interpreted(backend)
        examples = INTERPRETED_EXAMPLES if small else PROPERTY_EXAMPLES

        @st.composite
        def cases(draw):
            dtype = choose(draw, self.dtypes)
            sample = self.property_sample(draw, dtype, small)
            return sample, dtype, choose(draw, LAYOUTS), choose(draw, ("one", "random"))

        @settings(max_examples=examples, derandomize=True, deadline=None, database=None, print_blob=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=cases())
        def check(case):
            sample, dtype, layout, grad_kind = case
            reject(self.known_deviation(backend, dtype, sample))
            self.check(backend, sample, dtype, layout, grad_kind)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            check()
        finally:
            torch.set_num_threads(threads)


def _without_bfloat16_subnormals(sample: Sample) -> Sample:
    """Triton's interpreter converts bfloat16 subnormals to and from float32 wrongly (1e-39 loads as 4.4e-39; a GPU
    converts them right): flush the inputs that are, or that bilinear weights (>= 1/4096) can make, subnormal."""
    limit = 4096 * torch.finfo(torch.bfloat16).tiny
    return sample.with_tensors(**{n: torch.where(t.abs() < limit, torch.zeros((), dtype=t.dtype), t)
                                  for n, t in sample.tensors.items() if t is not None and t.is_floating_point()})


def reject(reason: Optional[str]) -> None:
    """Drop a drawn example that meets a known deviation outside fcn_fast (hypothesis draws another)."""
    assume(not reason)


def _ident(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, Sample):
        return value.id
    return str(value)


def _assert_same_bits(first: Run, second: Run) -> None:
    assert torch.equal(first.out.isnan(), second.out.isnan())
    assert torch.equal(first.out.nan_to_num(), second.out.nan_to_num()), "output bits differ"
    for name in first.grads:
        a, b = first.grads[name], second.grads[name]
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), f"grad {name} differs"


# ---- drawing inputs (hypothesis) ------------------------------------------------------------------------------------
# Strategies are built once (building and validating one per draw costs more than running a small example).

@functools.lru_cache(maxsize=None)
def _span(n: int):
    return st.integers(0, n)


def integer(draw, low: int, high: int) -> int:
    """An int in [low, high] (shrinks towards low)."""
    return low + draw(_span(high - low))


def choose(draw, options: Sequence):
    """One of ``options`` (shrinks towards the first)."""
    return options[draw(_span(len(options) - 1))]


def draw_index(draw, size: int, edges: Sequence[int] = ()) -> int:
    """An index into a dimension of ``size``, often its first or last one or one of ``edges`` (crop borders)."""
    favourites = sorted({0, size - 1, *[e for e in edges if 0 <= e < size]})
    return choose(draw, favourites) if draw(st.booleans()) else integer(draw, 0, size - 1)


def draw_seed(draw) -> int:
    return draw(_span(2**31 - 1))


MAGNITUDES = (1.0, 1.0, 4.0, 0.25, 100.0)
# |z| of 1e7 and more loses log C in a log-sum-exp not taken relative to the max.
OFFSETS = (0.0, 0.0, 0.0, 1e4, -1e4, 1e7, 1e30)
SPECIAL_LAYOUTS = ("none", "none", "points", "points", "plane", "all-equal", "scattered")
PLANE_VALUES = (-math.inf, -math.inf, math.inf, math.nan, -1e30, 3e38)
EQUAL_VALUES = (0.0, 2.5, -1e30, 1e30, 3e38, -3e38, 1e7)


def draw_values(draw, shape, dtype: torch.dtype, edges: Optional[Dict[int, Sequence[int]]] = None,
                class_dim: Optional[int] = 1) -> torch.Tensor:
    """Float64 values for a tensor that will be cast to ``dtype``: random of a drawn magnitude around a drawn
    offset, and special values (NaN, +-inf, +-1e30, +-3e38, subnormals, all equal) at drawn positions: first and
    last entries of every dimension, ``edges``, whole planes of the class dimension (a class masked with -inf), or
    scattered."""
    edges = edges or {}
    seed = draw_seed(draw)
    values = _seeded(shape, seed) * choose(draw, MAGNITUDES) + choose(draw, OFFSETS)
    if integer(draw, 0, 19) == 0:
        # Dyadic values: exact in every dtype, so ties (between classes, after upsampling) are exact ties.
        values = (values * 4).round() / 4
    if values.numel() == 0:
        return values
    specials = special_values(dtype)
    how = choose(draw, SPECIAL_LAYOUTS)
    if how == "points":
        for _ in range(integer(draw, 1, 3)):
            idx = tuple(draw_index(draw, size, edges.get(d, ())) for d, size in enumerate(shape))
            values[idx] = choose(draw, specials)
    elif how == "plane" and class_dim is not None and values.dim() > class_dim:
        plane = values.select(class_dim, draw_index(draw, shape[class_dim]))
        if draw(st.booleans()) or plane.numel() == 0:
            plane.fill_(choose(draw, PLANE_VALUES))
        else:
            # Part of the plane: the pixels of one batch entry.
            plane[draw_index(draw, plane.shape[0])] = choose(draw, specials)
    elif how == "all-equal":
        values.fill_(choose(draw, EQUAL_VALUES))
    elif how == "scattered":
        gen = torch.Generator().manual_seed(seed + 1)
        mask = torch.rand(shape, generator=gen) < 0.2
        picks = torch.tensor(specials, dtype=torch.float64)[torch.randint(0, len(specials), shape, generator=gen)]
        values = torch.where(mask, picks, values)
    return values


def draw_labels(draw, shape, num_classes: int, check_targets: bool) -> Tuple[torch.Tensor, int]:
    """(target, ignore_index): labels in [0, C) of a drawn integer dtype, some pixels ignore_index (when the dtype
    holds it), and with check_targets=False some labels outside [0, C) too."""
    dtype = choose(draw, LABEL_DTYPES)
    info = torch.iinfo(dtype)
    ignore_index = choose(draw, (255, -100, 0, num_classes - 1, -1, num_classes))
    gen = torch.Generator().manual_seed(draw_seed(draw))
    target = torch.randint(0, num_classes, shape, generator=gen)
    ignored = choose(draw, (0.0, 0.3, 1.0))
    if info.min <= ignore_index <= info.max:
        target[torch.rand(shape, generator=gen) < ignored] = ignore_index
    if not check_targets:
        bad = [v for v in (num_classes, num_classes + 7, -1, -3, info.max) if info.min <= v <= info.max]
        picks = torch.tensor(bad)[torch.randint(0, len(bad), shape, generator=gen)]
        target = torch.where(torch.rand(shape, generator=gen) < 0.2, picks, target)
    return target.to(dtype), ignore_index


def draw_weight(draw, num_classes: int) -> Optional[torch.Tensor]:
    """None, or class weights in [0, 2] with some zero (sometimes all zero)."""
    how = choose(draw, ("none", "none", "random", "some-zero", "all-zero"))
    if how == "none":
        return None
    weight = torch.rand(num_classes, generator=torch.Generator().manual_seed(draw_seed(draw)), dtype=torch.float64)
    weight = (weight * 128).round() / 64  # exact in float32 and float16
    if how == "some-zero":
        weight[draw_index(draw, num_classes)] = 0.0
    elif how == "all-zero":
        weight.zero_()
    return weight


def draw_ce_options(draw) -> Dict[str, Any]:
    return dict(reduction=choose(draw, REDUCTIONS), label_smoothing=choose(draw, (0.0, 0.0, 0.1, 0.5, 1.0)))


# ---- cross-entropy error scales -------------------------------------------------------------------------------------

def tolerance(dtype: torch.dtype) -> float:
    """The ``tol`` of :func:`assert_matches` for ``dtype``: scales are in units of it."""
    return TOLERANCE_ULPS * torch.finfo(acc_dtype(dtype)).eps


def ce_scales(dtype: torch.dtype, target: torch.Tensor, weight: Optional[torch.Tensor], num_classes: int, options,
              pixel_loss, grad_out, z_uncertainty=None):
    """Error scales of a cross-entropy loss and of its gradient with respect to the logits, per pixel.

    Per pixel i with target t and W_i = (1 - eps) w_t + eps / C * sum_c w_c (0 where ignored), a correct float
    implementation computes the loss within a few roundings of |l_i| + W_i (1 + log C), and d l_i / d z_c =
    W_i p_c - q_c within a few roundings of W_i (1 + log C) (p = softmax: exp of a difference of logits, relative to
    the max). A reduced loss adds those of its pixels (divided by the weight sum for "mean"). ``z_uncertainty``:
    how far the logits themselves may differ from the reference's (upsampled logits are sums): the loss moves by at
    most 2 W_i times that, the probabilities by at most that (capped at 2)."""
    ignore_index = options["ignore_index"]
    smoothing = options.get("label_smoothing", 0.0)
    t = target.long()
    valid = (t != ignore_index) & (t >= 0) & (t < num_classes)
    w = weight if weight is not None else torch.ones(num_classes, dtype=torch.float64)
    w_t = torch.where(valid, w[t.clamp(0, num_classes - 1)], torch.zeros((), dtype=torch.float64))
    big_w = torch.where(valid, (1 - smoothing) * w_t + smoothing / num_classes * w.sum(), torch.zeros(()).double())
    log_c = 1 + math.log(max(num_classes, 1))
    loss_scale = pixel_loss.abs().nan_to_num(posinf=0.0, neginf=0.0) + big_w * log_c
    grad_scale = big_w * log_c
    if z_uncertainty is not None:
        loss_scale = loss_scale + big_w * 2 * z_uncertainty / tolerance(dtype)
        grad_scale = grad_scale + big_w * z_uncertainty.clamp(max=2) / tolerance(dtype)
    reduction = options.get("reduction", "mean")
    denom = w_t.sum() if reduction == "mean" else torch.ones((), dtype=torch.float64)
    if denom == 0:
        denom = torch.ones((), dtype=torch.float64)  # every value of a mean over nothing is NaN, inf or exactly 0
    if reduction == "none":
        out_scale, g = loss_scale, grad_out.abs()
    else:
        out_scale, g = loss_scale.sum() / denom, grad_out.abs() / denom
    return out_scale, (g * grad_scale).unsqueeze(1)

"""upsample_cross_entropy and upsample_argmax against the composition they fuse: the bilinear upsampling
(F.conv_transpose2d with FCN's kernel + crop, or F.interpolate), rounded to the logits' dtype as upsample_add returns
it, then F.cross_entropy / argmax; through the shared op tester (tests/op_tester.py). Then what is particular to these
ops: memory, the module, and the Python errors for bad input."""

from __future__ import annotations

import itertools
import math
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from fcn_fast.bench.measure import peak_memory
from fcn_fast.ops.upsample_cross_entropy import UpsampleCrossEntropyLoss, upsample_argmax, upsample_cross_entropy
from harness import assert_close, backend_params, device_for, requires_backend
from op_tester import (REDUCTIONS, OpTester, Sample, acc_dtype, assert_matches, ce_scales, choose, draw_ce_options,
                       draw_labels, draw_values, draw_weight, finite_abs, integer)
from test_cross_entropy import cross_entropy_reference
from test_upsample_add import crop_edges, draw_geometry, onednn_bfloat16_spreads_nan, out_hw, upsample_reference

# Triton's interpreter computes masked-out lanes of -inf/NaN tiles with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning")

NATIVE_CPU = requires_backend("cpu")
CPU_BACKENDS = [p for p in backend_params() if p.id in ("reference", "cpu")]
IGNORE = 255
# coarse (2, 5, 4, 5), x2 deconvolution (full output 10 x 12) cropped to 8 x 9 at (1, 2).
GEOMETRY = dict(factor=2, mode="deconv", offset=(1, 2))
TARGET_HW = (8, 9)


# ---- the reference: plain PyTorch ------------------------------------------------------------------------------------

class _RoundedValues(torch.autograd.Function):
    """x rounded to a dtype in the forward only: the fused op rounds its logits as upsample_add returns them but
    keeps their gradient in the accumulate dtype (a cast's own backward would round the gradient too)."""

    @staticmethod
    def forward(ctx, x, dtype):
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def upsampled_logits(coarse, float_dtype, out_size, *, factor, mode="deconv", offset=(0, 0), align_corners=False):
    """The logits upsample_add returns for ``coarse``: upsampled in coarse's (accumulate) dtype, rounded to
    ``float_dtype``."""
    logits = upsample_reference(coarse, factor=factor, mode=mode, out_size=tuple(out_size), offset=offset,
                                align_corners=align_corners)
    return _RoundedValues.apply(logits, float_dtype)


def composition(coarse, target, weight=None, *, float_dtype=None, factor, mode="deconv", offset=(0, 0),
                align_corners=False, **ce_options):
    logits = upsampled_logits(coarse, float_dtype or coarse.dtype, target.shape[-2:], factor=factor, mode=mode,
                              offset=offset, align_corners=align_corners)
    return cross_entropy_reference(logits, target, weight, **ce_options)


def argmax_composition(coarse, float_dtype, *, out_size, dtype=torch.int64, **geometry):
    return upsampled_logits(coarse, float_dtype, out_size, **geometry).argmax(1).to(dtype)


GEOMETRY_KEYS = ("factor", "mode", "offset", "align_corners")


def logit_uncertainty(coarse64, float_dtype, out_size, options, rounded_in_dtype=False):
    """How far a correct implementation's upsampled logits may be from the reference's, per output pixel, as far as
    it matters to a softmax or an argmax: a few roundings of the terms summed (in the accumulate dtype, then
    rounding to ``float_dtype``), and 0 where every class reads the same coarse values (the classes' logits are then
    computed alike and exactly tie; PyTorch's own half-precision convolution, ``rounded_in_dtype``, rounds
    channels differently, and so does F.interpolate, which vectorises over channels and finishes the last few with
    other arithmetic: equal classes can then differ by an ulp). Classes whose logit is not finite do not count (they
    are compared exactly)."""
    geometry = {k: options[k] for k in GEOMETRY_KEYS if k in options}
    magnitude = upsample_reference(finite_abs(coarse64), out_size=tuple(out_size), **geometry)
    finite = upsample_reference(coarse64, out_size=tuple(out_size), **geometry).isfinite()
    eps = max(torch.finfo(float_dtype).eps, torch.finfo(acc_dtype(float_dtype)).eps * 8)
    largest = torch.where(finite, magnitude, torch.zeros(())).amax(1) if coarse64.shape[1] else magnitude.sum(1)
    differs = (coarse64 != coarse64[:, :1]).any(1, keepdim=True).double()
    reads_a_difference = upsample_reference(differs, out_size=tuple(out_size), **geometry)[:, 0] > 0
    channels_rounded_alike = not rounded_in_dtype and geometry.get("mode", "deconv") == "deconv"
    return 16 * eps * largest * (reads_a_difference | (not channels_rounded_alike))


# ---- the testers ----------------------------------------------------------------------------------------------------

def make_target(n, hw, num_classes, ignore, generator, ignore_index=IGNORE, dtype=torch.int64):
    target = torch.randint(0, num_classes, (n, *hw), generator=generator)
    if ignore == "some":
        target[torch.rand(target.shape, generator=generator) < 0.3] = ignore_index
    elif ignore == "all":
        target.fill_(ignore_index)
    return target.to(dtype)


def case(id, coarse_shape=(2, 5, 4, 5), target_hw=TARGET_HW, geometry=GEOMETRY, *, ignore="some",
         target_dtype=torch.int64, weighted=False, seed=0, tiny=True, scale=3.0, coarse=None, target=None,
         weight=None, **options) -> Sample:
    gen = torch.Generator().manual_seed(seed)
    values = scale * torch.randn(coarse_shape, generator=gen, dtype=torch.float64)
    labels = make_target(coarse_shape[0], target_hw, coarse_shape[1], ignore, gen, dtype=target_dtype)
    if weighted and weight is None:
        weight = torch.rand(coarse_shape[1], generator=gen, dtype=torch.float64) + 0.5
    return Sample(id, dict(coarse=values if coarse is None else coarse, target=labels if target is None else target,
                           weight=weight), {"ignore_index": IGNORE, **geometry, **options}, tiny)


GEOMETRIES = [
    # (id, coarse (N, C, h, w), target (H, W), geometry)
    ("deconv-x1", (2, 4, 3, 4), (3, 4), dict(factor=1, mode="deconv")),
    ("deconv-x2-full", (2, 4, 3, 4), (8, 10), dict(factor=2, mode="deconv")),
    ("deconv-x8-offset", (1, 3, 3, 3), (13, 11), dict(factor=8, mode="deconv", offset=(5, 9))),
    ("deconv-x3-odd", (1, 3, 4, 3), (9, 5), dict(factor=3, mode="deconv", offset=(1, 2))),
    ("deconv-x32", (1, 2, 2, 2), (40, 33), dict(factor=32, mode="deconv", offset=(19, 31))),
    # FCN-8s's upscore8: coarse of a 36 x 44 image upsampled x8 and cropped at 31 back to the image.
    ("fcn8s-upscore8", (1, 3, 8, 9), (36, 44), dict(factor=8, mode="deconv", offset=(31, 31))),
    ("interp-x2", (2, 3, 3, 4), (6, 8), dict(factor=2, mode="interp")),
    ("interp-x8", (1, 3, 3, 2), (24, 16), dict(factor=8, mode="interp")),
    ("interp-aligned-odd", (1, 3, 3, 4), (7, 5), dict(factor=2, mode="interp", align_corners=True)),
]


def _masked(sample: Sample, id: str, index, value=-math.inf, **options) -> Sample:
    coarse = sample.tensors["coarse"].clone()
    coarse[index] = value
    return Sample(id, {**sample.tensors, "coarse": coarse}, {**sample.options, **options}, sample.tiny)


def _filled(sample: Sample, id: str, value, **options) -> Sample:
    return _masked(sample, id, (...,), value, **options)


class TestUpsampleCrossEntropy(OpTester):
    differentiable = ("coarse",)
    relayouted = ("coarse", "target")

    def op(self, backend, coarse, target, weight=None, **options):
        return upsample_cross_entropy(coarse, target, weight=weight, backend=backend, **options)

    def reference(self, float_dtype, coarse, target, weight=None, **options):
        return composition(coarse, target, weight, float_dtype=float_dtype, **options)

    def input_dtype(self, name, dtype):
        return dtype if name != "weight" or dtype == torch.float64 else torch.float32

    def known_deviation(self, backend, dtype, sample):
        return onednn_bfloat16_spreads_nan(backend, dtype, sample.tensors["coarse"], sample.options["mode"])

    def samples(self):
        matrix = []
        for reduction, weighted, smoothing, ignore in itertools.product(REDUCTIONS, (False, True), (0.0, 0.2),
                                                                       ("none", "some", "all")):
            tiny = (reduction, weighted, smoothing, ignore) in (("mean", True, 0.2, "some"), ("none", False, 0.0, "none"))
            matrix.append(case(f"{reduction}-{'w' if weighted else 'nw'}-ls{smoothing}-{ignore}", ignore=ignore,
                               weighted=weighted, tiny=tiny, reduction=reduction, label_smoothing=smoothing))
        geometries = [case(id, shape, hw, geometry, weighted=True, label_smoothing=0.1, tiny=geometry["factor"] < 8)
                      for id, shape, hw, geometry in GEOMETRIES]
        labels = [case(f"target-{str(d)[6:]}", target_dtype=d, tiny=False) for d in (torch.int32, torch.int16, torch.uint8)]
        empty = [case(f"empty-batch-{r}", (0, 3, 4, 5), reduction=r, tiny=False) for r in REDUCTIONS]
        return matrix + geometries + labels + empty

    def layout_sample(self):
        return case("layouts", (2, 3, 4, 5), weighted=True, reduction="none", label_smoothing=0.1)

    def special_samples(self):
        base = case("x", (2, 3, 4, 4), (7, 8), dict(factor=2, mode="deconv", offset=(1, 0)), ignore="none",
                    target=torch.randint(0, 2, (2, 7, 8), generator=torch.Generator().manual_seed(3)))
        interp = case("x", (1, 3, 3, 4), (6, 8), dict(factor=2, mode="interp"), ignore="none")
        labels = case("x", (2, 4, 3, 3), (5, 5), dict(factor=2, mode="deconv", offset=(1, 1)), ignore="some")
        bad = labels.tensors["target"].clone()
        bad[0, 0, :3] = torch.tensor([7, -3, 100])
        samples = []
        for reduction, smoothing in (("none", 0.0), ("mean", 0.1), ("sum", 0.1)):
            opts = dict(reduction=reduction, label_smoothing=smoothing)
            tag = f"{reduction}-ls{smoothing}"
            samples += [
                # A class masked with -inf (the example: classes 0 and 1 are the labels).
                _masked(base, f"deconv-class-neg-inf-{tag}", (slice(None), 2), **opts),
                _masked(base, f"deconv-first-class-neg-inf-{tag}", (slice(None), 0), **opts),
                _masked(interp, f"interp-class-neg-inf-{tag}", (slice(None), 1), **opts),
                _masked(base, f"nan-point-{tag}", (0, 1, 2, 1), math.nan, **opts),
                _masked(base, f"inf-point-{tag}", (1, 0, 1, 2), math.inf, **opts),
                _filled(base, f"all-equal-3e38-{tag}", 3e38, **opts),
                _filled(base, f"all-equal-1e30-{tag}", 1e30, **opts),
                Sample(f"large-1e7-{tag}", {**base.tensors, "coarse": base.tensors["coarse"] / 3 + 1e7},
                       {**base.options, **opts}),
                Sample(f"zero-weight-class-{tag}", {**labels.tensors, "weight": torch.tensor([0.0, 1.0, 2.0, 1.0],
                                                    dtype=torch.float64)}, {**labels.options, **opts}),
                Sample(f"total-weight-zero-{tag}", {**labels.tensors, "weight": torch.zeros(4, dtype=torch.float64)},
                       {**labels.options, **opts}),
                Sample(f"unchecked-bad-labels-{tag}", {**labels.tensors, "target": bad},
                       {**labels.options, "check_targets": False, **opts}),
            ]
        return samples

    def gradcheck_samples(self):
        return [case(f"{mode}-{reduction}", (1, 3, 3, 3), (5, 6),
                     dict(factor=2, mode=mode, offset=(1, 0)) if mode == "deconv" else dict(factor=2, mode=mode),
                     weighted=True, seed=2, reduction=reduction, label_smoothing=0.1)
                for mode in ("deconv", "interp") for reduction in ("mean", "none")]

    def thread_samples(self):
        return [case(f"x8-{reduction}", (3, 6, 9, 11), (60, 75), dict(factor=8, mode="deconv", offset=(7, 3)),
                     weighted=True, reduction=reduction, label_smoothing=0.1, tiny=False) for reduction in REDUCTIONS]

    def scales(self, dtype, inputs, options, expected, grad_out, rounded_in_dtype):
        coarse, target, weight = inputs["coarse"], inputs["target"], inputs["weight"]
        geometry = {k: options[k] for k in GEOMETRY_KEYS if k in options}
        ce_options = {k: v for k, v in options.items() if k not in GEOMETRY_KEYS}
        out_size = target.shape[-2:]
        per_pixel = composition(coarse, target, weight, **geometry, **{**ce_options, "reduction": "none"})
        uncertainty = logit_uncertainty(coarse, dtype, out_size, options, rounded_in_dtype)
        out_scale, pixel_grad = ce_scales(dtype, target, weight, coarse.shape[1], ce_options, per_pixel, grad_out,
                                          uncertainty)
        # The coarse gradient gathers the pixels' gradients with the (non-negative) bilinear weights.
        x = torch.zeros_like(coarse, requires_grad=True)
        up = upsample_reference(x, out_size=tuple(out_size), **geometry)
        (grad_scale,) = torch.autograd.grad(up, x, pixel_grad.expand(up.shape))
        return out_scale, {"coarse": grad_scale}

    def property_sample(self, draw, dtype, small):
        (h, w), geometry = draw_geometry(draw, small)
        out_size = out_hw((h, w), **geometry)
        geometry.pop("out_size")
        n, c = integer(draw, 0, 2), choose(draw, (1, 2, 3, 5))
        edges = {2: crop_edges(h, out_size[0], geometry["factor"], geometry["mode"], geometry.get("offset", (0, 0))[0]),
                 3: crop_edges(w, out_size[1], geometry["factor"], geometry["mode"], geometry.get("offset", (0, 0))[1])}
        coarse = draw_values(draw, (n, c, h, w), dtype, edges)
        check_targets = choose(draw, (True, True, False))
        target, ignore_index = draw_labels(draw, (n, *out_size), c, check_targets)
        options = dict(geometry, ignore_index=ignore_index, check_targets=check_targets, **draw_ce_options(draw))
        return Sample("drawn", dict(coarse=coarse, target=target, weight=draw_weight(draw, c)), options)

    def opcheck_calls(self, backend):
        gen = torch.Generator().manual_seed(6)
        device = device_for(backend)
        coarse = torch.randn(2, 3, 3, 4, generator=gen).to(device).requires_grad_()
        target = make_target(2, (5, 6), 3, "some", gen).to(device)
        weight = (torch.rand(3, generator=gen) + 0.5).to(device)
        return [(torch.ops.fcn_fast.upsample_cross_entropy.default,
                 (coarse, target, weight, 2, "deconv", 1, 1, False, IGNORE, reduction, 0.1, True, backend))
                for reduction in ("mean", "none")]


def argmax_case(id, coarse_shape, out_size, geometry, *, dyadic=False, seed=4, tiny=True, dtype=torch.int64,
                coarse=None):
    gen = torch.Generator().manual_seed(seed)
    if coarse is None:
        coarse = torch.randn(coarse_shape, generator=gen, dtype=torch.float64)
        if dyadic:
            # Quarter-integer scores and the dyadic taps of x2 / x8 deconvolution make every logit exact in every
            # dtype; class 4 copies class 1: exact ties everywhere, which the lower class wins.
            coarse = torch.randint(-8, 8, coarse_shape, generator=gen).double() / 4
            coarse[:, 4] = coarse[:, 1]
    return Sample(id, dict(coarse=coarse), dict(out_size=out_size, dtype=dtype, **geometry), tiny)


class TestUpsampleArgmax(OpTester):
    """Labels are compared exactly where the reference's top logits are apart by more than rounding (ties go to the
    lower class, a NaN wins); where two classes are within what rounding of the upsampled sums can move, either is
    right."""

    test_gradcheck = None  # labels have no gradient

    def op(self, backend, coarse, **options):
        return upsample_argmax(coarse, backend=backend, **options)

    def reference(self, float_dtype, coarse, **options):
        return argmax_composition(coarse, float_dtype, **options)

    def known_deviation(self, backend, dtype, sample):
        return onednn_bfloat16_spreads_nan(backend, dtype, sample.tensors["coarse"], sample.options["mode"])

    def samples(self):
        samples = []
        for dtype in (torch.int64, torch.uint8):
            tag = str(dtype)[6:]
            samples += [argmax_case(f"dyadic-ties-x2-{tag}", (2, 6, 4, 5), TARGET_HW, GEOMETRY, dyadic=True, dtype=dtype),
                        argmax_case(f"dyadic-ties-x8-{tag}", (2, 6, 4, 5), (20, 25), dict(factor=8, mode="deconv",
                                    offset=(3, 9)), dyadic=True, dtype=dtype)]
        samples += [argmax_case(f"random-{id}", shape, hw, geometry, tiny=geometry["factor"] < 8)
                    for id, shape, hw, geometry in GEOMETRIES]
        samples += [argmax_case("empty-batch", (0, 3, 4, 5), TARGET_HW, GEOMETRY, tiny=False)]
        return samples

    def layout_sample(self):
        return argmax_case("layouts", (2, 5, 4, 5), TARGET_HW, GEOMETRY)

    def special_samples(self):
        ties = torch.zeros(1, 4, 3, 3, dtype=torch.float64)  # every class ties everywhere: class 0
        ties[0, 2, 1, 1] = math.nan  # pixels reading it: the NaN class wins, as torch.argmax does
        ties[0, 3, 0, 0] = math.nan
        base = argmax_case("x", (2, 3, 4, 4), (7, 8), dict(factor=2, mode="deconv", offset=(1, 0)))
        masked = lambda index, value=-math.inf: _masked(base, "x", index, value).tensors["coarse"]  # noqa: E731
        geometry = dict(factor=2, mode="deconv", offset=(1, 0))
        interp = dict(factor=2, mode="interp")
        return [
            argmax_case("nan-and-ties-interp", None, (6, 6), interp, coarse=ties),
            argmax_case("nan-and-ties-deconv", None, (6, 6), dict(factor=2, mode="deconv", offset=(1, 1)), coarse=ties),
            argmax_case("masked-class-neg-inf", None, (7, 8), geometry, coarse=masked((slice(None), 2))),
            argmax_case("masked-first-class-neg-inf", None, (7, 8), geometry, coarse=masked((slice(None), 0))),
            argmax_case("all-neg-inf", None, (7, 8), geometry, coarse=masked((...,))),
            argmax_case("inf-point", None, (7, 8), geometry, coarse=masked((0, 1, 2, 2), math.inf)),
            argmax_case("all-equal-3e38", None, (7, 8), geometry, coarse=masked((...,), 3e38)),
        ]

    def thread_samples(self):
        return [argmax_case("x8", (3, 6, 9, 11), (60, 75), dict(factor=8, mode="deconv", offset=(7, 3)), tiny=False)]

    def property_sample(self, draw, dtype, small):
        (h, w), geometry = draw_geometry(draw, small)
        out_size = out_hw((h, w), **geometry)
        geometry["out_size"] = out_size
        n, c = integer(draw, 0, 2), choose(draw, (1, 2, 3, 5))
        edges = {2: crop_edges(h, out_size[0], geometry["factor"], geometry["mode"], geometry.get("offset", (0, 0))[0]),
                 3: crop_edges(w, out_size[1], geometry["factor"], geometry["mode"], geometry.get("offset", (0, 0))[1])}
        coarse = draw_values(draw, (n, c, h, w), dtype, edges)
        return Sample("drawn", dict(coarse=coarse), dict(geometry, dtype=choose(draw, (torch.int64, torch.uint8))))

    def assert_outputs_match(self, actual, expected, dtype, out_scale, grad_scales, ref_inputs, options,
                             rounded_in_dtype):
        labels, want = actual.out.cpu(), expected.out
        assert labels.dtype == options.get("dtype", torch.int64) and labels.shape == want.shape
        if torch.equal(labels, want):
            return
        geometry = {k: options[k] for k in GEOMETRY_KEYS if k in options}
        coarse = ref_inputs["coarse"]
        z = upsampled_logits(coarse.to(acc_dtype(dtype)), dtype, options["out_size"], **geometry).double()
        slack = 2 * logit_uncertainty(coarse, dtype, options["out_size"], options, rounded_in_dtype)
        chosen = z.gather(1, labels.long().unsqueeze(1)).squeeze(1)
        best = z.nan_to_num(nan=math.inf).amax(1)
        has_nan = z.isnan().any(1)
        within = (chosen >= best - slack) & (slack > 0) & ~has_nan & ~best.isinf()
        wrong = (labels.long() != want.long()) & ~within
        assert not wrong.any(), (f"labels differ at {wrong.nonzero().tolist()[:4]} ({int(wrong.sum())} in all): "
                                 f"{labels[wrong][:4].tolist()} for {want[wrong][:4].tolist()}; logits there: "
                                 f"{z.movedim(1, -1)[wrong][:4].tolist()}")

    def opcheck_calls(self, backend):
        coarse = torch.randn(2, 3, 3, 4, generator=torch.Generator().manual_seed(6)).to(device_for(backend))
        return [(torch.ops.fcn_fast.upsample_argmax.default,
                 (coarse, 2, "interp", 6, 8, 0, 0, False, torch.uint8, backend))]


def test_argmax_has_no_gradient():
    coarse = torch.randn(1, 3, 3, 3, requires_grad=True)
    labels = upsample_argmax(coarse, factor=2, out_size=(6, 6))
    assert not labels.requires_grad


# ---- memory --------------------------------------------------------------------------------------------------------

def peak_cpu_allocation(fn) -> int:
    return peak_memory(fn, torch.device("cpu"))  # the benchmark suite's measurement: the allocator's events


@NATIVE_CPU
def test_peak_memory_is_independent_of_classes():
    n, c, hw = 2, 64, (120, 136)
    gen = torch.Generator().manual_seed(8)
    coarse = torch.randn(n, c, 16, 18, generator=gen, requires_grad=True)
    target = make_target(n, hw, c, "some", gen)
    geometry = dict(factor=8, mode="deconv", offset=(5, 7))

    def fused():
        upsample_cross_entropy(coarse, target, backend="cpu", **geometry).backward()

    def eager():
        composition(coarse, target, **geometry).backward()

    full_logits = n * c * hw[0] * hw[1] * 4
    per_pixel = n * hw[0] * hw[1] * 4
    # The CPU kernels' per-thread rows: two resampled coarse rows and the backward's band of up to all coarse rows,
    # each C x out_w (upsample_cross_entropy_cpu.cpp), plus six pixel rows.
    scratch = torch.get_num_threads() * (c * hw[1] * (2 + coarse.shape[2]) + 6 * hw[1]) * 4
    assert peak_cpu_allocation(eager) >= full_logits  # the measurement sees the logits the composition stores
    small = 64 << 10  # per-row sums, tap tables, scalars
    # Fused: the softmax statistics (two floats per pixel: max and log-sum), grad_coarse and the scratch; nothing of
    # C * H * W.
    assert peak_cpu_allocation(fused) <= 2 * per_pixel + coarse.numel() * 4 + scratch + small < full_logits / 4


@NATIVE_CPU
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_forward_keeps_two_floats_per_pixel(reduction):
    """A reduced loss's forward holds the softmax statistics (two floats per pixel, each pixel's max logit and
    log-sum relative to it: what backward needs) and the kernel's per-row sums, no per-pixel loss or weight buffers;
    "none" returns the per-pixel loss, so it holds more."""
    n, c, hw = 2, 8, (120, 136)
    gen = torch.Generator().manual_seed(9)
    coarse = torch.randn(n, c, 16, 18, generator=gen, requires_grad=True)
    target = make_target(n, hw, c, "some", gen)
    geometry = dict(factor=8, mode="deconv", offset=(5, 7))
    per_pixel = n * hw[0] * hw[1] * 4
    scratch = torch.get_num_threads() * 3 * (c + 1) * hw[1] * 4  # the forward's per-thread rows
    small = 16 << 10  # per-row sums, tap tables, scalars
    reduced = peak_cpu_allocation(lambda: upsample_cross_entropy(coarse, target, reduction=reduction, backend="cpu",
                                                                 **geometry))
    assert reduced <= 2 * per_pixel + scratch + small < 3 * per_pixel
    unreduced = peak_cpu_allocation(lambda: upsample_cross_entropy(coarse, target, reduction="none", backend="cpu",
                                                                   **geometry))
    assert unreduced >= 4 * per_pixel


# ---- module --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_tensor_and_coarse_output(backend):
    gen = torch.Generator().manual_seed(9)
    coarse = torch.randn(2, 5, 4, 5, dtype=torch.float64, generator=gen)
    target = make_target(2, TARGET_HW, 5, "some", gen)
    weight = torch.rand(5, dtype=torch.float64, generator=gen) + 0.5
    module = UpsampleCrossEntropyLoss(weight, reduction="sum", label_smoothing=0.1, backend=backend)
    expected = composition(coarse, target, weight=weight, reduction="sum", label_smoothing=0.1, **GEOMETRY)
    torch.testing.assert_close(module(coarse, target, factor=2, offset=(1, 2)), expected)
    output = types.SimpleNamespace(logits=coarse, factor=2, offset=(1, 2), mode="deconv", align_corners=False)
    torch.testing.assert_close(module(output, target), expected)
    assert repr(module) == ("UpsampleCrossEntropyLoss(mode='deconv', ignore_index=255, reduction='sum', "
                            f"weight=Tensor[5], label_smoothing=0.1, backend={backend!r})")
    with pytest.raises(ValueError, match="factor is required"):
        module(coarse, target)


def test_module_moves_weight_with_to():
    module = UpsampleCrossEntropyLoss(torch.ones(3)).to(torch.float64)
    assert module.weight.dtype == torch.float64 and "weight" in dict(module.named_buffers())


# ---- bad input -----------------------------------------------------------------------------------------------------

def _good():
    return dict(coarse=torch.randn(2, 5, 4, 5), target=torch.zeros(2, *TARGET_HW, dtype=torch.long), **GEOMETRY)


BAD_INPUTS = [
    ("coarse-not-tensor", dict(coarse=[1.0]), TypeError, "coarse must be a torch.Tensor"),
    ("coarse-3d", dict(coarse=torch.randn(5, 4, 5)), ValueError, "coarse must have 4 dimensions"),
    ("coarse-int", dict(coarse=torch.zeros(2, 5, 4, 5, dtype=torch.long)), TypeError, "coarse must have dtype"),
    ("coarse-no-classes", dict(coarse=torch.randn(2, 0, 4, 5)), ValueError, "at least one class"),
    ("target-float", dict(target=torch.zeros(2, *TARGET_HW)), TypeError, "target must have dtype"),
    ("target-4d", dict(target=torch.zeros(2, 1, *TARGET_HW, dtype=torch.long)), ValueError,
     r"target must be \(N, H, W\).*target: shape \(2, 1, 8, 9\).*coarse: shape \(2, 5, 4, 5\)"),
    ("target-batch", dict(target=torch.zeros(3, *TARGET_HW, dtype=torch.long)), ValueError,
     r"target: shape \(3, 8, 9\).*coarse: shape \(2, 5, 4, 5\)"),
    ("target-too-big", dict(target=torch.zeros(2, 10, 9, dtype=torch.long)), ValueError,
     "does not fit in the deconvolution output"),
    ("label-out-of-range", dict(target=torch.full((2, *TARGET_HW), 9, dtype=torch.long)), ValueError,
     r"outside \[0, 5\).*9 \(144 pixels\)"),
    ("negative-label", dict(target=torch.full((2, *TARGET_HW), -1, dtype=torch.long)), ValueError, r"-1 \(144"),
    ("weight-length", dict(weight=torch.ones(4)), ValueError, "one entry per class"),
    ("weight-int", dict(weight=torch.ones(5, dtype=torch.long)), TypeError, "weight must have dtype"),
    ("weight-2d", dict(weight=torch.ones(1, 5)), ValueError, "weight must have 1 dimensions"),
    ("smoothing-high", dict(label_smoothing=1.5), ValueError, "label_smoothing must be a float in"),
    ("smoothing-negative", dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction must be one of"),
    ("ignore-index-float", dict(ignore_index=2.5), TypeError, "ignore_index must be an int"),
    ("factor-zero", dict(factor=0), ValueError, "factor must be >= 1"),
    ("factor-float", dict(factor=2.0), TypeError, "factor must be an int"),
    ("mode", dict(mode="nearest"), ValueError, "mode must be one of"),
    ("offset-negative", dict(offset=(-1, 0)), ValueError, "offset"),
    ("offset-interp", dict(mode="interp", offset=(1, 1)), ValueError, "offset applies to mode='deconv' only"),
    ("align-corners-deconv", dict(align_corners=True), ValueError, "align_corners applies to mode='interp'"),
    ("backend", dict(backend="tpu"), ValueError, "unknown backend"),
]


@pytest.mark.parametrize("name,change,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(name, change, error, message):
    args = _good()
    args.update(change)
    with pytest.raises(error, match=message) as info:
        upsample_cross_entropy(args.pop("coarse"), args.pop("target"), **args)
    if name != "backend":  # the backend registry's message names the backend, not the op
        assert "upsample_cross_entropy" in str(info.value)


def test_bad_input_devices():
    if not torch.cuda.is_available():
        meta = torch.zeros(2, *TARGET_HW, dtype=torch.long, device="meta")
        with pytest.raises(ValueError, match="logits and target must be on one device"):
            upsample_cross_entropy(torch.randn(2, 5, 4, 5), meta, **GEOMETRY)
        with pytest.raises(ValueError, match="weight must be on the logits' device"):
            upsample_cross_entropy(torch.randn(2, 5, 4, 5), torch.zeros(2, *TARGET_HW, dtype=torch.long),
                                   weight=torch.ones(5, device="meta"), **GEOMETRY)
        return
    with pytest.raises(ValueError, match="one device"):
        upsample_cross_entropy(torch.randn(2, 5, 4, 5, device="cuda"), torch.zeros(2, *TARGET_HW, dtype=torch.long),
                               **GEOMETRY)


@NATIVE_CPU
def test_backend_device_mismatch():
    with pytest.raises(ValueError, match="backend 'cuda' is unavailable"):
        upsample_cross_entropy(torch.randn(2, 5, 4, 5), torch.zeros(2, *TARGET_HW, dtype=torch.long), backend="cuda",
                               **GEOMETRY)


ARGMAX_BAD = [
    ("dtype", dict(dtype=torch.int32), TypeError, "dtype must be torch.int64 or torch.uint8"),
    ("uint8-classes", dict(coarse=torch.randn(1, 300, 2, 2)), ValueError, "at most 256 classes"),
    ("out-size-none", dict(out_size=None), ValueError, "out_size"),
    ("out-size-zero", dict(out_size=(0, 4)), ValueError, "out_size"),
    ("out-size-too-big", dict(out_size=(11, 12)), ValueError, "does not fit"),
    ("coarse-3d", dict(coarse=torch.randn(5, 4, 5)), ValueError, "coarse must have 4 dimensions"),
]


@pytest.mark.parametrize("name,change,error,message", ARGMAX_BAD, ids=[b[0] for b in ARGMAX_BAD])
def test_argmax_bad_input(name, change, error, message):
    args = dict(coarse=torch.randn(2, 5, 4, 5), out_size=TARGET_HW, **GEOMETRY)
    if name == "uint8-classes":
        args["dtype"] = torch.uint8
    args.update(change)
    with pytest.raises(error, match=message) as info:
        upsample_argmax(args.pop("coarse"), **args)
    assert "upsample_argmax" in str(info.value)

"""upsample_cross_entropy / upsample_argmax against the composition they fuse: upsample_add_reference (F.interpolate or
the bilinear F.conv_transpose2d + crop) followed by F.cross_entropy / argmax, on every backend."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fcn_fast import available_backends
from fcn_fast._backends import triton_interpreted
from fcn_fast.bench.measure import peak_memory
from fcn_fast.ops.upsample_add import upsample_add_reference
from fcn_fast.ops.upsample_cross_entropy import UpsampleCrossEntropyLoss, upsample_argmax, upsample_cross_entropy
from harness import DTYPES, TOLERANCES, backend_params, device_for

BACKENDS = backend_params()
CPU_BACKENDS = [p for p in BACKENDS if p.id in ("reference", "cpu")]
NATIVE_CPU = pytest.mark.skipif(not available_backends()["cpu"].available, reason="fcn_fast._C not built")

# coarse (2, 5, 4, 5), x2 deconvolution (full output 10 x 12) cropped to 8 x 9 at (1, 2).
GEOMETRY = dict(factor=2, mode="deconv", offset=(1, 2))
TARGET_HW = (8, 9)


def composition(coarse, target, *, factor, mode="deconv", offset=(0, 0), align_corners=False, weight=None,
                ignore_index=255, reduction="mean", label_smoothing=0.0):
    logits = upsample_add_reference(coarse, factor=factor, mode=mode, out_size=tuple(target.shape[-2:]),
                                    offset=offset, align_corners=align_corners)
    return F.cross_entropy(logits, target.long(), weight=weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def make_target(n, hw, num_classes, ignore, generator, ignore_index=255, dtype=torch.int64):
    target = torch.randint(0, num_classes, (n, *hw), generator=generator)
    if ignore == "some":
        target[torch.rand(target.shape, generator=generator) < 0.3] = ignore_index
    elif ignore == "all":
        target.fill_(ignore_index)
    return target.to(dtype)


def assert_scaled_close(actual, expected, dtype):
    """Values compared relative to the largest expected magnitude, with the dtype's tolerance (gradients of a mean
    over many pixels are tiny: an absolute tolerance alone would not test them)."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert actual.shape == expected.shape
    assert torch.equal(actual.isnan(), expected.isnan())
    scale = expected.nan_to_num().abs().max().clamp(min=1e-30)
    torch.testing.assert_close(actual.nan_to_num() / scale, expected.nan_to_num() / scale, **TOLERANCES[dtype])


def check_against_composition(backend, dtype, *, coarse_shape=(2, 5, 4, 5), target_hw=TARGET_HW, geometry=GEOMETRY,
                              reduction="mean", weighted=False, smoothing=0.0, ignore="some", target_dtype=torch.int64,
                              seed=0):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(seed)
    coarse = (3 * torch.randn(coarse_shape, generator=gen)).to(dtype)
    target = make_target(coarse_shape[0], target_hw, coarse_shape[1], ignore, gen, dtype=target_dtype)
    weight = torch.rand(coarse_shape[1], generator=gen) + 0.5 if weighted else None
    options = dict(reduction=reduction, label_smoothing=smoothing, **geometry)
    # Oracle: the composition in float64 on the coarse values the op sees.
    expected_coarse = coarse.double().requires_grad_()
    expected = composition(expected_coarse, target, weight=None if weight is None else weight.double(), **options)
    grad_out = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad(expected, expected_coarse, grad_out)

    actual_coarse = coarse.to(device).requires_grad_()
    actual = upsample_cross_entropy(actual_coarse, target.to(device), weight=None if weight is None else weight.to(device),
                                    backend=backend, **options)
    assert actual.dtype == dtype and actual.shape == expected.shape
    (actual_grad,) = torch.autograd.grad(actual, actual_coarse, grad_out.to(device, dtype))
    assert actual_grad.dtype == dtype
    assert_scaled_close(actual, expected, dtype)
    if ignore == "all" and reduction == "mean":
        assert torch.isnan(actual).all()  # 0 / 0, as PyTorch gives
        return
    assert_scaled_close(actual_grad, expected_grad, dtype)


# ---- values and gradients against the composition --------------------------------------------------------------

@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2], ids=["nosmooth", "smooth"])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
def test_matches_composition(backend, dtype, reduction, weighted, smoothing, ignore):
    check_against_composition(backend, dtype, reduction=reduction, weighted=weighted, smoothing=smoothing,
                              ignore=ignore)


TRITON = [p for p in BACKENDS if p.id == "triton"]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction,weighted,smoothing,ignore", [
    ("mean", True, 0.2, "some"), ("none", False, 0.0, "none")])
def test_triton_matches_composition(backend, dtype, reduction, weighted, smoothing, ignore):
    check_against_composition(backend, dtype, coarse_shape=(1, 3, 3, 3), target_hw=(5, 4), reduction=reduction,
                              weighted=weighted, smoothing=smoothing, ignore=ignore)


@pytest.mark.slow
@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2], ids=["nosmooth", "smooth"])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
def test_triton_matches_composition_full(backend, dtype, reduction, weighted, smoothing, ignore):
    check_against_composition(backend, dtype, coarse_shape=(1, 3, 3, 3), target_hw=(5, 4), reduction=reduction,
                              weighted=weighted, smoothing=smoothing, ignore=ignore)


GEOMETRIES = [
    # (coarse (N, C, h, w), target (H, W), geometry)
    pytest.param((2, 4, 3, 4), (3, 4), dict(factor=1, mode="deconv"), id="deconv-x1"),
    pytest.param((2, 4, 3, 4), (8, 10), dict(factor=2, mode="deconv"), id="deconv-x2-full"),
    pytest.param((1, 3, 3, 3), (13, 11), dict(factor=8, mode="deconv", offset=(5, 9)), id="deconv-x8-offset"),
    pytest.param((1, 3, 4, 3), (9, 5), dict(factor=3, mode="deconv", offset=(1, 2)), id="deconv-x3-odd"),
    pytest.param((1, 2, 2, 2), (40, 33), dict(factor=32, mode="deconv", offset=(19, 31)), id="deconv-x32"),
    # FCN-8s's upscore8: coarse of a 36 x 44 image upsampled x8 and cropped at 31 back to the image.
    pytest.param((1, 3, 8, 9), (36, 44), dict(factor=8, mode="deconv", offset=(31, 31)), id="fcn8s-upscore8"),
    pytest.param((2, 3, 3, 4), (6, 8), dict(factor=2, mode="interp"), id="interp-x2"),
    pytest.param((1, 3, 3, 2), (24, 16), dict(factor=8, mode="interp"), id="interp-x8"),
    pytest.param((1, 3, 3, 4), (7, 5), dict(factor=2, mode="interp", align_corners=True), id="interp-aligned-odd"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("coarse_shape,target_hw,geometry", GEOMETRIES)
def test_geometries(backend, coarse_shape, target_hw, geometry):
    if backend == "triton" and triton_interpreted() and geometry["factor"] >= 8:
        pytest.skip("x8/x32 readers windows take minutes under the Triton interpreter: test_triton_large_geometries")
    check_geometry(backend, coarse_shape, target_hw, geometry)


@pytest.mark.slow
@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("coarse_shape,target_hw,geometry", [p for p in GEOMETRIES if p.values[2]["factor"] >= 8])
def test_triton_large_geometries(backend, coarse_shape, target_hw, geometry):
    check_geometry(backend, coarse_shape, target_hw, geometry)


def check_geometry(backend, coarse_shape, target_hw, geometry):
    dtype = torch.float32 if backend == "triton" else torch.float64
    check_against_composition(backend, dtype, coarse_shape=coarse_shape, target_hw=target_hw, geometry=geometry,
                              weighted=True, smoothing=0.1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int16, torch.uint8], ids=str)
def test_integer_target_dtypes(backend, target_dtype):
    check_against_composition(backend, torch.float64, target_dtype=target_dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unchecked_invalid_labels_are_ignored(backend):
    gen = torch.Generator().manual_seed(1)
    coarse = torch.randn(2, 5, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    target = make_target(2, TARGET_HW, 5, "some", gen)
    bad = target.clone()
    bad[0, 0, :3] = torch.tensor([7, -3, 100])
    expected_target = bad.clone()
    expected_target[(bad < 0) | (bad >= 5)] = 255
    actual = upsample_cross_entropy(coarse, bad, check_targets=False, backend=backend, **GEOMETRY)
    expected = composition(coarse, expected_target, **GEOMETRY)
    torch.testing.assert_close(actual, expected)
    with pytest.raises(ValueError, match=r"7 \(1 pixels\)"):
        upsample_cross_entropy(coarse, bad, backend=backend, **GEOMETRY)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_logits_give_nan_loss(backend):
    coarse = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    coarse[0, 1, 2, 2] = float("nan")
    target = torch.zeros(1, *TARGET_HW, dtype=torch.long)
    actual = upsample_cross_entropy(coarse, target, reduction="none", backend=backend, **GEOMETRY)
    expected = composition(coarse, target, reduction="none", **GEOMETRY)
    assert torch.equal(actual.isnan(), expected.isnan()) and actual.isnan().any()
    torch.testing.assert_close(actual.nan_to_num(), expected.nan_to_num())


# ---- gradients: gradcheck, determinism --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("mode", ["deconv", "interp"])
def test_gradcheck(backend, reduction, mode):
    gen = torch.Generator().manual_seed(2)
    coarse = torch.randn(1, 3, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    geometry = dict(factor=2, mode=mode, offset=(1, 0)) if mode == "deconv" else dict(factor=2, mode=mode)
    target = make_target(1, (5, 6), 3, "some", gen)
    weight = torch.rand(3, dtype=torch.float64, generator=gen) + 0.5

    def loss(x):
        return upsample_cross_entropy(x, target, weight=weight, reduction=reduction, label_smoothing=0.1,
                                      backend=backend, **geometry)

    assert torch.autograd.gradcheck(loss, (coarse,))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "reference"])
def test_backward_is_bitwise_deterministic(backend):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(3)
    shape, hw = ((1, 3, 3, 3), (5, 4)) if backend == "triton" else ((3, 6, 9, 11), (60, 75))
    geometry = dict(factor=8, mode="deconv", offset=(7, 3))
    coarse = torch.randn(shape, generator=gen).to(device).requires_grad_()
    target = make_target(shape[0], hw, shape[1], "some", gen).to(device)
    grads = []
    for _ in range(2):
        loss = upsample_cross_entropy(coarse, target, label_smoothing=0.1, backend=backend, **geometry)
        (grad,) = torch.autograd.grad(loss, coarse)
        grads.append(grad)
    assert torch.equal(grads[0], grads[1])


# ---- argmax ------------------------------------------------------------------------------------------------------

def expected_argmax(coarse, out_size, geometry):
    return upsample_add_reference(coarse, out_size=out_size, **geometry).argmax(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_matches_composition(backend, dtype):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(4)
    # Quarter-integer scores and the dyadic taps of x2 / x8 deconvolution make every logit exact in every dtype
    # here, so the composition's argmax (ties included) is well defined and must be met exactly.
    coarse = (torch.randint(-8, 8, (2, 6, 4, 5), generator=gen) / 4).to(dtype)
    coarse[:, 4] = coarse[:, 1]  # exact ties everywhere between classes 1 and 4: the lower class wins
    for geometry, hw in [(GEOMETRY, TARGET_HW), (dict(factor=8, mode="deconv", offset=(3, 9)), (20, 25))]:
        expected = expected_argmax(coarse, hw, geometry)
        for dtype_out in (torch.int64, torch.uint8):
            actual = upsample_argmax(coarse.to(device), out_size=hw, dtype=dtype_out, backend=backend, **geometry)
            assert actual.dtype == dtype_out and actual.shape == expected.shape
            assert torch.equal(actual.cpu().long(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_nan_and_ties_as_torch(backend):
    device = device_for(backend)
    coarse = torch.zeros(1, 4, 3, 3)  # every class ties everywhere: class 0
    coarse[0, 2, 1, 1] = float("nan")  # pixels reading it: the NaN class wins, as torch.argmax does
    coarse[0, 3, 0, 0] = float("nan")
    geometry = dict(factor=2, mode="interp")
    expected = expected_argmax(coarse, (6, 6), geometry)
    assert (expected == 0).any() and (expected == 2).any()
    actual = upsample_argmax(coarse.to(device), out_size=(6, 6), backend=backend, **geometry)
    assert torch.equal(actual.cpu(), expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_argmax_random_geometries(backend):
    gen = torch.Generator().manual_seed(5)
    coarse = torch.randn(2, 7, 5, 6, dtype=torch.float64, generator=gen)
    for geometry, hw in [(dict(factor=4, mode="interp"), (20, 24)), (dict(factor=3, mode="deconv", offset=2), (12, 14)),
                         (dict(factor=2, mode="interp", align_corners=True), (9, 11))]:
        actual = upsample_argmax(coarse, out_size=hw, backend=backend, **geometry)
        assert torch.equal(actual, expected_argmax(coarse, hw, geometry))


def test_argmax_has_no_gradient():
    coarse = torch.randn(1, 3, 3, 3, requires_grad=True)
    labels = upsample_argmax(coarse, factor=2, out_size=(6, 6))
    assert not labels.requires_grad


# ---- fuzzing -------------------------------------------------------------------------------------------------------

@st.composite
def cases(draw):
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 6))
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    factor = draw(st.integers(1, 5))
    mode = draw(st.sampled_from(["deconv", "interp"]))
    if mode == "deconv":
        full_h, full_w = (h - 1) * factor + 2 * factor - factor % 2, (w - 1) * factor + 2 * factor - factor % 2
        oy, ox = draw(st.integers(0, full_h - 1)), draw(st.integers(0, full_w - 1))
        hw = (draw(st.integers(1, full_h - oy)), draw(st.integers(1, full_w - ox)))
        geometry = dict(factor=factor, mode=mode, offset=(oy, ox))
    else:
        hw = (draw(st.integers(1, 3 * h * factor)), draw(st.integers(1, 3 * w * factor)))
        geometry = dict(factor=factor, mode=mode, align_corners=draw(st.booleans()))
    options = dict(reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                   label_smoothing=draw(st.sampled_from([0.0, 0.05, 1.0])),
                   ignore_index=draw(st.sampled_from([255, -100, 0])))
    return (n, c, h, w), hw, geometry, options, draw(st.booleans()), draw(st.integers(0, 2 ** 16))


@NATIVE_CPU
@settings(max_examples=200, deadline=None)
@given(cases())
def test_fuzz_cpu_against_composition(case):
    shape, hw, geometry, options, weighted, seed = case
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randint(0, shape[1], (shape[0], *hw), generator=gen)
    target[torch.rand(target.shape, generator=gen) < 0.2] = options["ignore_index"]
    weight = torch.rand(shape[1], dtype=torch.float64, generator=gen) + 0.1 if weighted else None
    actual = upsample_cross_entropy(coarse, target, weight=weight, backend="cpu", **geometry, **options)
    expected = composition(coarse, target, weight=weight, **geometry, **options)
    torch.testing.assert_close(actual, expected, equal_nan=True)
    if not actual.isnan().any():
        grads = [torch.autograd.grad(v.sum(), coarse)[0] for v in (actual, expected)]
        torch.testing.assert_close(grads[0], grads[1])
    labels = upsample_argmax(coarse.detach(), out_size=hw, backend="cpu", **geometry)
    assert torch.equal(labels, expected_argmax(coarse.detach(), hw, geometry))


# ---- torch.library: opcheck, torch.compile ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    gen = torch.Generator().manual_seed(6)
    coarse = torch.randn(2, 3, 3, 4, generator=gen, requires_grad=True)
    target = make_target(2, (5, 6), 3, "some", gen)
    weight = torch.rand(3, generator=gen) + 0.5
    for reduction in ("mean", "none"):
        torch.library.opcheck(torch.ops.fcn_fast.upsample_cross_entropy.default,
                              (coarse, target, weight, 2, "deconv", 1, 1, False, 255, reduction, 0.1, True, backend))
    torch.library.opcheck(torch.ops.fcn_fast.upsample_argmax.default,
                          (coarse.detach(), 2, "interp", 6, 8, 0, 0, False, torch.uint8, backend))


@NATIVE_CPU
def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(7)
    coarse = torch.randn(2, 3, 4, 5, generator=gen)
    target = make_target(2, TARGET_HW, 3, "some", gen)

    def step(x):
        loss = upsample_cross_entropy(x * 2, target, backend="cpu", **GEOMETRY)
        return loss, upsample_argmax(x, out_size=TARGET_HW, backend="cpu", **GEOMETRY)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = coarse.clone().requires_grad_(), coarse.clone().requires_grad_()
    (loss1, labels1), (loss2, labels2) = step(x1), compiled(x2)
    torch.testing.assert_close(loss2, loss1)
    assert torch.equal(labels1, labels2)
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(x2.grad, x1.grad)


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

"""Special values on every backend: infinite and NaN inputs at the taps of the upsampling, -inf and huge logits, a
"mean" over zero total weight, and the number of CPU threads. Each case is checked against the plain PyTorch
composition the op replaces, written here and computed on the CPU in float64 (float32 where float64 would not
overflow the way the kernels' float32 does), so it holds on every device alike.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fcn_fast
from fcn_fast.ops._resample import bilinear_kernel
from harness import backend_params, device_for

# Triton's interpreter computes masked-out lanes of -inf/NaN tiles with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning")

BACKENDS = backend_params()
INF, NAN = math.inf, math.nan


# ---- the plain PyTorch compositions ---------------------------------------------------------------------------------

def torch_upsample(x, *, factor, mode, out_size=None, offset=(0, 0), align_corners=False):
    """FCN's bilinear deconvolution (depthwise F.conv_transpose2d with the Caffe filler, then a crop) or
    F.interpolate: what upsample_add computes before its skip."""
    if mode == "interp":
        size = out_size or (x.shape[2] * factor, x.shape[3] * factor)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    full = F.conv_transpose2d(x, bilinear_kernel(x.shape[1], factor, x.dtype), stride=factor, groups=x.shape[1])
    (oy, ox), (h, w) = offset, out_size or (full.shape[2] - offset[0], full.shape[3] - offset[1])
    return full[:, :, oy:oy + h, ox:ox + w]


def torch_loss_and_grad(logits, target, grad_out=None, **kwargs):
    """F.cross_entropy of a leaf copy of ``logits``, and its gradient."""
    z = logits.detach().clone().requires_grad_()
    loss = F.cross_entropy(z, target.long(), **kwargs)
    (grad,) = torch.autograd.grad(loss, z, torch.ones_like(loss) if grad_out is None else grad_out)
    return loss.detach(), grad


def fused_loss_and_grad(fn, leaf, *args, backend, grad_out=None, **kwargs):
    """``fn(leaf, *args)`` on ``backend``'s device and its gradient, both back on the CPU."""
    device = device_for(backend)
    x = leaf.detach().to(device).requires_grad_()
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    loss = fn(x, *args, backend=backend, **kwargs)
    grad_out = torch.ones_like(loss) if grad_out is None else grad_out.to(device, loss.dtype)
    (grad,) = torch.autograd.grad(loss, x, grad_out)
    return loss.detach().cpu(), grad.cpu()


def assert_same_values(actual, expected, rtol=1e-5, atol=1e-6):
    """NaN and +-inf at the same places (the point of these tests), finite values close."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert actual.shape == expected.shape
    nan = actual.isnan() != expected.isnan()
    assert not nan.any(), f"NaN differs at {nan.nonzero()[:8].tolist()}: got {actual[nan][:8].tolist()}, " \
                          f"PyTorch {expected[nan][:8].tolist()}"
    assert torch.equal(actual.isinf() & (actual > 0), expected.isinf() & (expected > 0)), "+inf differs"
    assert torch.equal(actual.isinf() & (actual < 0), expected.isinf() & (expected < 0)), "-inf differs"
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], rtol=rtol, atol=atol)


# ---- 1. infinite inputs meet the taps of the upsampling -------------------------------------------------------------
# A deconvolution output with one tap used to read it twice, the second time with weight 0, and 0 * inf is NaN where
# conv_transpose2d gives +-inf. Interp mode must read exactly what F.interpolate reads (it does multiply some values
# by 0, so NaN appears there in PyTorch too, and on an axis whose size does not change it reads each position twice).

GEOMETRIES = [
    dict(factor=1, mode="deconv"),  # every output has a single tap
    dict(factor=2, mode="deconv"),  # single taps on the border
    dict(factor=3, mode="deconv", out_size=(11, 12), offset=(1, 2)),  # odd factor: single taps inside too
    dict(factor=8, mode="deconv", out_size=(30, 33), offset=(3, 5)),
    dict(factor=1, mode="interp"),  # the same size: PyTorch reads each position with weights 1 and 0
    dict(factor=2, mode="interp"),
    dict(factor=2, mode="interp", align_corners=True),
    dict(factor=3, mode="interp", out_size=(4, 13)),  # rows keep their size, columns do not
]
GEOMETRY_IDS = ["deconv-x1", "deconv-x2", "deconv-x3-crop", "deconv-x8-crop", "interp-x1", "interp-x2",
                "interp-x2-corners", "interp-rows-same"]


def infinite_input(dtype=torch.float32):
    """(1, 3, 4, 5): +inf in a corner, -inf in the opposite corner next to a +inf inside, NaN on a border."""
    x = torch.randn(1, 3, 4, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, 0, 0, 0] = INF
    x[0, 1, 3, 4] = -INF
    x[0, 1, 1, 2] = INF
    x[0, 2, 2, 0] = NAN
    x[0, 2, 0, 3] = -INF
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_upsample_add_of_infinite_inputs(backend, geometry):
    x = infinite_input()
    expected = torch_upsample(x.double(), **geometry)
    skip = torch.randn(1, 3, expected.shape[2] + 1, expected.shape[3] + 2, generator=torch.Generator().manual_seed(1))
    expected = expected + 0.5 * skip.double()[:, :, 1:1 + expected.shape[2], 2:2 + expected.shape[3]]
    device = device_for(backend)
    actual = fcn_fast.upsample_add(x.to(device), skip.to(device), skip_offset=(1, 2), skip_scale=0.5,
                                   out_size=expected.shape[2:], backend=backend,
                                   **{k: v for k, v in geometry.items() if k != "out_size"})
    assert_same_values(actual, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_upsample_add_gradient_of_infinite_values(backend, geometry):
    """An infinite or NaN incoming gradient reaches the inputs PyTorch's adjoint sends it to, 0 * inf included
    (F.interpolate's backward adds its weight-0 taps too)."""
    x = torch.randn(1, 3, 4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out_shape = torch_upsample(x, **geometry).shape
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grad_out[0, 0, 0, 0], grad_out[0, 1, -1, -1], grad_out[0, 2, 1, 0] = INF, -INF, NAN
    expected_x = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(torch_upsample(expected_x, **geometry), expected_x, grad_out)
    kwargs = {k: v for k, v in geometry.items() if k != "out_size"}
    _, actual = fused_loss_and_grad(fcn_fast.upsample_add, x.float(), backend=backend, grad_out=grad_out.float(),
                                    out_size=out_shape[2:], **kwargs)
    assert_same_values(actual, expected)


LOSS_GEOMETRIES = [dict(factor=2, mode="deconv"), dict(factor=3, mode="deconv", offset=(1, 2)),
                   dict(factor=1, mode="deconv"), dict(factor=2, mode="interp"), dict(factor=1, mode="interp")]
LOSS_GEOMETRY_IDS = ["deconv-x2", "deconv-x3-crop", "deconv-x1", "interp-x2", "interp-x1"]


def masked_class_case(geometry, smoothing=0.0):
    """Coarse scores of 3 classes, class 2 masked with -inf everywhere (a realistic use of -inf), one more -inf and
    one +inf logit elsewhere; labels 0 and 1. The loss per pixel, and its gradient."""
    gen = torch.Generator().manual_seed(4)
    coarse = torch.randn(2, 3, 4, 4, generator=gen)
    coarse[:, 2] = -INF
    coarse[1, 0, 3, 3] = -INF
    coarse[1, 1, 0, 1] = INF
    out_hw = torch_upsample(coarse, **geometry).shape[2:]
    target = torch.randint(0, 2, (2, *out_hw), generator=gen)
    target[0, 0, :3] = 255
    return coarse, target


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", LOSS_GEOMETRIES, ids=LOSS_GEOMETRY_IDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_upsample_cross_entropy_with_a_masked_class(backend, geometry, smoothing):
    coarse, target = masked_class_case(geometry)
    grad_out = torch.rand(target.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    options = dict(ignore_index=255, reduction="none", label_smoothing=smoothing)
    leaf = coarse.double().requires_grad_()
    expected = F.cross_entropy(torch_upsample(leaf, **geometry), target, **options)
    (expected_grad,) = torch.autograd.grad(expected, leaf, grad_out)
    loss, grad = fused_loss_and_grad(fcn_fast.upsample_cross_entropy, coarse, target, backend=backend,
                                     grad_out=grad_out.float(), **geometry, **options)
    assert_same_values(loss, expected)
    assert_same_values(grad, expected_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upsample_cross_entropy_issue_example(backend):
    """The reduced loss of the masked class is finite, as F.cross_entropy of the deconvolution gives."""
    c = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    c[:, 2] = -INF
    t = torch.randint(0, 2, (1, 10, 10), generator=torch.Generator().manual_seed(7))
    expected = F.cross_entropy(F.conv_transpose2d(c.double(), bilinear_kernel(3, 2, torch.float64), stride=2,
                                                  groups=3), t)
    device = device_for(backend)
    actual = fcn_fast.upsample_cross_entropy(c.to(device), t.to(device), factor=2, ignore_index=-100, backend=backend)
    assert torch.isfinite(actual).item()
    assert_same_values(actual, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", LOSS_GEOMETRIES, ids=LOSS_GEOMETRY_IDS)
def test_upsample_argmax_with_a_masked_class(backend, geometry):
    coarse, target = masked_class_case(geometry)
    expected = torch_upsample(coarse.double(), **geometry).argmax(1)
    device = device_for(backend)
    actual = fcn_fast.upsample_argmax(coarse.to(device), out_size=target.shape[1:], backend=backend, **geometry)
    assert torch.equal(actual.cpu(), expected)


# ---- 2. a leading -inf logit ----------------------------------------------------------------------------------------

LAYOUTS = ["classes", "channels_last", "nchw"]


def logits_in(layout, values):
    """``values`` (pixels, C) as logits of ``layout``: (N, C) scores, channels-last NCHW, or contiguous NCHW."""
    pixels, c = values.shape
    if layout == "classes":
        return values
    image = values.reshape(1, 1, pixels, c).permute(0, 3, 1, 2)  # (1, C, 1, pixels), classes strided by 1
    return image if layout == "channels_last" else image.contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_leading_negative_infinity(backend, layout):
    values = torch.tensor([[-INF, 2.0, 0.5], [-INF, -INF, 1.0], [1.0, -INF, -INF], [-INF, -INF, -INF],
                           [0.5, -INF, 3.0], [-INF, NAN, 1.0]])
    target = torch.tensor([2, 2, 0, 1, 2, 2])
    logits = logits_in(layout, values)
    target = target if layout == "classes" else target.reshape(1, 1, -1)
    for reduction, smoothing in (("none", 0.0), ("none", 0.1), ("sum", 0.0)):
        options = dict(reduction=reduction, label_smoothing=smoothing)
        expected, expected_grad = torch_loss_and_grad(logits.double(), target, **options)
        actual, grad = fused_loss_and_grad(fcn_fast.softmax_cross_entropy, logits, target, backend=backend, **options)
        assert_same_values(actual, expected)
        assert_same_values(grad, expected_grad)


# ---- 3. logits too large for (max + log sum) - z ---------------------------------------------------------------------

HUGE = {torch.float32: [1e7, 1e30, 3e38], torch.float64: [1e17, 1e300]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_huge_logits(backend, layout, dtype):
    """Equal logits of any magnitude have loss log C and gradient 1/C - [c == t]; smoothing's sum over classes must
    not cancel. The composition runs in the kernels' dtype: its log_softmax works relative to the max as well."""
    for big in HUGE[dtype]:
        values = torch.tensor([[big, big, big], [big, big, 0.0], [0.0, big, big], [-big, -big, -big],
                               [big, -big, big]], dtype=dtype)
        target = torch.tensor([0, 0, 0, 1, 2])
        logits = logits_in(layout, values)
        target = target if layout == "classes" else target.reshape(1, 1, -1)
        for reduction, smoothing in (("none", 0.0), ("none", 0.1), ("mean", 0.1)):
            options = dict(reduction=reduction, label_smoothing=smoothing)
            expected, expected_grad = torch_loss_and_grad(logits, target, **options)
            actual, grad = fused_loss_and_grad(fcn_fast.softmax_cross_entropy, logits, target, backend=backend,
                                               **options)
            assert_same_values(actual, expected, rtol=1e-6, atol=1e-6)
            assert_same_values(grad, expected_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_huge_equal_logits_issue_examples(backend, smoothing):
    """Three equal logits of 3e38 (loss log 3, was 0), 21 equal logits of 1e30 with smoothing (log 21, was -1.66e22)."""
    for c, big in ((3, 3e38), (21, 1e30)):
        logits = torch.full((2, c), big)
        target = torch.tensor([0, c - 1])
        loss, grad = fused_loss_and_grad(fcn_fast.softmax_cross_entropy, logits, target, backend=backend,
                                         label_smoothing=smoothing)
        assert loss.item() == pytest.approx(math.log(c), rel=1e-6)
        expected_grad = (torch.full((2, c), 1 / c) - F.one_hot(target, c) * (1 - smoothing) - smoothing / c) / 2
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_upsample_cross_entropy_of_huge_logits(backend, smoothing):
    """Every class plane 1e30 (the upsampled logits of a pixel are equal: loss log C), but for the right half of one
    plane, 2e30 (those pixels' logits differ by ~1e29); against the composition in float32, whose log_softmax works
    relative to the max."""
    gen = torch.Generator().manual_seed(8)
    coarse = torch.full((1, 4, 3, 4), 1e30)
    coarse[0, 3, :, 2:] = 2e30
    geometry = dict(factor=2, mode="deconv", offset=(1, 1))
    target = torch.randint(0, 4, (1, 6, 8), generator=gen)
    options = dict(reduction="none", label_smoothing=smoothing, ignore_index=255)
    leaf = coarse.clone().requires_grad_()
    expected = F.cross_entropy(torch_upsample(leaf, out_size=(6, 8), **geometry), target, **options)
    grad_out = torch.rand(expected.shape, generator=gen)
    (expected_grad,) = torch.autograd.grad(expected, leaf, grad_out)
    loss, grad = fused_loss_and_grad(fcn_fast.upsample_cross_entropy, coarse, target, backend=backend,
                                     grad_out=grad_out, **geometry, **options)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


# ---- 5. a "mean" over zero total weight, with label smoothing --------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["softmax_cross_entropy", "upsample_cross_entropy"])
@pytest.mark.parametrize("ignored", [False, True], ids=["zero-weight-labels", "all-ignored"])
def test_mean_over_zero_weight_is_nan(backend, op, ignored):
    """PyTorch's "mean" is the weighted NLL mean (0 / 0) plus the smoothing term over the same weight: NaN, not
    inf, and so is the gradient of every pixel that counts (an ignored pixel's gradient stays 0)."""
    gen = torch.Generator().manual_seed(9)
    coarse = torch.randn(2, 3, 3, 4, generator=gen)
    weight = torch.tensor([0.0, 1.0, 2.0])
    geometry = dict(factor=2, mode="deconv")
    logits = torch_upsample(coarse, **geometry) if op == "upsample_cross_entropy" else coarse
    target = torch.full(logits.shape[:1] + logits.shape[2:], 255 if ignored else 0)
    options = dict(weight=weight, label_smoothing=0.1, ignore_index=255)
    fn, extra = fcn_fast.softmax_cross_entropy, {}
    if op == "upsample_cross_entropy":
        fn, extra = fcn_fast.upsample_cross_entropy, geometry
    leaf = coarse.double().requires_grad_()
    expected = F.cross_entropy(torch_upsample(leaf, **geometry) if extra else leaf, target,
                               **dict(options, weight=weight.double()))
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    loss, grad = fused_loss_and_grad(fn, coarse, target, backend=backend, **options, **extra)
    assert loss.isnan().item() and expected.isnan().item()
    assert_same_values(grad, expected_grad)


# ---- 4. the number of CPU threads ------------------------------------------------------------------------------------

def _on_threads(threads, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


THREAD_CASES = {
    # (N, C) scores and channels-last logits take the per-pixel path: one partial sum per pixel, > 32768 of them.
    "classes": ((40000, 5), None),
    "channels_last": ((4, 21, 128, 128), torch.channels_last),
    "nchw": ((4, 21, 128, 128), torch.contiguous_format),
}
# Whether torch.sum's split over threads shows in the last bit depends on the data: every case runs a few (seed,
# label_smoothing) pairs, among them ones whose sums differed before.
THREAD_CONFIGS = [(0, 0.0), (0, 0.1), (1, 0.1)]


def assert_same_bits_on_one_and_two_threads(run):
    (loss1, grad1), (loss2, grad2) = _on_threads(1, run), _on_threads(2, run)
    assert torch.equal(loss1, loss2), f"{loss1.item()!r} on one thread, {loss2.item()!r} on two"
    assert torch.equal(grad1, grad2)


# Interpreted Triton takes ~30 s per case at these sizes.
THREAD_BACKENDS = [pytest.param(*p.values, marks=[*p.marks, pytest.mark.slow], id=p.id) if p.id == "triton" else p
                   for p in BACKENDS if p.id in ("reference", "cpu", "triton")]


@pytest.mark.parametrize("backend", THREAD_BACKENDS)
@pytest.mark.parametrize("case", list(THREAD_CASES))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_same_bits_on_one_and_two_threads(backend, case, reduction):
    """The reduced loss and its gradient do not depend on the number of CPU threads (the loss of the issue's
    channels-last case, seed 0, was 229903.796875 on one thread and 229903.8125 on two)."""
    if device_for(backend).type != "cpu":
        pytest.skip("the CPU thread count does not reach a GPU kernel")
    if backend == "triton" and case != "classes":
        pytest.skip("too large for Triton's interpreter; the (N, C) case takes the same sums")
    shape, memory_format = THREAD_CASES[case]
    for seed, smoothing in THREAD_CONFIGS:
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(shape, generator=gen)
        if memory_format is not None:
            logits = logits.contiguous(memory_format=memory_format)
        target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=gen)
        assert_same_bits_on_one_and_two_threads(lambda: fused_loss_and_grad(
            fcn_fast.softmax_cross_entropy, logits, target, backend=backend, reduction=reduction,
            label_smoothing=smoothing))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id == "cpu"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_upsample_cross_entropy_same_bits_on_one_and_two_threads(backend, reduction):
    """More than 32768 output rows, one partial sum each. (The reference backend's sums and interpreted Triton's,
    slow at this size, go through the same fixed-order sum as the softmax_cross_entropy cases above.)"""
    for seed, smoothing in ((1, 0.1), (2, 0.0)):
        gen = torch.Generator().manual_seed(seed)
        coarse = 3 * torch.randn(2, 3, 2050, 2, generator=gen)
        target = torch.randint(0, 3, (2, 16408, 24), generator=gen)
        assert_same_bits_on_one_and_two_threads(lambda: fused_loss_and_grad(
            fcn_fast.upsample_cross_entropy, coarse, target, backend=backend, factor=8, reduction=reduction,
            label_smoothing=smoothing))

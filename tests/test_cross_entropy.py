"""softmax_cross_entropy and SoftmaxCrossEntropyLoss against F.cross_entropy, through the shared op tester
(tests/op_tester.py); then what is particular to this op: the nn.CrossEntropyLoss drop-in, bad input, the CPU
kernels' label scan, memory and gradient-in-forward, and the loss training models."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import fcn_fast
from fcn_fast.nn import SoftmaxCrossEntropyLoss
from harness import HAS_CUDA, assert_close, backend_params, device_for, requires_backend
from op_tester import (REDUCTIONS, OpTester, Sample, ce_scales, choose, draw_ce_options, draw_labels, draw_values,
                       draw_weight, integer)

# Triton's interpreter computes masked-out lanes of -inf/NaN tiles with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning")

BACKENDS = backend_params()
IGNORE = 255
CPU_KERNELS = requires_backend("cpu")


# ---- the reference: plain PyTorch ------------------------------------------------------------------------------------

def cross_entropy_reference(logits, target, weight=None, *, ignore_index=IGNORE, reduction="mean",
                            label_smoothing=0.0, check_targets=True):
    """F.cross_entropy; with ``check_targets=False`` labels outside [0, C) count as ignored (fcn_fast's documented
    difference: PyTorch raises, or asserts on a GPU)."""
    target = target.long()
    if not check_targets:
        target = torch.where((target >= 0) & (target < logits.shape[1]), target, torch.full_like(target, ignore_index))
    return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def expected(logits, target, grad_out=None, **kwargs):
    """F.cross_entropy in float64: (loss, gradient with respect to the logits)."""
    z = logits.detach().cpu().double().requires_grad_()
    weight = kwargs.pop("weight", None)
    loss = cross_entropy_reference(z, target.cpu(), None if weight is None else weight.cpu().double(), **kwargs)
    grad_out = torch.ones_like(loss) if grad_out is None else grad_out.cpu().double()
    (grad,) = torch.autograd.grad(loss, z, grad_out)
    return loss, grad


def make_case(shape, dtype, device, ignore="some", target_dtype=torch.int64, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
    num_classes = shape[1]
    target = torch.randint(0, num_classes, (shape[0],) + tuple(shape[2:]), generator=gen)
    if ignore == "some":
        target[torch.rand(target.shape, generator=gen) < 0.3] = IGNORE
    elif ignore == "all":
        target.fill_(IGNORE)
    return logits, target.to(target_dtype).to(device)


def run(logits, target, backend, grad_out=None, **kwargs):
    z = logits.detach().clone().requires_grad_()
    loss = fcn_fast.softmax_cross_entropy(z, target, backend=backend, **kwargs)
    grad_out = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    (grad,) = torch.autograd.grad(loss, z, grad_out)
    return loss, grad


# ---- the tester ----------------------------------------------------------------------------------------------------

def case(id, shape, *, ignore="some", target_dtype=torch.int64, seed=0, scale=3.0, weighted=False, tiny=True,
         layout="contiguous", logits=None, target=None, weight=None, **options) -> Sample:
    """A sample: random logits (``scale``) and labels (``ignore``: none, some or all pixels ignore_index=255)."""
    z, t = make_case(shape, torch.float64, "cpu", ignore, target_dtype, seed, scale)
    if weighted and weight is None:
        weight = torch.rand(shape[1], generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    options = {"ignore_index": IGNORE, **options}
    return Sample(id, dict(logits=z if logits is None else logits, target=t if target is None else target,
                           weight=weight), options, tiny, layout)


def _matrix():
    samples = []
    for reduction, weighted, smoothing, ignore in itertools.product(REDUCTIONS, (False, True), (0.0, 0.1),
                                                                   ("none", "some", "all")):
        # Under the interpreter weight and smoothing switch together.
        tiny = (weighted, smoothing) in ((False, 0.0), (True, 0.1))
        samples.append(case(f"{reduction}-{'w' if weighted else 'nw'}-ls{smoothing}-{ignore}", (2, 5, 3, 4),
                            ignore=ignore, weighted=weighted, tiny=tiny, reduction=reduction,
                            label_smoothing=smoothing))
    return samples


def _column(*values):
    return torch.tensor(values, dtype=torch.float64)


INF, NAN = math.inf, math.nan
# Pixels (columns): NaN; +inf not the target; +inf the target; -inf target; all -inf; -inf elsewhere; NaN but
# ignored; +inf but ignored; finite.
NAN_INF_LOGITS = torch.tensor([[NAN, 1.0, 2.0, 0.0, -INF, -INF, NAN, INF, 1.0],
                               [0.0, INF, INF, -INF, -INF, 2.0, 1.0, 0.0, 2.0],
                               [1.0, 0.0, 1.0, 3.0, -INF, 0.5, 2.0, 1.0, 3.0]], dtype=torch.float64).unsqueeze(0)
NAN_INF_TARGET = torch.tensor([[1, 0, 1, 1, 0, 2, IGNORE, IGNORE, 0]])


def _special_samples():
    samples = []
    for reduction in REDUCTIONS:
        for smoothing in (0.0, 0.2):
            samples.append(case(f"nan-inf-columns-{reduction}-ls{smoothing}", (1, 3, 9), logits=NAN_INF_LOGITS,
                                target=NAN_INF_TARGET, reduction=reduction, label_smoothing=smoothing))
    leading = case("x", (4, 3, 5, 6), ignore="none")
    leading.tensors["logits"][:, 0] = -INF
    rows = case("x", (40, 3), ignore="none")
    rows.tensors["logits"][:, 0] = -INF
    for reduction in ("mean", "none"):
        samples += [
            # A class masked with -inf (here the first class: the online log-sum-exp starts at -inf).
            Sample(f"leading-neg-inf-class-nchw-{reduction}", leading.tensors, dict(leading.options, reduction=reduction)),
            Sample(f"leading-neg-inf-class-channels-last-{reduction}", leading.tensors,
                   dict(leading.options, reduction=reduction), layout="channels_last"),
            Sample(f"leading-neg-inf-class-rows-{reduction}", rows.tensors, dict(rows.options, reduction=reduction)),
        ]
    equal = case("x", (2, 3, 2, 2), ignore="none")
    equal.tensors["logits"].fill_(3e38)
    huge = case("x", (2, 3, 2, 2), ignore="none")
    huge.tensors["logits"].fill_(1e30)
    large = case("x", (2, 4, 3, 3), ignore="none", scale=1.0)
    large.tensors["logits"].add_(1e7)
    spread = case("x", (2, 4, 3, 3), ignore="none", scale=1e30)
    half_large = case("x", (2, 4, 3, 5), ignore="some", scale=6e3)
    sub = case("x", (2, 3, 2, 2), ignore="none", scale=1.0)
    sub.tensors["logits"].mul_(1e-39)
    zero_target = case("x", (2, 3, 4, 4), ignore="some")
    zero_target.tensors["weight"] = _column(0.0, 1.0, 2.0)
    no_weight = case("x", (2, 3, 4, 4), ignore="some")
    no_weight.tensors["weight"] = _column(0.0, 0.0, 0.0)
    bad = case("x", (2, 4, 3, 3), ignore="some")
    bad.tensors["target"][0, 0, 0], bad.tensors["target"][1, 2, 1], bad.tensors["target"][1, 0, 2] = 4, -7, 10**6
    for reduction, smoothing in (("none", 0.0), ("mean", 0.1), ("sum", 0.1)):
        opts = dict(reduction=reduction, label_smoothing=smoothing)
        tag = f"{reduction}-ls{smoothing}"
        samples += [
            Sample(f"all-equal-3e38-{tag}", equal.tensors, dict(equal.options, **opts)),
            Sample(f"all-equal-1e30-{tag}", huge.tensors, dict(huge.options, **opts)),
            Sample(f"large-1e7-{tag}", large.tensors, dict(large.options, **opts)),
            Sample(f"spread-1e30-{tag}", spread.tensors, dict(spread.options, **opts)),
            Sample(f"large-6e3-{tag}", half_large.tensors, dict(half_large.options, **opts)),
            Sample(f"subnormal-{tag}", sub.tensors, dict(sub.options, **opts)),
            Sample(f"zero-weight-class-{tag}", zero_target.tensors, dict(zero_target.options, **opts)),
            Sample(f"total-weight-zero-{tag}", no_weight.tensors, dict(no_weight.options, **opts)),
            Sample(f"unchecked-bad-labels-{tag}", bad.tensors, dict(bad.options, check_targets=False, **opts)),
        ]
    return samples


class TestSoftmaxCrossEntropy(OpTester):
    differentiable = ("logits",)
    relayouted = ("logits", "target")

    def op(self, backend, logits, target, weight=None, **options):
        return fcn_fast.softmax_cross_entropy(logits, target, weight=weight, backend=backend, **options)

    def reference(self, float_dtype, logits, target, weight=None, **options):
        return cross_entropy_reference(logits, target, weight, **options)

    def input_dtype(self, name, dtype):
        # Class weights as a module holds them: float32 (float64 beside float64 logits).
        return dtype if name != "weight" or dtype == torch.float64 else torch.float32

    def samples(self):
        shapes = [case(f"shape-{shape}-{reduction}", shape, reduction=reduction, label_smoothing=0.05)
                  for shape in [(7, 6), (2, 4, 9), (2, 3, 4, 5), (1, 3, 2, 3, 4)] for reduction in ("none", "mean")]
        labels = [case(f"target-{str(d)[6:]}", (2, 6, 5, 3), target_dtype=d) for d in
                  (torch.int32, torch.int16, torch.uint8)]
        labels.append(case("target-int8-ignore-minus-1", (2, 6, 5, 3), target_dtype=torch.int8, ignore="none",
                           target=make_case((2, 6, 5, 3), torch.float64, "cpu")[1].clamp(max=5).to(torch.int8)
                           .masked_fill(torch.arange(30).reshape(5, 6).T[:5, :3] % 4 == 0, -1), ignore_index=-1))
        empty = [case(f"empty-{shape}-{reduction}", shape, reduction=reduction)
                 for shape in [(0, 4, 3, 3), (2, 4, 0, 3), (0, 4)] for reduction in REDUCTIONS]
        blocks = [case("blocks-nchw-1600px", (1, 3, 40, 40), weighted=True, label_smoothing=0.1, tiny=False),
                  case("blocks-rows-2000", (2000, 3), weighted=True, label_smoothing=0.1, tiny=False)]
        return _matrix() + shapes + labels + empty + blocks

    def layout_sample(self):
        return case("layouts", (2, 5, 6, 7), weighted=True, reduction="none", label_smoothing=0.1)

    def special_samples(self):
        return _special_samples()

    def gradcheck_samples(self):
        weight = _column(0.5, 1.0, 2.0, 1.5)
        return [case(f"w-ls0.1-{r}", (2, 4, 3, 2), weight=weight, reduction=r, label_smoothing=0.1)
                for r in REDUCTIONS]

    def thread_samples(self):
        """Every reduction on each CPU path: NCHW blocks, channels_last and (N, C) rows, each over 32k pixels."""
        samples = []
        for reduction in REDUCTIONS:
            opts = dict(reduction=reduction, weighted=True, label_smoothing=0.1, tiny=False)
            samples += [case(f"nchw-{reduction}", (2, 5, 128, 130), **opts),
                        case(f"channels-last-{reduction}", (4, 21, 128, 128), layout="channels_last", **opts),
                        case(f"rows-{reduction}", (33000, 5), **opts)]
        return samples

    def scales(self, dtype, inputs, options, expected, grad_out, rounded_in_dtype):
        logits, target, weight = inputs["logits"], inputs["target"], inputs["weight"]
        per_pixel = cross_entropy_reference(logits, target, weight, **{**options, "reduction": "none"})
        out_scale, pixel_grad = ce_scales(dtype, target, weight, logits.shape[1], options, per_pixel, grad_out)
        return out_scale, {"logits": pixel_grad}

    def property_sample(self, draw, dtype, small):
        n, c = integer(draw, 0, 3), choose(draw, (1, 2, 3, 5, 8))
        spatial = choose(draw, ((), (integer(draw, 0, 4),), (integer(draw, 0, 4), integer(draw, 1, 4)),
                                (integer(draw, 1, 3), integer(draw, 0, 3), integer(draw, 1, 3))))
        if not small and integer(draw, 0, 9) == 0:
            # Over one and several of the CPU kernel's 512-pixel blocks.
            n, c, spatial = 1, integer(draw, 1, 4), (integer(draw, 16, 40), integer(draw, 32, 40))
        check_targets = choose(draw, (True, True, False))
        target, ignore_index = draw_labels(draw, (n, *spatial), c, check_targets)
        options = dict(ignore_index=ignore_index, check_targets=check_targets, **draw_ce_options(draw))
        logits = draw_values(draw, (n, c, *spatial), dtype)
        return Sample("drawn", dict(logits=logits, target=target, weight=draw_weight(draw, c)), options)

    def opcheck_calls(self, backend):
        device = device_for(backend)
        logits, target = make_case((2, 3, 4, 3), torch.float32, device)
        weight = torch.tensor([1.0, 2.0, 0.5], device=device)
        # need_grad=True: on the CPU a reduced loss then also returns the gradient the backward hands on.
        return [(torch.ops.fcn_fast.softmax_cross_entropy.default,
                 (logits.clone().requires_grad_(), target, w, IGNORE, reduction, 0.1, True, need_grad, backend))
                for reduction, w, need_grad in (("mean", weight, True), ("sum", None, False), ("none", None, True))]


# ---- nn.CrossEntropyLoss drop-in ------------------------------------------------------------------------------------

MODULE_CONFIGS = [
    {},
    dict(reduction="sum"),
    dict(reduction="none", ignore_index=1),
    dict(weight=torch.tensor([0.2, 1.0, 3.0, 0.7]), label_smoothing=0.1),
    dict(size_average=False),
    dict(reduce=False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=lambda c: ",".join(c) or "defaults")
def test_module_is_a_drop_in(backend, config):
    device = device_for(backend)
    logits, target = make_case((2, 4, 3, 3), torch.float32, device, ignore="none")
    target[0, 0, 0] = config.get("ignore_index", -100)  # nn.CrossEntropyLoss's default ignore_index
    config = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in config.items()}
    with pytest.warns(UserWarning) if ("size_average" in config or "reduce" in config) else _no_warning():
        ours = SoftmaxCrossEntropyLoss(**config, backend=backend)
    with pytest.warns(UserWarning) if ("size_average" in config or "reduce" in config) else _no_warning():
        theirs = torch.nn.CrossEntropyLoss(**config)
    assert ours.reduction == theirs.reduction and ours.ignore_index == theirs.ignore_index
    assert set(ours.state_dict()) == set(theirs.state_dict())
    z1, z2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out, ref = ours(z1, target), theirs(z2, target)
    out.backward(torch.ones_like(out))
    ref.backward(torch.ones_like(ref))
    assert_close(out, ref.detach())
    assert_close(z1.grad, z2.grad)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_module_repr():
    loss = SoftmaxCrossEntropyLoss(weight=torch.ones(3), ignore_index=255, label_smoothing=0.1, backend="cpu")
    assert repr(loss) == ("SoftmaxCrossEntropyLoss(ignore_index=255, reduction='mean', weight=Tensor[3], "
                          "label_smoothing=0.1, backend='cpu')")
    assert repr(SoftmaxCrossEntropyLoss()) == "SoftmaxCrossEntropyLoss(ignore_index=-100, reduction='mean')"


# ---- bad input ------------------------------------------------------------------------------------------------------

def _bad(**overrides):
    logits, target = make_case((2, 3, 4, 4), torch.float32, "cpu", ignore="none")
    kwargs = dict(logits=logits, target=target)
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_out_of_range_names_value_and_count(backend):
    logits, target = make_case((2, 3, 4, 4), torch.float32, device_for(backend), ignore="some")
    target[0, 0, :3] = 7
    target[1, 1, 1] = -1
    with pytest.raises(ValueError, match=r"outside \[0, 3\).*-1 \(1 pixels\), 7 \(3 pixels\)"):
        fcn_fast.softmax_cross_entropy(logits, target, backend=backend)


@CPU_KERNELS
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("numel", [1, 7, 200_003])  # one element, a vector remainder, several parallel chunks
def test_native_label_bounds_match_torch(dtype, numel):
    """The CPU label scan behind the check above: [min, max] of the labels other than ignore_index."""
    gen = torch.Generator().manual_seed(numel)
    low, high = (-5, 100) if dtype.is_signed else (0, 100)
    target = torch.randint(low, high, (numel,), generator=gen).to(dtype)
    ignore = 99
    target[torch.rand(numel, generator=gen) < 0.3] = ignore
    kept = target[target != ignore].long()
    expected = [int(kept.min()), int(kept.max())] if kept.numel() else [0, 0]
    assert torch.ops.fcn_fast._label_bounds(target, ignore).tolist() == expected
    # Every label ignored: [0, 0], so any class count passes; a strided view is read correctly.
    assert torch.ops.fcn_fast._label_bounds(torch.full((5,), ignore, dtype=dtype), ignore).tolist() == [0, 0]
    strided = target.repeat(2)[::2]
    kept = strided[strided != ignore].long()
    assert torch.ops.fcn_fast._label_bounds(strided, ignore).tolist() == (
        [int(kept.min()), int(kept.max())] if kept.numel() else [0, 0])


@pytest.mark.parametrize("case,error,pattern", [
    (dict(target=torch.zeros(2, 4, 5, dtype=torch.long)), ValueError, r"\(2, 3, 4, 4\).*\(2, 4, 5\)"),
    (dict(target=torch.zeros(2, 4, 4)), TypeError, "target must have dtype"),
    (dict(weight=torch.ones(4)), ValueError, r"one entry per class \(3\)"),
    (dict(weight=torch.ones(3, device="meta")), ValueError, "weight must be on the logits' device"),
    (dict(weight=torch.ones(3, dtype=torch.long)), TypeError, "weight must have dtype"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be a float in \[0, 1\]"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(target=torch.zeros(2, 4, 4, dtype=torch.long, device="meta")), ValueError, "on one device"),
    (dict(logits=torch.zeros(3)), ValueError, "at least 2 dimensions"),
    (dict(logits=torch.zeros(2, 3, 4, 4, dtype=torch.long)), TypeError, "logits must have dtype"),
    (dict(ignore_index=2.5), TypeError, "ignore_index must be an int"),
    (dict(backend="cuda" if not HAS_CUDA else "nonesuch"), ValueError, "backend"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input(case, error, pattern):
    kwargs = _bad(**case)
    with pytest.raises(error, match=pattern):
        fcn_fast.softmax_cross_entropy(kwargs.pop("logits"), kwargs.pop("target"), **kwargs)



# ---- the loss in a model that is not FCN ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id in ("reference", "cpu")])
def test_trains_a_small_conv_net(backend):
    """A 2-layer conv net learns a per-pixel rule (label = the brightest of 3 input channels, border ignored), and an
    MLP classifier uses the same loss on (N, C) scores."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1))
    criterion = SoftmaxCrossEntropyLoss(ignore_index=255, backend=backend)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        images = torch.randn(4, 3, 12, 12)
        labels = images.argmax(1)
        labels[:, 0, :] = 255
        loss = criterion(net(images), labels.to(torch.uint8))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5

    mlp = torch.nn.Linear(6, 4)
    x, y = torch.randn(64, 6), torch.randint(0, 4, (64,))
    opt = torch.optim.SGD(mlp.parameters(), lr=0.5)
    first = None
    for _ in range(20):
        loss = fcn_fast.softmax_cross_entropy(mlp(x), y, ignore_index=-100, backend=backend)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


@CPU_KERNELS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_gradients_are_the_float_gradients_rounded(dtype):
    """The CPU kernel's own half/bfloat16 conversions (vectorisable, kernels/include/fcn_fast/vector_math.h) round
    as torch does: the gradient for half logits is the float32 kernel's gradient on the same values, rounded."""
    logits, target = make_case((2, 7, 33, 35), dtype, "cpu", scale=4.0)
    logits[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    target[0, 0, :3] = IGNORE
    grads = []
    for z in (logits.clone(), logits.float()):
        z.requires_grad_()
        fcn_fast.softmax_cross_entropy(z, target, reduction="sum", backend="cpu").backward()
        grads.append(z.grad)
    half, single = grads
    assert torch.equal(half.isnan(), single.isnan())
    torch.testing.assert_close(half, single.to(dtype), rtol=0, atol=0, equal_nan=True)


@CPU_KERNELS
def test_backward_holds_the_gradient_and_one_float_per_pixel():
    """Forward + backward holds the logits' gradient and at most one float per pixel (a reduced CPU loss saves no
    softmax statistics: its backward reruns the forward kernel), and no zero-filled gradients for the op's
    non-differentiable outputs (autograd materializes those unless told not to)."""
    from fcn_fast.bench.measure import peak_memory

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 8, 60, 68, generator=gen, requires_grad=True)
    target = torch.randint(0, 8, (2, 60, 68), generator=gen)
    per_pixel = target.numel() * 4
    peak = peak_memory(lambda: fcn_fast.softmax_cross_entropy(logits, target, backend="cpu").backward(),
                       torch.device("cpu"))
    assert logits.numel() * 4 <= peak <= logits.numel() * 4 + per_pixel + (8 << 10)



@CPU_KERNELS
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cpu_gradient_from_the_forward_is_the_recomputed_one(reduction, dtype, layout):
    """On the CPU a reduced loss gets loss.backward()'s gradient in its forward sweeps; any other incoming gradient
    (a scaled loss, a retained graph's second backward) runs the sweeps again. Both give one answer: bitwise the
    same gradient each time, exactly k times it for a loss scaled by a power of two, and F.cross_entropy's."""
    logits, target = make_case((2, 6, 37, 41), dtype, "cpu")
    if layout == "channels_last":
        logits = logits.to(memory_format=torch.channels_last)
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5, 1.0, 0.25])
    z = logits.clone().requires_grad_()
    loss = fcn_fast.softmax_cross_entropy(z, target, weight=weight, reduction=reduction, label_smoothing=0.1,
                                          backend="cpu")
    grads = []
    for _ in range(3):
        (grad,) = torch.autograd.grad(loss, z, retain_graph=True)
        grads.append(grad)
    (scaled,) = torch.autograd.grad(4.0 * loss, z)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    assert torch.equal(scaled, 4.0 * grads[0])
    assert grads[0].stride() == z.stride()
    ref_loss, ref_grad = expected(logits, target, weight=weight, reduction=reduction, label_smoothing=0.1,
                                  ignore_index=IGNORE)
    assert_close(loss, ref_loss, dtype=dtype)
    assert_close(grads[0], ref_grad, dtype=dtype)


@CPU_KERNELS
def test_cpu_loss_is_the_same_with_and_without_a_gradient():
    logits, target = make_case((2, 5, 30, 31), torch.float32, "cpu")
    with torch.no_grad():
        plain = fcn_fast.softmax_cross_entropy(logits, target, backend="cpu")
    training = fcn_fast.softmax_cross_entropy(logits.clone().requires_grad_(), target, backend="cpu")
    assert torch.equal(plain, training.detach())


@CPU_KERNELS
def test_cpu_forward_holds_a_gradient_only_when_one_is_needed():
    """The gradient written in the forward is logits-sized: evaluation (no_grad, or logits that need none) must not
    allocate it; a training step's backward hands it on without a copy (peak: gradient + lse + small)."""
    from fcn_fast.bench.measure import peak_memory

    logits, target = make_case((2, 8, 60, 68), torch.float32, "cpu")
    size, per_pixel = logits.numel() * 4, target.numel() * 4
    cpu = torch.device("cpu")
    z = logits.clone().requires_grad_()
    with torch.no_grad():
        assert peak_memory(lambda: fcn_fast.softmax_cross_entropy(z, target, backend="cpu"), cpu) < per_pixel * 2
    assert peak_memory(lambda: fcn_fast.softmax_cross_entropy(logits, target, backend="cpu"), cpu) < per_pixel * 2
    step = peak_memory(lambda: fcn_fast.softmax_cross_entropy(z, target, backend="cpu").backward(), cpu)
    assert size <= step <= size + per_pixel + (8 << 10)


@CPU_KERNELS
def test_native_reduced_forward_guards_its_arguments():
    """Direct torch.ops calls of the CPU-only kernels get an error, never a read out of bounds."""
    logits, target = make_case((2, 4, 5, 6), torch.float32, "cpu")
    flat, flat_target = logits.reshape(2, 4, 30), target.reshape(2, 30)
    ops = torch.ops.fcn_fast
    with pytest.raises(RuntimeError, match="weight"):
        ops._softmax_cross_entropy_fwd_sums(flat, flat_target, torch.ones(3), IGNORE, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="target"):
        ops._softmax_cross_entropy_fwd_sums(flat, flat_target[:, :29], None, IGNORE, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="weight"):
        ops._ce_denominator(flat_target, torch.ones(3), 4, IGNORE)
    with pytest.raises(RuntimeError, match="num_classes"):
        ops._ce_denominator(flat_target, None, 0, IGNORE)


@CPU_KERNELS
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.uint8])
@pytest.mark.parametrize("weighted", [False, True])
def test_native_denominator_matches_torch(target_dtype, weighted):
    gen = torch.Generator().manual_seed(5)
    target = torch.randint(0, 9, (3, 70001), generator=gen)  # 9 classes: label 7 and 8 are out of range for C = 7
    target[:, ::5] = IGNORE
    weight = torch.rand(7, generator=gen, dtype=torch.float64) if weighted else None
    target = target[:, 1:]  # not contiguous
    valid = (target != IGNORE) & (target < 7)
    expect = (weight[target[valid]].sum() if weighted else valid.sum()).item()
    got = torch.ops.fcn_fast._ce_denominator(target.to(target_dtype), weight, 7, IGNORE)
    assert got.dtype == torch.float64 and got.item() == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["softmax_cross_entropy", "upsample_cross_entropy"])
def test_small_integer_labels_compare_as_integers(backend, op):
    """A uint8 label is not ignore_index=-100 even though -100 wraps to 156 in uint8, and the labels of an int8 target
    are checked as the numbers they are: every backend agrees with the int64 target."""
    device = device_for(backend)
    gen = torch.Generator().manual_seed(11)
    num_classes = 200
    target = torch.randint(150, num_classes, (2, 6, 7), generator=gen)
    target[0, 0, :3] = 156
    if op == "softmax_cross_entropy":
        logits = torch.randn(2, num_classes, 6, 7, generator=gen, dtype=torch.float64).to(device)
        call = lambda t, **kw: fcn_fast.softmax_cross_entropy(logits, t.to(device), backend=backend, **kw)
    else:
        logits = torch.randn(2, num_classes, 3, 4, generator=gen, dtype=torch.float64).to(device)
        call = lambda t, **kw: fcn_fast.upsample_cross_entropy(logits, t.to(device), factor=2, offset=(0, 1),
                                                               backend=backend, **kw)
    expected = call(target, ignore_index=-100, reduction="none")
    actual = call(target.to(torch.uint8), ignore_index=-100, reduction="none")
    assert (expected[0, 0, :3] > 0).all()  # label 156 is a class, not ignored
    torch.testing.assert_close(actual, expected)
    negative = (target - 150).to(torch.int8)  # labels 0..49
    negative[0, 0, 0] = -1
    with pytest.raises(ValueError, match=r"-1 \(1 pixels\)"):
        call(negative, ignore_index=255)


def test_label_check_without_native_kernels_compares_as_integers(monkeypatch):
    """The label check's torch path (GPU tensors, or no fcn_fast._C) on small integer targets."""
    from fcn_fast import _extension
    from fcn_fast.ops import _ce_common

    monkeypatch.setattr(_extension, "has_cpu_kernels", lambda: False)
    labels = torch.tensor([[0, 5, 156]], dtype=torch.uint8)
    _ce_common.check_targets("op", labels, 200, -100)  # 156 is a valid class, not -100
    with pytest.raises(ValueError, match=r"156 \(1 pixels\)"):
        _ce_common.check_targets("op", labels, 100, -100)
    with pytest.raises(ValueError, match=r"-1 \(1 pixels\)"):
        _ce_common.check_targets("op", torch.tensor([[-1, 3]], dtype=torch.int8), 10, 255)

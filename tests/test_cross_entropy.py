"""softmax_cross_entropy and SoftmaxCrossEntropyLoss against torch.nn.functional.cross_entropy, on every backend."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fcn_fast
from fcn_fast.nn import SoftmaxCrossEntropyLoss
from harness import DTYPES, HAS_CUDA, TOLERANCES, assert_close, backend_params, device_for

# Triton's interpreter computes masked-out lanes of -inf/NaN tiles with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning")

BACKENDS = backend_params()
REDUCTIONS = ("mean", "sum", "none")
IGNORE = 255


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


def expected(logits, target, grad_out=None, **kwargs):
    """F.cross_entropy in float64: (loss, grad wrt logits)."""
    z = logits.detach().double().requires_grad_()
    weight = kwargs.pop("weight", None)
    loss = F.cross_entropy(z, target.long(), weight=None if weight is None else weight.double(), **kwargs)
    grad_out = torch.ones_like(loss) if grad_out is None else grad_out.double()
    (grad,) = torch.autograd.grad(loss, z, grad_out)
    return loss, grad


def run(logits, target, backend, grad_out=None, **kwargs):
    z = logits.detach().clone().requires_grad_()
    loss = fcn_fast.softmax_cross_entropy(z, target, backend=backend, **kwargs)
    grad_out = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    (grad,) = torch.autograd.grad(loss, z, grad_out)
    return loss, grad


def check_against_torch(logits, target, backend, **kwargs):
    grad_out = None
    if kwargs.get("reduction") == "none":
        grad_out = torch.randn(target.shape, generator=torch.Generator().manual_seed(1)).to(logits.device)
    loss, grad = run(logits, target, backend, grad_out, **kwargs)
    ref_loss, ref_grad = expected(logits, target, grad_out, ignore_index=kwargs.get("ignore_index", IGNORE),
                                  **{k: v for k, v in kwargs.items() if k != "ignore_index"})
    assert loss.dtype == logits.dtype and loss.shape == ref_loss.shape
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert_close(loss, ref_loss, logits.dtype, equal_nan=True)
    assert_close(grad, ref_grad, logits.dtype, equal_nan=True)


def full_product():
    return itertools.product(DTYPES, REDUCTIONS, (False, True), (0.0, 0.1), ("none", "some", "all"))


def triton_product():
    # The interpreter is slow: weight and smoothing switch together.
    return [(d, r, w, s, i) for d, r, (w, s), i in
            itertools.product(DTYPES, REDUCTIONS, ((False, 0.0), (True, 0.1)), ("none", "some", "all"))]


def _matrix():
    for backend in BACKENDS:
        cases = triton_product() if backend.id == "triton" else full_product()
        for dtype, reduction, weighted, smoothing, ignore in cases:
            case_id = f"{backend.id}-{str(dtype)[6:]}-{reduction}-{'w' if weighted else 'nw'}-ls{smoothing}-{ignore}"
            yield pytest.param(backend.values[0], dtype, reduction, weighted, smoothing, ignore, marks=backend.marks,
                               id=case_id)


@pytest.mark.parametrize("backend,dtype,reduction,weighted,smoothing,ignore", list(_matrix()))
def test_matches_torch(backend, dtype, reduction, weighted, smoothing, ignore):
    device = device_for(backend)
    logits, target = make_case((2, 5, 3, 4), dtype, device, ignore)
    weight = torch.rand(5, generator=torch.Generator().manual_seed(2)).add(0.1).to(device) if weighted else None
    check_against_torch(logits, target, backend, weight=weight, reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7, 6), (2, 4, 9), (2, 3, 4, 5), (1, 3, 2, 3, 4)], ids=str)
def test_shapes(backend, shape):
    logits, target = make_case(shape, torch.float32, device_for(backend))
    check_against_torch(logits, target, backend, reduction="none", label_smoothing=0.05)
    check_against_torch(logits, target, backend, reduction="mean")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int16, torch.uint8], ids=str)
def test_target_dtypes(backend, target_dtype):
    logits, target = make_case((2, 6, 5, 3), torch.float32, device_for(backend), target_dtype=target_dtype)
    check_against_torch(logits, target, backend, reduction="mean")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_strided_logits(backend, layout):
    """Logits are read in place with their strides; kernels give the gradient a dense input's layout."""
    device = device_for(backend)
    logits, target = make_case((2, 5, 6, 7), torch.float32, device)
    if layout == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        logits, target = logits[:, :, 1:5, ::2], target[:, 1:5, ::2]
    else:
        logits, target = logits.transpose(2, 3), target.transpose(1, 2)
    check_against_torch(logits, target, backend, reduction="none")
    if layout == "channels_last" and backend != "reference":
        _, grad = run(logits, target, backend)
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_magnitude_half(backend):
    """fp16/bf16 logits in the thousands (exp would overflow fp16 at 11): float32 accumulation keeps them exact."""
    device = device_for(backend)
    for dtype in (torch.float16, torch.bfloat16):
        logits, target = make_case((2, 4, 3, 5), dtype, device, scale=1.0)
        logits = (logits.float() * 6e3).to(dtype)
        check_against_torch(logits, target, backend, reduction="mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inf_logits_follow_torch(backend):
    device = device_for(backend)
    nan, inf = float("nan"), float("inf")
    # Pixels (columns): NaN; +inf not the target; +inf the target; -inf target; all -inf; -inf elsewhere; NaN but
    # ignored; +inf but ignored; finite.
    logits = torch.tensor([[nan, 1.0, 2.0, 0.0, -inf, -inf, nan, inf, 1.0],
                           [0.0, inf, inf, -inf, -inf, 2.0, 1.0, 0.0, 2.0],
                           [1.0, 0.0, 1.0, 3.0, -inf, 0.5, 2.0, 1.0, 3.0]]).unsqueeze(0)
    target = torch.tensor([[1, 0, 1, 1, 0, 2, IGNORE, IGNORE, 0]])
    for dtype in (torch.float32, torch.float16):
        for reduction in REDUCTIONS:
            for smoothing in (0.0, 0.2):
                check_against_torch(logits.to(dtype).to(device), target.to(device), backend, reduction=reduction,
                                    label_smoothing=smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    device = device_for(backend)
    for shape in [(0, 4, 3, 3), (2, 4, 0, 3), (0, 4)]:
        logits, target = make_case(shape, torch.float32, device)
        for reduction in REDUCTIONS:
            check_against_torch(logits, target, backend, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_mean_is_nan(backend):
    logits, target = make_case((1, 3, 2, 2), torch.float32, device_for(backend), ignore="all")
    loss, grad = run(logits, target, backend)
    assert torch.isnan(loss) and bool((grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_bad_labels_are_ignored(backend):
    """check_targets=False: labels outside [0, C) count as ignored, and nothing is read out of bounds."""
    device = device_for(backend)
    logits, target = make_case((2, 4, 3, 3), torch.float32, device)
    bad = target.clone()
    bad[0, 0, 0], bad[1, 2, 1], bad[1, 0, 2] = 4, -7, 10**6
    loss, grad = run(logits, bad, backend, check_targets=False, reduction="sum")
    masked = torch.where((bad >= 0) & (bad < 4), bad, IGNORE)
    ref_loss, ref_grad = expected(logits, masked, ignore_index=IGNORE, reduction="sum")
    assert_close(loss, ref_loss, torch.float32)
    assert_close(grad, ref_grad, torch.float32)


# ---- gradients, registration, compile -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id in ("reference", "cpu", "cuda")])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, reduction):
    device = device_for(backend)
    logits, target = make_case((2, 4, 3, 2), torch.float64, device)
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64, device=device)
    z = logits.clone().requires_grad_()
    fn = lambda x: fcn_fast.softmax_cross_entropy(x, target, weight=weight, reduction=reduction,  # noqa: E731
                                                  label_smoothing=0.1, backend=backend)
    assert torch.autograd.gradcheck(fn, (z,))


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id in ("reference", "cpu", "cuda")])
def test_opcheck(backend):
    device = device_for(backend)
    logits, target = make_case((2, 3, 4, 3), torch.float32, device)
    weight = torch.tensor([1.0, 2.0, 0.5], device=device)
    # need_grad=True: on the CPU a reduced loss then also returns the gradient the backward hands on.
    for reduction, w, need_grad in (("mean", weight, True), ("sum", None, False), ("none", None, True)):
        args = (logits.clone().requires_grad_(), target, w, IGNORE, reduction, 0.1, True, need_grad, backend)
        torch.library.opcheck(torch.ops.fcn_fast.softmax_cross_entropy, args)


def test_compile_fullgraph():
    logits, target = make_case((2, 4, 5, 3), torch.float32, "cpu")
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0])

    def step(z):
        return fcn_fast.softmax_cross_entropy(z * 2.0, target, weight=weight, label_smoothing=0.1) + z.mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    z1, z2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out_compiled, out_eager = compiled(z1), step(z2)
    out_compiled.backward()
    out_eager.backward()
    assert_close(out_compiled, out_eager.detach())
    assert_close(z1.grad, z2.grad)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 3), c=st.integers(1, 7), spatial=st.lists(st.integers(0, 4), max_size=2),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       reduction=st.sampled_from(REDUCTIONS), weighted=st.booleans(), smoothing=st.sampled_from([0.0, 0.3, 1.0]),
       ignore_index=st.sampled_from([-100, 0, 2, 255]), ignored_fraction=st.floats(0, 1),
       target_dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8]), seed=st.integers(0, 2**16))
def test_fuzz_cpu_against_torch(n, c, spatial, dtype, reduction, weighted, smoothing, ignore_index, ignored_fraction,
                                target_dtype, seed):
    if not fcn_fast.available_backends()["cpu"]:
        pytest.skip("cpu backend unavailable")
    if target_dtype == torch.uint8 and ignore_index < 0:
        ignore_index = 255
    gen = torch.Generator().manual_seed(seed)
    shape = (n, c, *spatial)
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * 4).to(dtype)
    target = torch.randint(0, c, (n, *spatial), generator=gen)
    target[torch.rand(target.shape, generator=gen) < ignored_fraction] = ignore_index
    weight = torch.rand(c, generator=gen) + 0.05 if weighted else None
    for backend in ("cpu", "reference"):
        check_against_torch(logits, target.to(target_dtype), backend, weight=weight, reduction=reduction,
                            label_smoothing=smoothing, ignore_index=ignore_index)


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


@pytest.mark.skipif(not fcn_fast._extension.has_cpu_kernels(), reason="fcn_fast._C did not load")
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


@pytest.mark.skipif(not fcn_fast._extension.has_cpu_kernels(), reason="fcn_fast._C did not load")
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


@pytest.mark.skipif(not fcn_fast.available_backends()["cpu"].available, reason="fcn_fast._C not built")
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


CPU_KERNELS = pytest.mark.skipif(not fcn_fast.available_backends()["cpu"].available, reason="fcn_fast._C not built")


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
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_results_do_not_depend_on_the_thread_count(reduction):
    """Partial sums per fixed 512-pixel block, added in order: the same loss and gradient bits on 1 or 2 threads."""
    logits, target = make_case((2, 7, 45, 47), torch.float32, "cpu")
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            z = logits.clone().requires_grad_()
            loss = fcn_fast.softmax_cross_entropy(z, target, reduction=reduction, label_smoothing=0.1, backend="cpu")
            loss.backward(torch.ones_like(loss))
            results.append((loss.detach(), z.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


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

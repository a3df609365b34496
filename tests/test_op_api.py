"""The public ops' API around their math: torch.func transforms (grad, vmap), double backward, argument validation
(every public op's arguments) and autocast, on every backend that runs here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fcn_fast
from fcn_fast.ops._resample import bilinear_kernel
from harness import HAS_CUDA, assert_close, backend_params, device_for

BACKENDS = backend_params()


def _slow_when_interpreted(params):
    """The same params, with Triton marked slow when it runs under its interpreter (these loop over samples)."""
    return [pytest.param(*p.values, marks=[*p.marks, pytest.mark.slow], id=p.id)
            if p.values[0] == "triton" and not HAS_CUDA else p for p in params]


# Triton's interpreter computes masked-out lanes of -inf/NaN tiles with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning")


def _target(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 3, (2, 8, 10), generator=gen)
    target[0, 0, :3] = 255
    return target.to(device)


# Each differentiable op as a scalar function of a (2, 3, 4, 5) input, for a backend and the labels it needs.
DIFFERENTIABLE = {
    "upsample_add": lambda x, t, b: fcn_fast.upsample_add(x, factor=2, mode="deconv", out_size=(8, 10),
                                                         backend=b).square().sum(),
    "softmax_cross_entropy": lambda x, t, b: fcn_fast.softmax_cross_entropy(x, t[:, :4, :5], label_smoothing=0.1,
                                                                           backend=b),
    "upsample_cross_entropy": lambda x, t, b: fcn_fast.upsample_cross_entropy(x, t, factor=2, mode="interp",
                                                                             reduction="sum", backend=b),
}


def _input(device, seed=1, dtype=torch.float64):
    return torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def _backward_grad(f, x, t, backend):
    x = x.clone().requires_grad_()
    f(x, t, backend).backward()
    return x.grad


# ---- torch.func ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(DIFFERENTIABLE))
def test_func_grad_equals_backward(op, backend):
    f, device = DIFFERENTIABLE[op], device_for(backend)
    x, t = _input(device), _target(device)
    grad = torch.func.grad(lambda y: f(y, t, backend))(x)
    assert_close(grad, _backward_grad(f, x, t, backend))


@pytest.mark.parametrize("op", list(DIFFERENTIABLE))
def test_other_reverse_mode_transforms_and_forward_mode(op):
    f, x, t = DIFFERENTIABLE[op], _input("cpu"), _target("cpu")
    want = _backward_grad(f, x, t, None)
    value, vjp = torch.func.vjp(lambda y: f(y, t, None), x)
    assert_close(vjp(torch.ones_like(value))[0], want)
    assert_close(torch.func.jacrev(lambda y: f(y, t, None))(x), want)
    with pytest.raises(NotImplementedError, match=rf"{op}: forward-mode AD .* is not supported"):
        torch.func.jvp(lambda y: f(y, t, None), (x,), (x,))
    with pytest.raises(NotImplementedError, match=rf"{op}: forward-mode AD"):
        torch.func.hessian(lambda y: f(y, t, None))(x)


@pytest.mark.parametrize("backend", _slow_when_interpreted(BACKENDS))
@pytest.mark.parametrize("op", list(DIFFERENTIABLE))
def test_vmap_and_per_sample_gradients_equal_a_loop(op, backend):
    f, device = DIFFERENTIABLE[op], device_for(backend)
    xs, t = torch.stack([_input(device, 1), _input(device, 2)]), _target(device)
    values = torch.vmap(lambda y: f(y, t, backend))(xs)
    assert_close(values, torch.stack([f(x, t, backend) for x in xs]))
    grads = torch.vmap(torch.func.grad(lambda y: f(y, t, backend)))(xs)
    assert_close(grads, torch.stack([_backward_grad(f, x, t, backend) for x in xs]))


@pytest.mark.parametrize("backend", _slow_when_interpreted(BACKENDS))
def test_vmap_over_labels_and_argmax(backend):
    device = device_for(backend)
    coarse, targets = _input(device), torch.stack([_target(device, 0), _target(device, 1)])
    losses = torch.vmap(lambda t: fcn_fast.upsample_cross_entropy(coarse, t, factor=2, mode="interp",
                                                                 backend=backend))(targets)
    assert_close(losses, torch.stack([fcn_fast.upsample_cross_entropy(coarse, t, factor=2, mode="interp",
                                                                      backend=backend) for t in targets]))
    bad = targets.clone()
    bad[1, 1, 1, 1] = 7  # the label check sees every sample's labels
    with pytest.raises(ValueError, match=r"upsample_cross_entropy: target has labels outside \[0, 3\).*7 \(1 pixels\)"):
        torch.vmap(lambda t: fcn_fast.upsample_cross_entropy(coarse, t, factor=2, mode="interp", backend=backend))(bad)
    many = torch.stack([coarse, -coarse])
    labels = torch.vmap(lambda c: fcn_fast.upsample_argmax(c, factor=2, out_size=(8, 10), backend=backend))(many)
    for c, got in zip(many, labels):
        assert torch.equal(got, fcn_fast.upsample_argmax(c, factor=2, out_size=(8, 10), backend=backend))


@pytest.mark.parametrize("op", list(DIFFERENTIABLE))
def test_vmap_of_an_empty_batch(op):
    f, t = DIFFERENTIABLE[op], _target("cpu")
    empty = torch.empty(0, 2, 3, 4, 5, dtype=torch.float64)
    assert torch.vmap(lambda y: f(y, t, None))(empty).shape == (0,)
    assert torch.vmap(torch.func.grad(lambda y: f(y, t, None)))(empty).shape == empty.shape


# ---- double backward -----------------------------------------------------------------------------------------------

def _through_custom_op(op):
    """The same op through torch.ops.fcn_fast (the registered autograd, what tracing sees) for the double backward
    tests: the public functions take the eager Function on plain tensors."""
    return {
        "upsample_add": lambda x, t, b: torch.ops.fcn_fast.upsample_add(
            x, None, 2, "deconv", 8, 10, 0, 0, 0, 0, 1.0, False, b).square().sum(),
        "softmax_cross_entropy": lambda x, t, b: torch.ops.fcn_fast.softmax_cross_entropy(
            x, t[:, :4, :5], None, 255, "mean", 0.1, True, True, b)[0],
        "upsample_cross_entropy": lambda x, t, b: torch.ops.fcn_fast.upsample_cross_entropy(
            x, t, None, 2, "interp", 0, 0, False, 255, "sum", 0.0, True, b)[0],
    }[op]


@pytest.mark.parametrize("path", ["public", "custom_op", "func"])
@pytest.mark.parametrize("backend", _slow_when_interpreted(BACKENDS))
@pytest.mark.parametrize("op", list(DIFFERENTIABLE))
def test_double_backward_raises_naming_the_op(op, backend, path):
    device = device_for(backend)
    f = DIFFERENTIABLE[op] if path != "custom_op" else _through_custom_op(op)
    x, t = _input(device).requires_grad_(), _target(device)
    message = rf"{op}: double backward is not supported"
    if path == "func":
        with pytest.raises(RuntimeError, match=message):
            torch.func.grad(lambda y: torch.func.grad(lambda z: f(z, t, backend))(y).sum())(x.detach())
        return
    grad, = torch.autograd.grad(f(x, t, backend), x, create_graph=True)
    assert_close(grad, _backward_grad(f, x.detach(), t, backend))  # the gradient itself is right
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(grad.square().sum(), x)
    with pytest.raises(RuntimeError, match=message):
        grad.sum().backward()


def test_a_gradient_that_is_constant_stays_plain():
    """upsample_add is linear: with create_graph=True, the gradient of a sum of its output depends on nothing
    differentiable, and comes back without grad_fn (its second derivative is 0, not an error)."""
    x = _input("cpu").requires_grad_()
    skip = torch.randn(2, 3, 8, 10, dtype=torch.float64, requires_grad=True)
    grad_x, grad_skip = torch.autograd.grad(fcn_fast.upsample_add(x, skip, factor=2).sum(), (x, skip),
                                            create_graph=True)
    assert grad_x.grad_fn is None and grad_skip.grad_fn is None
    # A skip added whole takes the output's gradient as its own: the identity, differentiable as it is.
    y = torch.randn(2, 3, 8, 10, dtype=torch.float64, requires_grad=True)
    grad_skip, = torch.autograd.grad((fcn_fast.upsample_add(x, skip, factor=2) * y).sum(), skip, create_graph=True)
    second, = torch.autograd.grad(grad_skip.sum(), y)
    assert torch.equal(second, torch.ones_like(y))


# ---- argument validation: every public op's arguments --------------------------------------------------------------

X, SKIP = torch.randn(1, 2, 4, 5), torch.randn(1, 2, 8, 10)
LOGITS, LABELS = torch.randn(1, 3, 4, 5), torch.randint(0, 3, (1, 4, 5))
COARSE, FULL_LABELS = torch.randn(1, 3, 4, 5), torch.randint(0, 3, (1, 8, 10))


def _call(op, **overrides):
    if op == "upsample_add":
        kwargs = dict(x=X, skip=SKIP, factor=2, mode="interp", out_size=None, offset=(0, 0), skip_offset=(0, 0),
                      skip_scale=1.0, align_corners=False, backend="reference")
        kwargs.update(overrides)
        return fcn_fast.upsample_add(kwargs.pop("x"), kwargs.pop("skip"), **kwargs)
    if op == "softmax_cross_entropy":
        kwargs = dict(logits=LOGITS, target=LABELS, weight=None, ignore_index=255, reduction="mean",
                      label_smoothing=0.0, check_targets=True, backend="reference")
        kwargs.update(overrides)
        return fcn_fast.softmax_cross_entropy(kwargs.pop("logits"), kwargs.pop("target"), **kwargs)
    if op == "upsample_cross_entropy":
        kwargs = dict(coarse=COARSE, target=FULL_LABELS, factor=2, mode="interp", offset=(0, 0), align_corners=False,
                      weight=None, ignore_index=255, reduction="mean", label_smoothing=0.0, check_targets=True,
                      backend="reference")
        kwargs.update(overrides)
        return fcn_fast.upsample_cross_entropy(kwargs.pop("coarse"), kwargs.pop("target"), **kwargs)
    kwargs = dict(coarse=COARSE, factor=2, mode="interp", out_size=(8, 10), offset=(0, 0), align_corners=False,
                  dtype=torch.int64, backend="reference")
    kwargs.update(overrides)
    return fcn_fast.upsample_argmax(kwargs.pop("coarse"), **kwargs)


SPARSE = torch.randn(1, 2, 4, 5).to_sparse()
UE, CE, UCE, UAM = "upsample_add", "softmax_cross_entropy", "upsample_cross_entropy", "upsample_argmax"
# (op, bad arguments, error, message): each argument of each public op, wrong in type and in value.
BAD = [
    (UE, dict(x=[1.0]), TypeError, "upsample_add: x must be a torch.Tensor, got list"),
    (UE, dict(x=SPARSE), TypeError, r"upsample_add: x must be a dense \(strided\) tensor, got layout torch.sparse_coo"),
    (UE, dict(x=torch.ones(1, 2, 4, 5, dtype=torch.int32)), TypeError, "upsample_add: x must have dtype"),
    (UE, dict(skip=SKIP.to_sparse()), TypeError, r"upsample_add: skip must be a dense \(strided\) tensor"),
    (UE, dict(skip="skip"), TypeError, "upsample_add: skip must be a torch.Tensor, got str"),
    (UE, dict(factor=2.0), TypeError, r"upsample_add: factor must be an int, got 2\.0"),
    (UE, dict(factor=2 ** 70), ValueError, "upsample_add: factor must fit in int64"),
    (UE, dict(factor=np.bool_(True)), TypeError, "upsample_add: factor must be an int"),
    (UE, dict(mode=["interp"]), ValueError, "upsample_add: mode must be one of"),
    (UE, dict(out_size=(8, 10.0)), TypeError, r"upsample_add: out_size\[1\] must be an int"),
    (UE, dict(offset="0"), TypeError, "upsample_add: offset must be an int or a pair of ints"),
    (UE, dict(skip_offset=(0, 2 ** 64)), ValueError, r"upsample_add: skip_offset\[1\] must fit in int64"),
    (UE, dict(skip_scale="1"), TypeError, r"upsample_add: skip_scale must be a float \(a Python or NumPy number\)"),
    (UE, dict(skip_scale=torch.tensor(1.0)), TypeError, "upsample_add: skip_scale must be a float.*Tensor"),
    (UE, dict(skip_scale=True), TypeError, "upsample_add: skip_scale must be a float"),
    (UE, dict(align_corners="yes"), TypeError,
     r"upsample_add: align_corners must be a bool \(True or False\), got 'yes'"),
    (UE, dict(align_corners=1), TypeError, "upsample_add: align_corners must be a bool"),
    (UE, dict(align_corners=None), TypeError, "upsample_add: align_corners must be a bool"),
    (UE, dict(backend=["cpu"]), ValueError, r"unknown backend \['cpu'\]"),
    (UE, dict(backend="gpu"), ValueError, "unknown backend 'gpu'"),
    (CE, dict(logits=LOGITS.to_sparse()), TypeError, r"softmax_cross_entropy: logits must be a dense \(strided\)"),
    (CE, dict(logits=torch.randn(3)), ValueError, "softmax_cross_entropy: logits must have at least 2 dimensions"),
    (CE, dict(target=LABELS.float()), TypeError, "softmax_cross_entropy: target must have dtype"),
    (CE, dict(target=LABELS.to_sparse()), TypeError, r"softmax_cross_entropy: target must be a dense \(strided\)"),
    (CE, dict(weight=torch.ones(3).to_sparse()), TypeError, r"softmax_cross_entropy: weight must be a dense"),
    (CE, dict(weight=[1.0, 1.0, 1.0]), TypeError, "softmax_cross_entropy: weight must be a torch.Tensor"),
    (CE, dict(ignore_index=2 ** 70), ValueError,
     r"softmax_cross_entropy: ignore_index must fit in int64 .*, got 1180591620717411303424"),
    (CE, dict(ignore_index=-(2 ** 63) - 1), ValueError, "softmax_cross_entropy: ignore_index must fit in int64"),
    (CE, dict(ignore_index=255.0), TypeError, "softmax_cross_entropy: ignore_index must be an int"),
    (CE, dict(reduction="avg"), ValueError, "softmax_cross_entropy: reduction must be one of"),
    (CE, dict(reduction=None), ValueError, "softmax_cross_entropy: reduction must be one of"),
    (CE, dict(label_smoothing="0.1"), TypeError, "softmax_cross_entropy: label_smoothing must be a float"),
    (CE, dict(label_smoothing=float("nan")), ValueError,
     r"softmax_cross_entropy: label_smoothing must be a float in \[0, 1\], got nan"),
    (CE, dict(label_smoothing=np.float32(1.5)), ValueError, r"label_smoothing must be a float in \[0, 1\], got 1\.5"),
    (CE, dict(check_targets=1), TypeError, "softmax_cross_entropy: check_targets must be a bool"),
    (CE, dict(backend=3), ValueError, "unknown backend 3"),
    (UCE, dict(coarse=COARSE.to_sparse()), TypeError, r"upsample_cross_entropy: coarse must be a dense \(strided\)"),
    (UCE, dict(target=FULL_LABELS.to_sparse()), TypeError, r"upsample_cross_entropy: target must be a dense"),
    (UCE, dict(target=FULL_LABELS[0]), ValueError, r"upsample_cross_entropy: target must be \(N, H, W\)"),
    (UCE, dict(factor="2"), TypeError, "upsample_cross_entropy: factor must be an int"),
    (UCE, dict(mode="nearest"), ValueError, "upsample_cross_entropy: mode must be one of"),
    (UCE, dict(offset=(1, 1)), ValueError, "upsample_cross_entropy: offset applies to mode='deconv' only"),
    (UCE, dict(align_corners="no"), TypeError, "upsample_cross_entropy: align_corners must be a bool"),
    (UCE, dict(weight=torch.ones(4)), ValueError,
     r"upsample_cross_entropy: weight must have one entry per class \(3\)"),
    (UCE, dict(ignore_index=2 ** 70), ValueError, "upsample_cross_entropy: ignore_index must fit in int64"),
    (UCE, dict(reduction="total"), ValueError, "upsample_cross_entropy: reduction must be one of"),
    (UCE, dict(label_smoothing=-0.5), ValueError,
     r"upsample_cross_entropy: label_smoothing must be a float in \[0, 1\]"),
    (UCE, dict(label_smoothing=[0.1]), TypeError, "upsample_cross_entropy: label_smoothing must be a float"),
    (UCE, dict(check_targets="yes"), TypeError, "upsample_cross_entropy: check_targets must be a bool"),
    (UCE, dict(backend="tpu"), ValueError, "unknown backend 'tpu'"),
    (UAM, dict(coarse=COARSE.to_sparse()), TypeError, r"upsample_argmax: coarse must be a dense \(strided\)"),
    (UAM, dict(coarse=COARSE.long()), TypeError, "upsample_argmax: coarse must have dtype"),
    (UAM, dict(factor=0), ValueError, "upsample_argmax: factor must be >= 1, got 0"),
    (UAM, dict(mode=1), ValueError, "upsample_argmax: mode must be one of"),
    (UAM, dict(out_size=None), ValueError, r"upsample_argmax: out_size \(H, W\) is required"),
    (UAM, dict(out_size=(8, 2 ** 70)), ValueError, r"upsample_argmax: out_size\[1\] must fit in int64"),
    (UAM, dict(out_size=np.array([8, 10])), TypeError, "upsample_argmax: out_size must be an int or a pair of ints"),
    (UAM, dict(offset=(0, -1)), ValueError, r"upsample_argmax: offset\[1\] must be >= 0"),
    (UAM, dict(align_corners=np.bool_(False)), TypeError, "upsample_argmax: align_corners must be a bool"),
    (UAM, dict(dtype=torch.int32), TypeError, "upsample_argmax: dtype must be torch.int64 or torch.uint8"),
    (UAM, dict(dtype="int64"), TypeError, "upsample_argmax: dtype must be"),
    (UAM, dict(backend=["reference"]), ValueError, "unknown backend"),
]


@pytest.mark.parametrize("op,kwargs,error,message", BAD,
                         ids=[f"{op}-{next(iter(kw))}-{i}" for i, (op, kw, _, _) in enumerate(BAD)])
def test_bad_argument_is_a_clear_error(op, kwargs, error, message):
    with pytest.raises(error, match=message):
        _call(op, **kwargs)


# NumPy scalars where PyTorch takes them: the same result as the Python number.
NUMPY = [
    (UE, dict(skip_scale=np.float32(0.5)), dict(skip_scale=float(np.float32(0.5)))),
    (UE, dict(factor=np.int64(2), out_size=(np.int32(8), np.int64(10))), dict(factor=2, out_size=(8, 10))),
    (UE, dict(mode="deconv", out_size=(8, 10), offset=np.int64(1), skip_offset=(np.int16(0), 0)),
     dict(mode="deconv", out_size=(8, 10), offset=1)),
    (CE, dict(label_smoothing=np.float32(0.1)), dict(label_smoothing=float(np.float32(0.1)))),
    (CE, dict(label_smoothing=np.float64(0.1), ignore_index=np.int64(1)), dict(label_smoothing=0.1, ignore_index=1)),
    (UCE, dict(label_smoothing=np.float16(0.25), factor=np.uint8(2)), dict(label_smoothing=0.25, factor=2)),
    (UCE, dict(ignore_index=np.int32(2), label_smoothing=np.int64(1)), dict(ignore_index=2, label_smoothing=1.0)),
    (UAM, dict(factor=np.int64(2), out_size=(np.int64(8), 10)), dict(factor=2, out_size=(8, 10))),
]


@pytest.mark.parametrize("op,numpy_kwargs,python_kwargs", NUMPY, ids=[f"{n[0]}-{i}" for i, n in enumerate(NUMPY)])
def test_numpy_scalars_are_accepted(op, numpy_kwargs, python_kwargs):
    assert torch.equal(_call(op, **numpy_kwargs), _call(op, **python_kwargs))


def test_modules_validate_at_call():
    with pytest.raises(TypeError, match="softmax_cross_entropy: label_smoothing must be a float"):
        fcn_fast.nn.SoftmaxCrossEntropyLoss(label_smoothing="0.1")(LOGITS, LABELS)
    with pytest.raises(TypeError, match="upsample_add: align_corners must be a bool"):
        fcn_fast.nn.UpsampleAdd(factor=2, align_corners="yes")(X)
    with pytest.raises(ValueError, match="upsample_cross_entropy: ignore_index must fit in int64"):
        fcn_fast.nn.UpsampleCrossEntropyLoss(ignore_index=2 ** 70)(COARSE, FULL_LABELS, factor=2)


# ---- autocast ------------------------------------------------------------------------------------------------------

def _autocast_cases(device, dtype):
    """(name, fused call, the PyTorch composition it replaces), both run inside autocast."""
    gen = torch.Generator().manual_seed(3)
    coarse = torch.randn(2, 3, 4, 5, generator=gen).to(device)
    skip = torch.randn(2, 3, 10, 12, generator=gen).to(device)
    target = torch.randint(0, 3, (2, 8, 10), generator=gen).to(device)
    kernel = bilinear_kernel(3, 2).to(device)
    low = coarse.to(dtype)
    return [
        ("ce-low", lambda b: fcn_fast.softmax_cross_entropy(low, target[:, :4, :5], backend=b),
         lambda: F.cross_entropy(low, target[:, :4, :5], ignore_index=255)),
        ("ce-none-float32", lambda b: fcn_fast.softmax_cross_entropy(coarse, target[:, :4, :5], reduction="none",
                                                                     backend=b),
         lambda: F.cross_entropy(coarse, target[:, :4, :5], reduction="none")),
        ("uce-low", lambda b: fcn_fast.upsample_cross_entropy(low, target, factor=2, mode="interp", backend=b),
         lambda: F.cross_entropy(F.interpolate(low, size=(8, 10), mode="bilinear"), target, ignore_index=255)),
        ("uce-deconv-low", lambda b: fcn_fast.upsample_cross_entropy(low, target, factor=2, offset=(1, 1),
                                                                     label_smoothing=0.1, backend=b),
         lambda: F.cross_entropy(F.conv_transpose2d(low.float(), kernel, stride=2, groups=3)[:, :, 1:9, 1:11], target,
                                 label_smoothing=0.1, ignore_index=255)),
        ("ua-mixed", lambda b: fcn_fast.upsample_add(low, skip, factor=2, mode="interp", out_size=(8, 10), backend=b),
         lambda: F.interpolate(low, size=(8, 10), mode="bilinear") + skip[:, :, :8, :10]),
        ("ua-mixed-skip-low", lambda b: fcn_fast.upsample_add(coarse, skip.to(dtype), factor=2, mode="interp",
                                                              out_size=(8, 10), backend=b),
         lambda: F.interpolate(coarse, size=(8, 10), mode="bilinear") + skip.to(dtype)[:, :, :8, :10]),
        ("ua-low", lambda b: fcn_fast.upsample_add(low, skip.to(dtype), factor=2, mode="interp", out_size=(8, 10),
                                                   backend=b),
         lambda: F.interpolate(low, size=(8, 10), mode="bilinear") + skip.to(dtype)[:, :, :8, :10]),
    ]


def _check_autocast(device_type, dtype, backend):
    device = device_for(backend)
    assert device.type == device_type
    for name, fused, composition in _autocast_cases(device, dtype):
        with torch.autocast(device_type, dtype=dtype):
            got, want = fused(backend), composition()
        assert got.dtype == want.dtype, name
        # Low-precision inputs: autocast's ops round differently on the way (conv_transpose2d in low precision).
        assert_close(got, want, dtype=torch.float32 if name.endswith("float32") else dtype)
    # Outside autocast a mixed x/skip is a mistake, as before.
    with pytest.raises(TypeError, match="upsample_add: x and skip must have one dtype"):
        fcn_fast.upsample_add(torch.randn(1, 1, 2, 2, device=device, dtype=dtype),
                              torch.randn(1, 1, 4, 4, device=device), factor=2, backend=backend)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if device_for(p.values[0]).type == "cpu"])
def test_cpu_autocast_follows_pytorch(backend):
    _check_autocast("cpu", torch.bfloat16, backend)


def test_autocast_gradient_reaches_the_low_precision_input():
    logits = torch.randn(2, 3, 4, 5, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fcn_fast.softmax_cross_entropy(logits, target)
    loss.backward()
    reference = logits.detach().float().requires_grad_()
    F.cross_entropy(reference, target).backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    assert_close(logits.grad, reference.grad.to(torch.bfloat16))


def test_autocast_under_torch_compile():
    logits, target = torch.randn(2, 3, 4, 5, dtype=torch.bfloat16), torch.randint(0, 3, (2, 4, 5))
    skip = torch.randn(2, 3, 8, 10)
    def both(z, t, s):
        return fcn_fast.softmax_cross_entropy(z, t), fcn_fast.upsample_add(z, s, factor=2)

    compiled = torch.compile(both, fullgraph=True, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, up = compiled(logits, target, skip)
        want_loss, want_up = both(logits, target, skip)
    assert loss.dtype == up.dtype == torch.float32
    assert torch.equal(loss, want_loss) and torch.equal(up, want_up)
    assert compiled(logits, target, skip.bfloat16())[0].dtype == torch.bfloat16  # outside autocast: recompiled


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [p for p in BACKENDS if device_for(p.values[0]).type == "cuda"] or ["cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_follows_pytorch(backend, dtype):
    _check_autocast("cuda", dtype, backend)

"""GPU-only checks of the cuda and triton backends, the properties a CPU run cannot check: 64-bit indexing past
2**31 elements, bitwise deterministic backward passes, kernels on the caller's current stream and device, no host
synchronisation per call.

Every test is marked ``gpu`` and skipped without a CUDA device; nothing touches CUDA at import or collection time.
The large cases hold more than 2**31 elements (the fused losses: output pixels, virtual logits far more) but check
slices only: every op is independent per class plane (upsample_add) or per image (the losses, argmax), so the
reference runs on the last plane or image, the one holding the elements past index 2**31. They need up to ~30 GB of
GPU memory each and take a few seconds.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

import fcn_fast
from fcn_fast.ops.upsample_add import upsample_add_reference
from harness import HAS_CUDA, assert_close, backend_params
from test_cross_entropy import expected as cross_entropy_expected
from test_cross_entropy import make_case as cross_entropy_case
from test_cross_entropy import run as cross_entropy_run
from op_tester import assert_matches
from test_upsample_cross_entropy import composition, make_target

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (GPU-only checks)")]

GPU_BACKENDS = [p for p in backend_params(include_reference=False) if p.id in ("cuda", "triton")]
OPS = ("upsample_add", "softmax_cross_entropy", "upsample_cross_entropy", "upsample_argmax")
BIG = 2**31
IGNORE = 255


@dataclass(frozen=True)
class Case:
    """An upsample_add call: input shape, geometry, and the skip's size (None: no skip)."""
    id: str
    x_shape: Tuple[int, int, int, int]
    factor: int
    mode: str = "interp"
    out_size: Optional[Tuple[int, int]] = None
    offset: Tuple[int, int] = (0, 0)
    skip_hw: Optional[Tuple[int, int]] = None
    skip_offset: Tuple[int, int] = (0, 0)
    skip_scale: float = 1.0

    def kwargs(self):
        return dict(factor=self.factor, mode=self.mode, out_size=self.out_size, offset=self.offset,
                    skip_offset=self.skip_offset, skip_scale=self.skip_scale)


def _inputs(case: Case, dtype, device, *, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.x_shape, generator=gen, dtype=torch.float64).to(dtype)
    skip = None
    if case.skip_hw is not None:
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


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _gpu_state():
    """Every test starts and ends with the caching allocator emptied (the large cases need tens of GB), with TF32
    off so that float32 references on the GPU are float32."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    _free()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    _free()


def _require_free_gib(gib: float) -> None:
    free, total = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs ~{gib} GiB of free GPU memory, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")


def _generator() -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(0)


def _labels(shape, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 labels made on the GPU, every 8th column ignore_index."""
    target = torch.randint(0, num_classes, shape, dtype=torch.uint8, device="cuda", generator=gen)
    target[..., ::8] = IGNORE
    return target


# ---- more than 2**31 elements ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_upsample_add_past_2_31_elements(backend):
    """x8 deconvolution + crop + skip into bf16 (2, 8, 11600, 11600): 2.15e9 output elements (4.3 GB), a skip as
    large; the last plane holds elements 2.02e9 to 2.15e9. ~18 GB."""
    _require_free_gib(24)
    gen = _generator()
    n, c, out_hw = 2, 8, (11600, 11600)
    kwargs = dict(factor=8, mode="deconv", out_size=out_hw, offset=(3, 5), skip_offset=(2, 1), skip_scale=0.5)
    x = torch.randn(n, c, 1450, 1450, dtype=torch.bfloat16, device="cuda", generator=gen)
    skip = torch.randn(n, c, out_hw[0] + 2, out_hw[1] + 1, dtype=torch.bfloat16, device="cuda", generator=gen)
    grad_out = torch.randn(n, c, *out_hw, dtype=torch.bfloat16, device="cuda", generator=gen)
    out, (grad_x, grad_skip), _ = _run(backend, x, skip, grad_out, **kwargs)
    assert out.numel() > BIG and grad_skip.numel() > BIG
    last = (slice(n - 1, n), slice(c - 1, c))
    out, grad_skip = out[last].clone(), grad_skip[last].clone()
    want, (want_x, want_skip), _ = _run("reference", x[last].float(), skip[last].float(), grad_out[last].float(),
                                        **kwargs)
    assert_close(out, want, torch.bfloat16)
    assert_close(grad_x[last], want_x, torch.bfloat16)
    assert_close(grad_skip, want_skip, torch.bfloat16)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_upsample_add_plane_past_2_31_elements(backend):
    """One bf16 plane of 46400^2 = 2.15e9 elements: offsets inside a plane pass 2**31 (the last 64 rows start at
    2.150e9). factor=1 is the identity (one tap of weight 1), so out = x + 0.5 * crop(skip), grad_x = grad and
    grad_skip = 0.5 * grad inside the crop, checked on those rows. ~26 GB."""
    _require_free_gib(32)
    gen = _generator()
    side = 46400
    x = torch.randn(1, 1, side, side, dtype=torch.bfloat16, device="cuda", generator=gen)
    skip = torch.randn(1, 1, side + 1, side + 2, dtype=torch.bfloat16, device="cuda", generator=gen)
    grad_out = torch.randn(1, 1, side, side, dtype=torch.bfloat16, device="cuda", generator=gen)
    out, (grad_x, grad_skip), _ = _run(backend, x, skip, grad_out, factor=1, mode="deconv", skip_offset=(1, 2),
                                       skip_scale=0.5)
    assert out.numel() > BIG
    rows = (..., slice(-64, None), slice(None))  # of out/x/grad; the same rows of skip are its last 64 (crop at 1)
    g = grad_out[rows].float()
    assert_close(out[rows], x[rows].float() + 0.5 * skip[rows][..., 2:].float(), torch.bfloat16)
    assert_close(grad_x[rows], g, torch.bfloat16)
    assert_close(grad_skip[rows][..., 2:], 0.5 * g, torch.bfloat16)
    assert not grad_skip[rows][..., :2].any() and not grad_skip[..., 0, :].any()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_softmax_cross_entropy_past_2_31_elements(backend):
    """bf16 logits (16, 21, 2550, 2550): 2.18e9 elements (4.4 GB); the last image holds elements 2.05e9 to 2.18e9.
    Per-pixel losses and the gradient for a per-pixel incoming gradient, on that image. ~14 GB."""
    _require_free_gib(20)
    gen = _generator()
    shape = (16, 21, 2550, 2550)
    logits = torch.randn(shape, dtype=torch.bfloat16, device="cuda", generator=gen).mul_(3)
    target = _labels(shape[:1] + shape[2:], shape[1], gen)
    grad_out = torch.randn(target.shape, device="cuda", generator=gen)
    loss, grad = cross_entropy_run(logits, target, backend, grad_out, reduction="none")
    assert logits.numel() > BIG and grad.shape == logits.shape
    loss, grad = loss[-1:].clone(), grad[-1:].clone()
    want_loss, want_grad = cross_entropy_expected(logits[-1:], target[-1:], grad_out[-1:], reduction="none",
                                                  ignore_index=IGNORE)
    assert_close(loss, want_loss, torch.bfloat16)
    assert_close(grad, want_grad, torch.bfloat16)


# 16 images of 11600^2 = 2.15e9 output pixels from 3 coarse classes (virtual logits: 6.5e9), bilinear x8.
LOSS_BIG = dict(coarse=(16, 3, 1450, 1450), out_hw=(11600, 11600), geometry=dict(factor=8, mode="interp"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_upsample_cross_entropy_past_2_31_pixels(backend):
    """reduction="none" with a per-pixel incoming gradient (so backward indexes it per pixel too); the last image
    holds pixels 2.02e9 to 2.15e9. ~30 GB (three float32 per-pixel buffers in forward)."""
    _require_free_gib(36)
    gen = _generator()
    coarse = 3 * torch.randn(LOSS_BIG["coarse"], device="cuda", generator=gen)
    target = _labels(LOSS_BIG["coarse"][:1] + LOSS_BIG["out_hw"], LOSS_BIG["coarse"][1], gen)
    x = coarse.detach().requires_grad_()
    loss = fcn_fast.upsample_cross_entropy(x, target, reduction="none", backend=backend, **LOSS_BIG["geometry"])
    assert target.numel() > BIG and loss.shape == target.shape
    grad_out = torch.rand(target.shape, device="cuda", generator=gen)
    (grad,) = torch.autograd.grad(loss, x, grad_out)
    loss, grad_out = loss[-1:].clone(), grad_out[-1:].clone()
    _free()
    last = coarse[-1:].double().requires_grad_()
    want = composition(last, target[-1:], reduction="none", ignore_index=IGNORE, **LOSS_BIG["geometry"])
    (want_grad,) = torch.autograd.grad(want, last, grad_out.double())
    assert_close(loss, want, torch.float32)
    assert_matches(grad[-1:], want_grad, torch.float32, what="grad_coarse")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_upsample_argmax_past_2_31_pixels(backend):
    """uint8 labels of the upsampled logits; on the last image, where a label differs from the float64 reference's
    the two classes tie to float32 rounding."""
    _require_free_gib(12)
    coarse = torch.randn(LOSS_BIG["coarse"], device="cuda", generator=_generator())
    labels = fcn_fast.upsample_argmax(coarse, out_size=LOSS_BIG["out_hw"], dtype=torch.uint8, backend=backend,
                                      **LOSS_BIG["geometry"])
    assert labels.numel() > BIG
    got = labels[-1].long()
    del labels
    logits = upsample_add_reference(coarse[-1:].double(), out_size=LOSS_BIG["out_hw"], **LOSS_BIG["geometry"])[0]
    want = logits.argmax(0)
    differ = got != want
    gap = (logits.gather(0, got[None]) - logits.gather(0, want[None]))[0][differ].abs()
    assert differ.float().mean().item() < 1e-4 and (gap <= 1e-5).all(), f"{int(differ.sum())} labels differ"


# ---- bitwise determinism, streams, devices (a few hundred thousand elements) -------------------------------------

UPSAMPLE_ADD_CASE = Case("gpu", (2, 8, 32, 32), 4, "deconv", out_size=(128, 128), offset=(1, 2), skip_hw=(131, 133),
                         skip_offset=(3, 1), skip_scale=0.5)  # 262k outputs
LOSS_GEOMETRY = dict(factor=8, mode="deconv", offset=(3, 5))  # coarse 12x12: full 104x104, cropped to 96x96
LOSS_SHAPE, LOSS_HW = (2, 21, 12, 12), (96, 96)  # 387k virtual logits


def _case(op: str, dtype: torch.dtype, backend: str, device="cuda"):
    """(fn, inputs): fn(*inputs) runs ``op`` on ``backend`` forward and backward and returns (output, *gradients)."""
    gen = torch.Generator().manual_seed(0)
    if op == "upsample_add":
        x, skip = _inputs(UPSAMPLE_ADD_CASE, dtype, device)
        grad_out = torch.randn(2, 8, 128, 128, generator=gen).to(device, dtype)

        def run_upsample_add(x, skip, grad_out):
            out, grads, _ = _run(backend, x, skip, grad_out, **UPSAMPLE_ADD_CASE.kwargs())
            return (out, *grads)

        return run_upsample_add, (x, skip, grad_out)
    if op == "softmax_cross_entropy":
        logits, target = cross_entropy_case((2, 21, 96, 96), dtype, device)
        weight = (torch.rand(21, generator=gen) + 0.5).to(device)
        def run_cross_entropy(logits, target, weight):  # "mean": backward reads an expanded scalar (strides 0)
            return cross_entropy_run(logits, target, backend, weight=weight, label_smoothing=0.1)

        return run_cross_entropy, (logits, target, weight)
    coarse = (3 * torch.randn(LOSS_SHAPE, generator=gen)).to(device, dtype)
    if op == "upsample_argmax":
        def run_upsample_argmax(coarse):
            return (fcn_fast.upsample_argmax(coarse, out_size=LOSS_HW, backend=backend, **LOSS_GEOMETRY),)

        return run_upsample_argmax, (coarse,)
    target = make_target(LOSS_SHAPE[0], LOSS_HW, LOSS_SHAPE[1], "some", gen).to(device)
    grad_out = torch.rand(LOSS_SHAPE[:1] + LOSS_HW, generator=gen).to(device, dtype)

    def run_upsample_cross_entropy(coarse, target, grad_out):
        x = coarse.detach().requires_grad_()
        loss = fcn_fast.upsample_cross_entropy(x, target, reduction="none", label_smoothing=0.1, backend=backend,
                                               **LOSS_GEOMETRY)
        return (loss, *torch.autograd.grad(loss, x, grad_out))

    return run_upsample_cross_entropy, (coarse, target, grad_out)


@contextlib.contextmanager
def _deterministic_algorithms():
    """torch.use_deterministic_algorithms(True), which also fills fresh memory with NaN (integers: their maximum), so
    an output element a kernel never writes shows."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _written(t: torch.Tensor) -> bool:
    return bool(t.isfinite().all()) if t.is_floating_point() else bool((t != torch.iinfo(t.dtype).max).all())


def _assert_equal(got, want) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device, f"output {i}"
        assert torch.equal(a, b), f"output {i} differs: max |diff| {(a.double() - b.double()).abs().max().item():.3g}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_bitwise_deterministic(op, dtype, backend):
    """Two runs on the same inputs give identical outputs and gradients (gathers, no atomics), under
    torch.use_deterministic_algorithms(True) (which the ops satisfy)."""
    fn, inputs = _case(op, dtype, backend)
    with _deterministic_algorithms():
        first = fn(*inputs)
        second = fn(*inputs)
    assert all(_written(t) for t in first), "an element left unwritten (NaN / the integer fill value)"
    _assert_equal(second, first)


SLEEP_CYCLES = 50_000_000  # ~25 ms of GPU time at 2 GHz


def _on_side_stream(fn, inputs):
    """fn(*inputs) on a side stream, set up so that a kernel launched on any other stream gives a wrong result: the
    default (legacy) stream is kept busy meanwhile, so a kernel wrongly put there runs after the side stream has
    copied fn's outputs; and the inputs are written on the side stream only after a delay, so a kernel on another
    stream reads the zeros they held. Returns those copies."""
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):  # warm-up: compiles, caches tap tables and fills the side stream's memory pool
        fn(*inputs)
    staged = [torch.zeros_like(t) for t in inputs]
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        for dst, src in zip(staged, inputs):
            dst.copy_(src)
        outputs = [t.clone() for t in fn(*staged)]
    torch.cuda.synchronize()
    return outputs


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_runs_on_the_current_stream(op, backend):
    fn, inputs = _case(op, torch.float32, backend)
    want = fn(*inputs)
    _assert_equal(_on_side_stream(fn, inputs), want)


def test_tap_tables_are_per_stream():
    """Each stream gets its own cached tables: an evicted table is freed, and only the stream that allocated it may
    reuse its memory safely while kernels queued on that stream still read it."""
    from fcn_fast.ops._resample import Geometry

    geometry = Geometry("deconv", (7, 9), (40, 52), 8, (3, 5), False)
    device = torch.device("cuda")
    rows, _ = geometry.taps(device, torch.float32)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        side_rows, _ = geometry.taps(device, torch.float32)
    assert side_rows.index.data_ptr() != rows.index.data_ptr()
    assert torch.equal(side_rows.index, rows.index)
    assert geometry.taps(device, torch.float32)[0] is rows


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_runs_on_the_tensors_device(op, backend):
    """cuda:1 tensors while cuda:0 is the current device (Triton launches on the current device unless told)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    fn, inputs = _case(op, torch.float32, backend, device="cuda:1")
    with torch.cuda.device(1):
        want = fn(*inputs)
    with torch.cuda.device(0):
        got = fn(*inputs)
    _assert_equal(got, want)


@pytest.mark.skipif(not HAS_CUDA or not fcn_fast.available_backends()["cuda"].available, reason="needs the CUDA kernels")
def test_cuda_kernels_clamp_malformed_tables():
    """Tap and reader tables that did not come from fcn_fast (a direct torch.ops call) cannot make the CUDA kernels
    read out of bounds: they clamp what they read (the CPU kernels check on the host, which on the GPU would sync)."""
    coarse = torch.randn(1, 3, 4, 5, device="cuda")
    rows = torch.tensor([[0, 1], [-7, 40]] * 4, dtype=torch.int32, device="cuda")  # 8 output rows, 2 out of range
    cols = torch.tensor([[2, 3], [1000, -1]] * 5, dtype=torch.int32, device="cuda")  # 10 output columns
    row_w = torch.full(rows.shape, 0.5, device="cuda")
    col_w = torch.full(cols.shape, 0.5, device="cuda")
    labels = torch.ops.fcn_fast._upsample_argmax(coarse, rows, row_w, cols, col_w, torch.int64)
    assert labels.shape == (1, 8, 10) and bool(((labels >= 0) & (labels < 3)).all())
    readers = torch.tensor([[-5, 100]] * 4, dtype=torch.int32, device="cuda")
    col_readers = torch.tensor([[0, 10_000]] * 5, dtype=torch.int32, device="cuda")
    target = torch.zeros(1, 8, 10, dtype=torch.int64, device="cuda")
    lse = torch.zeros(2, 1, 8, 10, device="cuda")  # the softmax statistics: max and log-sum planes
    grad = torch.ops.fcn_fast._upsample_cross_entropy_bwd(
        torch.ones(1, device="cuda"), coarse, target, None, lse, rows, row_w, readers, cols, col_w, col_readers, 255,
        0.0)
    torch.cuda.synchronize()
    assert grad.shape == coarse.shape and bool(torch.isfinite(grad).all())


# ---- no host synchronisation per call ------------------------------------------------------------------------------

@contextlib.contextmanager
def _syncs_raise():
    """torch.cuda.set_sync_debug_mode("error"): any host synchronisation PyTorch makes (a .item(), a copy from
    pageable memory, torch.tensor(..., device="cuda")) raises instead."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def _training_call(op: str, backend: str):
    """A forward and backward of ``op`` on ``backend`` with the options that take the most host-side paths (class
    weights, label smoothing, "mean", a float64 skip_scale), and check_targets=False: the label check is the one
    documented sync."""
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(LOSS_SHAPE, generator=gen).cuda().requires_grad_()
    target = make_target(LOSS_SHAPE[0], LOSS_HW, LOSS_SHAPE[1], "some", gen).cuda()
    weight = (torch.rand(LOSS_SHAPE[1], generator=gen) + 0.5).cuda()
    loss_options = dict(weight=weight, label_smoothing=0.1, check_targets=False, backend=backend)

    def call():
        if op == "upsample_add":
            skip = torch.randn(2, 21, 100, 101, device="cuda")
            out = fcn_fast.upsample_add(coarse, skip, out_size=LOSS_HW, skip_scale=0.3, backend=backend,
                                        **LOSS_GEOMETRY)
        elif op == "softmax_cross_entropy":
            logits = fcn_fast.upsample_add(coarse, out_size=LOSS_HW, backend=backend, **LOSS_GEOMETRY)
            out = fcn_fast.softmax_cross_entropy(logits, target, **loss_options)
        elif op == "upsample_cross_entropy":
            out = fcn_fast.upsample_cross_entropy(coarse, target, **loss_options, **LOSS_GEOMETRY)
        else:
            return fcn_fast.upsample_argmax(coarse.detach(), out_size=LOSS_HW, backend=backend, **LOSS_GEOMETRY)
        return torch.autograd.grad(out, coarse, torch.ones_like(out))

    return call


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_no_host_sync_per_call(op, backend):
    """Forward and backward of every op make no host synchronisation once the first call has compiled (and for
    Triton, tuned) its kernels and cached the geometry's tap tables: a training step stays asynchronous and CUDA
    graphs can capture it."""
    call = _training_call(op, backend)
    call()
    torch.cuda.synchronize()
    with _syncs_raise():
        call()
    torch.cuda.synchronize()


def test_tap_tables_reach_the_gpu_without_a_sync():
    """The tables of a geometry no call has used yet go up from pinned memory, not with a synchronising copy."""
    from fcn_fast.ops._resample import Geometry

    geometry = Geometry("deconv", (13, 11), (61, 50), 4, (1, 2), False)  # used nowhere else
    with _syncs_raise():
        rows, cols = geometry.taps(torch.device("cuda"), torch.float32)
    host_rows, host_cols = geometry.taps(torch.device("cpu"), torch.float32)
    for device_table, host_table in ((rows, host_rows), (cols, host_cols)):
        for name in ("index", "weight", "readers"):
            assert torch.equal(getattr(device_table, name).cpu(), getattr(host_table, name))

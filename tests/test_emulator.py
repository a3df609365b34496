"""The emulated CUDA execution model (backend cuda_emulated, docs/emulator.md): the emulator itself (thread order,
races, barriers), its knobs on every op (a grid so small that every grid-stride loop wraps; the int64 index path),
the kernels' argument checks through direct torch.ops calls, the clamps that keep malformed tap tables in bounds, and
the AddressSanitizer/UBSan run. The op test matrix itself runs on cuda_emulated through harness.backend_params()."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

import fcn_fast
from fcn_fast import _emulator, _extension
from fcn_fast.ops._resample import Geometry
from harness import assert_close

ROOT = Path(__file__).resolve().parents[1]
THREADS = 256  # cuda_launch.h's kThreadsPerBlock
EMULATED = pytest.mark.skipif(not _extension.emulated_built(), reason="fcn_fast._C_emu is not built "
                              "(FCN_FAST_BUILD_EMULATED=1)")
NATIVE_CPU = _extension.load_error() is None


def test_emulated_extension_loads_when_built():
    """A build that exists but does not load is a failure, not a skip."""
    error = _extension.emulated_load_error()
    if _extension.emulated_built():
        assert error is None
        assert fcn_fast.available_backends()["cuda_emulated"].available
    else:
        assert "FCN_FAST_BUILD_EMULATED=1" in error


def test_emulated_backend_is_never_chosen_automatically(monkeypatch):
    monkeypatch.delenv("FCN_FAST_BACKEND", raising=False)
    from fcn_fast._backends import resolve_backend

    assert resolve_backend(None, torch.device("cpu"), "op") != "cuda_emulated"


# ---- the emulator itself --------------------------------------------------------------------------------------------

@EMULATED
def test_threads_run_in_schedule_order_between_barriers():
    ops = _emulator.ops()
    with _emulator.options(schedule="forward"):
        assert ops._emulator_test_order(2, False).tolist() == list(range(2 * THREADS))
        # Every thread of a block reaches the barrier before any goes on.
        block = [list(range(b * THREADS, (b + 1) * THREADS)) for b in range(2)]
        assert ops._emulator_test_order(2, True).tolist() == block[0] * 2 + block[1] * 2
    with _emulator.options(schedule="reverse"):
        reverse = [list(reversed(b)) for b in block]
        assert ops._emulator_test_order(2, True).tolist() == reverse[1] * 2 + reverse[0] * 2


@EMULATED
def test_a_race_shows_as_different_bits_under_the_two_schedules():
    """Thread 0 publishes a value in shared memory that every thread reads: correct with the barrier between, a
    read-after-write race without it, which the backend's check of both schedules reports."""
    publish = _emulator.checked(_emulator.ops()._emulator_test_publish)
    expected = torch.arange(1, 4, dtype=torch.float32).repeat_interleave(THREADS)
    assert torch.equal(publish(3, True), expected)
    with pytest.raises(RuntimeError, match="different bits under the 'forward' and 'reverse' thread schedules"):
        publish(3, False)


@EMULATED
@pytest.mark.parametrize("kind, message", [("divergent", r"divergent __syncthreads.*128 threads wait"),
                                           ("mismatched", "wait at different barriers")])
def test_a_barrier_in_divergent_code_is_an_error(kind, message):
    with pytest.raises(RuntimeError, match=message):
        _emulator.ops()._emulator_test_barrier(kind)
    # The emulator is usable again afterwards.
    assert _emulator.ops()._emulator_test_order(1, True).numel() == 2 * THREADS


@EMULATED
def test_options_are_checked_and_restored():
    before = _emulator.ops()._emulator_get_options()
    with _emulator.options(schedule="reverse", max_blocks=3, int64_indices=True):
        assert tuple(_emulator.ops()._emulator_get_options()) == ("reverse", 3, True)
    assert _emulator.ops()._emulator_get_options() == before
    with pytest.raises(RuntimeError, match="schedule must be"):
        _emulator.ops()._emulator_options("sideways", 0, False)
    with pytest.raises(RuntimeError, match="max_blocks must be >= 0"):
        _emulator.ops()._emulator_options("forward", -1, False)


def test_schedules_come_from_the_environment(monkeypatch):
    assert _emulator.schedules() == ("forward", "reverse")
    monkeypatch.setenv("FCN_FAST_EMU_SCHEDULES", "reverse")
    assert _emulator.schedules() == ("reverse",)
    monkeypatch.setenv("FCN_FAST_EMU_SCHEDULES", "forward,zigzag")
    with pytest.raises(ValueError, match="FCN_FAST_EMU_SCHEDULES"):
        _emulator.schedules()


# ---- the knobs on every op ------------------------------------------------------------------------------------------
# Shapes with more work items than 2 blocks of 256 threads, so that a grid capped at 1 or 2 blocks loops.

def _every_op(backend):
    """Every fused op forward and backward (every native kernel): {name: result}. The reduced losses ("sum")
    exercise the per-block partial sums of the upsample-CE forward; "none" its per-pixel path."""
    gen = torch.Generator().manual_seed(0)
    results = {}
    x = torch.randn(1, 2, 6, 7, generator=gen).requires_grad_()
    skip = torch.randn(1, 2, 31, 35, generator=gen).requires_grad_()
    out = fcn_fast.upsample_add(x, skip, factor=4, mode="deconv", skip_offset=(1, 2), skip_scale=0.5, backend=backend)
    results["upsample_add"] = out
    results["upsample_add grad_x"], results["upsample_add grad_skip"] = torch.autograd.grad(
        out, (x, skip), torch.randn(out.shape, generator=gen))
    for layout in ("nchw", "channels_last"):
        logits = torch.randn(2, 5, 17, 19, generator=gen)
        if layout == "channels_last":
            logits = logits.to(memory_format=torch.channels_last)
        logits.requires_grad_()
        target = torch.randint(0, 5, (2, 17, 19), generator=gen)
        target[0, :3] = 255
        loss = fcn_fast.softmax_cross_entropy(logits, target, weight=torch.rand(5, generator=gen) + 0.5,
                                              label_smoothing=0.1, reduction="none", backend=backend)
        results[f"softmax_cross_entropy {layout}"] = loss
        (results[f"softmax_cross_entropy {layout} grad"],) = torch.autograd.grad(
            loss, logits, torch.randn(loss.shape, generator=gen))
    coarse = torch.randn(2, 4, 6, 7, generator=gen).requires_grad_()
    target = torch.randint(0, 4, (2, 22, 26), generator=gen)
    for reduction in ("none", "sum"):
        loss = fcn_fast.upsample_cross_entropy(coarse, target, factor=4, offset=(2, 3), reduction=reduction,
                                               label_smoothing=0.05, backend=backend)
        results[f"upsample_cross_entropy {reduction}"] = loss
        (results[f"upsample_cross_entropy {reduction} grad"],) = torch.autograd.grad(
            loss, coarse, torch.randn(loss.shape, generator=gen))
    for dtype in (torch.int64, torch.uint8):
        results[f"upsample_argmax {dtype}"] = fcn_fast.upsample_argmax(coarse.detach(), factor=4, offset=(2, 3),
                                                                       out_size=(22, 26), dtype=dtype, backend=backend)
    return results


@EMULATED
@pytest.mark.parametrize("knobs", [dict(max_blocks=1), dict(max_blocks=2), dict(int64_indices=True),
                                   dict(max_blocks=1, int64_indices=True)],
                         ids=["grid1", "grid2", "int64", "grid1-int64"])
def test_knobs_force_the_paths_of_huge_inputs_on_every_op(knobs):
    """A grid capped at 1 or 2 blocks makes every grid-stride loop wrap; int64_indices takes the path only tensors of
    2^31 elements take on a GPU. Both must give the default launch's bits (the reduced losses, whose partial sums
    are one per block, the same value within rounding) and the cpu backend's values."""
    default = _every_op("cuda_emulated")
    before = _emulator.stats()
    with _emulator.options(**knobs):
        knobbed = _every_op("cuda_emulated")
    after = _emulator.stats()
    launches = after["launches"] - before["launches"]
    # upsample_add: 1 forward + 2 backward kernels (one index-width choice for both); CE: 2 layouts x 2; upsample CE:
    # 2 reductions x (1 forward + the backward's column and row passes, one index-width choice for both); argmax:
    # 2 dtypes; each under both schedules.
    assert launches == 2 * 15
    if "max_blocks" in knobs:
        assert after["blocks"] - before["blocks"] <= knobs["max_blocks"] * launches
    choices = {width: after[f"{width}_choices"] - before[f"{width}_choices"] for width in ("int32", "int64")}
    assert choices == ({"int32": 0, "int64": 2 * 12} if knobs.get("int64_indices") else {"int32": 2 * 12, "int64": 0})
    reference = _every_op("cpu" if NATIVE_CPU else "reference")
    for name, value in knobbed.items():
        if name == "upsample_cross_entropy sum" and "max_blocks" in knobs:
            assert_close(value, default[name], rtol=1e-6, atol=0)
        else:
            assert torch.equal(value, default[name]), name
        assert_close(value, reference[name], dtype=torch.float32)


@EMULATED
def test_default_launches_use_int32_indices_and_enough_blocks():
    before = _emulator.stats()
    _every_op("cuda_emulated")
    after = _emulator.stats()
    assert after["int64_choices"] == before["int64_choices"]
    assert after["blocks"] - before["blocks"] > after["launches"] - before["launches"]  # multi-block grids


# ---- direct calls: the kernels' argument checks, and the clamps of the CUDA kernels ---------------------------------

NAMESPACES = [
    pytest.param("fcn_fast", marks=pytest.mark.skipif(not NATIVE_CPU, reason="fcn_fast._C is not built"), id="cpu"),
    pytest.param("fcn_fast_emu", marks=EMULATED, id="cuda_emulated"),
]


def _taps(in_hw, out_hw, factor=2, mode="deconv", offset=(0, 0), dtype=torch.float32):
    return Geometry(mode, in_hw, out_hw, factor, offset, False).taps(torch.device("cpu"), dtype)


def _bad_calls(ops):
    """(call, message) pairs: every native kernel op with one argument wrong."""
    rows, cols = _taps((4, 5), (8, 9))
    r64, c64 = _taps((4, 5), (8, 9), dtype=torch.float64)
    x = torch.randn(1, 2, 4, 5)
    grad = torch.randn(1, 2, 8, 9)
    tables = (rows.index, rows.weight, cols.index, cols.weight)
    readers = (rows.index, rows.weight, rows.readers, cols.index, cols.weight, cols.readers)
    logits, target = torch.randn(2, 3, 6), torch.randint(0, 3, (2, 6))
    grad_loss, stats = torch.zeros(2, 6), torch.zeros(2, 2, 6)
    coarse, full_target = torch.randn(1, 3, 4, 5), torch.randint(0, 3, (1, 8, 9))
    return [
        (lambda: ops._upsample_add_fwd(x[0], None, *tables, 0, 0, 1.0), "x must be 4D"),
        (lambda: ops._upsample_add_fwd(x, None, rows.index.long(), *tables[1:], 0, 0, 1.0), "row_index must be"),
        (lambda: ops._upsample_add_fwd(x, None, r64.index, r64.weight, c64.index, c64.weight, 0, 0, 1.0),
         "tap weights must be"),
        (lambda: ops._upsample_add_fwd(x, torch.randn(1, 3, 8, 9), *tables, 0, 0, 1.0), "skip must be"),
        (lambda: ops._upsample_add_fwd(x, torch.randn(1, 2, 8, 9), *tables, 1, 0, 1.0), "is too small for"),
        (lambda: ops._upsample_add_bwd(grad[0], *readers, 4, 5, 0, 0, 0, 0, 1.0, True, False), "grad_out must be 4D"),
        (lambda: ops._upsample_add_bwd(grad[:, :, :7], *readers, 4, 5, 0, 0, 0, 0, 1.0, True, False), "tap tables of"),
        (lambda: ops._upsample_add_bwd(grad, *readers, 3, 5, 0, 0, 0, 0, 1.0, True, False), "row_readers must be"),
        (lambda: ops._upsample_add_bwd(grad, *readers, 0, 5, 0, 0, 0, 0, 1.0, True, False), "in_h and in_w must be"),
        (lambda: ops._upsample_add_bwd(grad, *readers, 4, 5, 7, 9, 0, 0, 1.0, False, True), "is too small for"),
        (lambda: ops._softmax_cross_entropy_fwd(logits[0], target, None, 255, 0.0, True), "logits must be"),
        (lambda: ops._softmax_cross_entropy_fwd(logits, target[:, :5], None, 255, 0.0, True), "target must be"),
        (lambda: ops._softmax_cross_entropy_fwd(logits, target.float(), None, 255, 0.0, True), "integer"),
        (lambda: ops._softmax_cross_entropy_fwd(logits, target, torch.ones(4), 255, 0.0, True), "weight must be"),
        (lambda: ops._softmax_cross_entropy_bwd(grad_loss, logits, target, stats[:, :, :5], None, 255, 0.0),
         "lse must be"),
        (lambda: ops._softmax_cross_entropy_bwd(grad_loss.double(), logits, target, stats, None, 255, 0.0),
         "grad_loss must be"),
        (lambda: ops._upsample_cross_entropy_fwd(coarse.transpose(2, 3), full_target, None, *tables, 255, 0.0, True),
         "coarse must be a contiguous"),
        (lambda: ops._upsample_cross_entropy_fwd(coarse, full_target[:, :7], None, *tables, 255, 0.0, True),
         "target must be"),
        (lambda: ops._upsample_cross_entropy_fwd(coarse, full_target, torch.ones(2), *tables, 255, 0.0, True),
         "weight must be"),
        (lambda: ops._upsample_cross_entropy_bwd(torch.ones(2), coarse, full_target, None, stats, *readers, 255, 0.0),
         "lse must be"),
        (lambda: ops._upsample_cross_entropy_bwd(torch.ones(1, 8, 8), coarse, full_target, None,
                                                 torch.zeros(2, 1, 8, 9), *readers, 255, 0.0), "grad_pixel must be"),
        (lambda: ops._upsample_argmax(torch.randn(1, 300, 4, 5), *tables, torch.uint8), "dtype must be int64, or uint8"),
        (lambda: ops._upsample_argmax(coarse, r64.index, r64.weight, c64.index, c64.weight, torch.int64),
         "tap weights must be"),
    ]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_direct_calls_with_bad_arguments_raise(namespace):
    """The native ops check their arguments (the Python front end raises first for users; these guard direct
    torch.ops calls): the same checks on the cpu and the emulated CUDA kernels, which share them."""
    if namespace == "fcn_fast_emu":
        _emulator.ops()
    ops = getattr(torch.ops, namespace)
    for call, message in _bad_calls(ops):
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_malformed_tables_are_refused_on_the_cpu_and_clamped_by_the_cuda_kernels(namespace):
    """Tap and readers tables that did not come from fcn_fast: the cpu kernels check their entries on the host; the
    CUDA kernels clamp every entry they read (a host check of device tables would sync), which must give exactly the
    result of the clamped tables, never a read out of bounds (tools/sanitize.sh runs this under AddressSanitizer)."""
    if namespace == "fcn_fast_emu":
        _emulator.ops()
    ops = getattr(torch.ops, namespace)
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 3, 4, 5, generator=gen)
    target = torch.randint(0, 3, (1, 8, 10), generator=gen)
    rows, cols = _taps((4, 5), (8, 10))
    bad_rows = rows.index.clone()
    bad_rows[0, 0], bad_rows[-1, 1] = -7, 100
    bad_cols = cols.index.clone()
    bad_cols[3, 1] = 5
    wide = (torch.tensor([[-5, 100]] * 4, dtype=torch.int32), torch.tensor([[0, 10_000]] * 5, dtype=torch.int32))
    bad = (bad_rows, rows.weight, bad_cols, cols.weight)
    clamped = (bad_rows.clamp(0, 3), rows.weight, bad_cols.clamp(0, 4), cols.weight)
    readers = (rows.index, rows.weight, wide[0], cols.index, cols.weight, wide[1])
    good_readers = (rows.index, rows.weight, rows.readers, cols.index, cols.weight, cols.readers)
    grad_pixel = torch.rand(1, 8, 10, generator=gen)
    grad_out = torch.randn(1, 3, 8, 10, generator=gen)
    calls = [
        (lambda t: ops._upsample_argmax(coarse, *t, torch.int64), bad, clamped),
        (lambda t: ops._upsample_cross_entropy_fwd(coarse, target, None, *t, 255, 0.0, True), bad, clamped),
        (lambda t: ops._upsample_add_fwd(coarse, None, *t, 0, 0, 1.0), bad, clamped),
        # Readers ranges only bound the gather: the clamped [0, out) range gives the exact gradient.
        (lambda t: ops._upsample_add_bwd(grad_out, *t, 4, 5, 0, 0, 0, 0, 1.0, True, False), readers, good_readers),
    ]
    if namespace == "fcn_fast":
        for call, malformed, _ in calls:
            with pytest.raises(RuntimeError, match="out of range|outside|_readers"):
                call(malformed)
        return
    for call, malformed, fixed in calls:
        assert torch.equal(_emulator.checked(call)(malformed)[0], call(fixed)[0])
    _, _, lse = ops._upsample_cross_entropy_fwd(coarse, target, None, rows.index, rows.weight, cols.index, cols.weight,
                                                255, 0.0, True)
    bwd = lambda t: ops._upsample_cross_entropy_bwd(grad_pixel, coarse, target, None, lse, *t, 255, 0.0)  # noqa: E731
    assert_close(_emulator.checked(bwd)(readers), bwd(good_readers), rtol=1e-6, atol=1e-7)


# ---- sanitizers -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cpu_and_emulated_kernels_are_clean_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """tools/sanitize.sh: builds the cpu and the emulated CUDA kernels with -fsanitize=address,undefined into a
    scratch copy and runs their op tests there; any report fails the run. ~15 minutes on 2 cores."""
    result = subprocess.run(["bash", str(ROOT / "tools" / "sanitize.sh"), str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "MAX_JOBS": "2"})
    tail = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, tail
    assert "ERROR: AddressSanitizer" not in tail and "runtime error:" not in tail, tail

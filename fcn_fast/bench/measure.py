"""How the suite measures: time (CUDA events on the GPU, torch.utils.benchmark on the CPU), peak memory, the
device's copy bandwidth, and the correctness gate every provider passes before it is timed."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

# Relative error ||out - gold|| / ||gold|| allowed against the float64 eager result; for labels, the fraction of
# pixels allowed to differ (near-ties flip when logits are rounded to 8 or 11 bits).
REL_TOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}
LABEL_TOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


@contextlib.contextmanager
def float32_as_float32() -> Iterator[None]:
    """TF32 off for cuDNN and matmuls inside the block (restored after). cuDNN's TF32 is on by default, so a float32
    F.conv_transpose2d on a GPU (eager's deconvolution, the references) rounds its inputs to 10-bit mantissas: about
    1e-3 relative error, over the 1e-4 that float32 results are compared with."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(times_s: Sequence[float]) -> Dict[str, float]:
    """Median, 20th/80th percentiles and IQR of per-call times, in milliseconds."""
    ms = sorted(t * 1e3 for t in times_s)
    if len(ms) == 1:
        return {"median_ms": ms[0], "p20_ms": ms[0], "p80_ms": ms[0], "iqr_ms": 0.0, "runs": 1}
    q = statistics.quantiles(ms, n=20, method="inclusive")  # q[k] is the (k+1)*5th percentile
    return {"median_ms": statistics.median(ms), "p20_ms": q[3], "p80_ms": q[15], "iqr_ms": q[14] - q[4],
            "runs": len(ms)}


def time_cuda(fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0) -> Dict[str, float]:
    """triton.testing.do_bench's method: estimate the call's time, warm up for warmup_ms, then time each of about
    rep_ms worth of calls between CUDA events, clearing the L2 cache before each so no call reads the last one's
    data from cache."""
    cache = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    n = max(5, int(rep_ms / estimate_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return quantiles([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])


def time_cpu(fn: Callable[[], object], min_run_time: float = 1.0, min_runs: int = 5) -> Dict[str, float]:
    """torch.utils.benchmark on all of torch's threads (its Timer defaults to one), repeated until both min_runs
    runs and min_run_time seconds are done; each run averages enough calls to last about min_run_time / min_runs."""
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    t0 = time.perf_counter()
    fn()
    estimate = max(time.perf_counter() - t0, 1e-6)
    number = max(1, int(min_run_time / min_runs / estimate))
    times: List[float] = []
    spent = 0.0
    while len(times) < min_runs or spent < min_run_time:
        m = timer.timeit(number)
        times.append(m.median)
        spent += m.median * number
    return quantiles(times)


def time_fn(fn: Callable[[], object], device: torch.device, quick: bool) -> Dict[str, float]:
    if device.type == "cuda":
        return time_cuda(fn, rep_ms=40.0 if quick else 100.0)
    return time_cpu(fn, min_run_time=0.1 if quick else 1.0, min_runs=3 if quick else 5)


def _cpu_allocation_peak(fn: Callable[[], object]) -> int:
    """Peak of the bytes allocated minus freed through torch's CPU allocator while fn runs, from the profiler's
    allocation events (each carries its signed size; their running sum is what the call holds at that moment)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = []

    def walk(nodes):
        for e in nodes:
            if e.tag == torch._C._profiler._EventType.Allocation and e.extra_fields.device.type == "cpu":
                events.append((e.start_time_ns, e.extra_fields.alloc_size))
            walk(e.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    held = peak = 0
    for _, size in sorted(events):
        held += size
        peak = max(peak, held)
    return peak


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes the call allocates at its peak, above what was allocated before it (inputs, saved activations of a
    backward-only call): torch.cuda.max_memory_allocated on the GPU, the profiler's allocation events on the CPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - base
    return _cpu_allocation_peak(fn)


def copy_bandwidth(device: torch.device, quick: bool) -> Dict[str, float]:
    """GB/s of a large device copy (bytes read + bytes written), the ceiling a memory-bound op can reach here."""
    nbytes = (64 if quick else 256) * 2**20 if device.type == "cpu" else 2 * 2**30
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, quick)
    return {"bytes": 2 * nbytes, "median_ms": t["median_ms"], "gbps": 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9}


# ---- correctness ----------------------------------------------------------------------------------------------------

def _relative_error(out: torch.Tensor, gold: torch.Tensor) -> float:
    out, gold = out.double(), gold.double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")  # NaN never passes
    denom = gold.norm().item()
    return (out - gold).norm().item() / (denom if denom > 0 else 1.0)


def compare(outs: Sequence[Optional[torch.Tensor]], golds: Sequence[Optional[torch.Tensor]], dtype: str,
            labels: bool) -> Dict[str, object]:
    """Worst error over the outputs and gradients of a provider against the float64 eager result, and the verdict."""
    if len(outs) != len(golds):
        return {"ok": False, "error": f"{len(outs)} outputs and gradients, the reference has {len(golds)}"}
    worst = 0.0
    for out, gold in zip(outs, golds):
        if gold is None:
            continue
        if out is None or tuple(out.shape) != tuple(gold.shape):
            return {"ok": False, "error": f"shape {None if out is None else tuple(out.shape)} != {tuple(gold.shape)}"}
        if labels:
            err = (out.cpu() != gold.cpu()).double().mean().item()
        else:
            err = _relative_error(out, gold)
        worst = max(worst, err)
    tol = (LABEL_TOL if labels else REL_TOL)[dtype]
    return {"ok": worst <= tol, "error": worst, "tol": tol, "metric": "label mismatch fraction" if labels else
            "relative L2 error"}

"""The suite's loop: per (op, shape, dtype) group, make the inputs once, build and check every provider, then time
each mode across the providers back to back, in one process."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fcn_fast.bench import measure
from fcn_fast.bench.cases import DTYPES, Case, OpBench, OPS, Provider


# "max-autotune where it finishes in reasonable time": after one compile this slow, the mode is dropped for the run.
MAX_AUTOTUNE_COMPILE_S = 90.0


def _kind(mode: str) -> str:
    return "infer" if mode == "inference" else "train"


def provider_names(op: OpBench, device: torch.device, backends: Sequence[str], compile_modes: Sequence[str]) -> List[str]:
    names = [f"fcn_fast:{b}" for b in backends] + ["eager"]
    if device.type == "cuda" or op.compile_on_cpu:
        names += ["compile" if m == "default" else f"compile-{m}" for m in compile_modes]
    return names


def _build(op: OpBench, case: Case, name: str, device, dtype, eager: Provider) -> Provider:
    if name == "eager":
        return eager
    if name.startswith("fcn_fast:"):
        return op.fused(case.shape, device, dtype, name.split(":", 1)[1])
    # dynamic=False: one static graph per shape, as a user compiling a fixed-size net gets.
    mode = None if name == "compile" else name[len("compile-"):]

    def retained(inp):  # its own code object, so dynamo caches its graph apart from eager.fn's
        return eager.fn(inp)

    return Provider(name, torch.compile(eager.fn, dynamic=False, mode=mode),
                    infer_fn=torch.compile(eager.infer_fn, dynamic=False, mode=mode) if eager.infer_fn else None,
                    params=eager.params, backward_fn=torch.compile(retained, dynamic=False, mode=mode))


def _without_donated_buffers():
    """AOTAutograd's donated buffers (torch >= 2.6) forbid retain_graph, which the backward-only mode needs to
    call backward repeatedly on one graph; the graph timed in that mode is compiled without them."""
    config = torch._functorch.config
    return config.patch(donated_buffer=False) if hasattr(config, "donated_buffer") else contextlib.nullcontext()


def _differentiable(op: OpBench, inputs: dict, provider: Provider) -> List[torch.Tensor]:
    return [inputs[k] for k in op.grad_keys if k in inputs] + list(provider.params)


def _mode_callable(op: OpBench, provider: Provider, mode: str, inputs: dict, frozen: dict) -> Callable[[], object]:
    """The call timed for a mode. forward: the output with its autograd graph; backward: the gradients of an output
    made once outside the timing (retain_graph keeps it); full: both; inference: no_grad on inputs without grad."""
    if mode == "inference":
        fn = provider.infer_fn or provider.fn

        def infer():
            with torch.no_grad():
                return fn(frozen)

        return infer
    wrt = _differentiable(op, inputs, provider)
    if mode == "forward":
        return lambda: provider.fn(inputs)
    if mode == "backward":
        with _without_donated_buffers():
            out = (provider.backward_fn or provider.fn)(inputs)
    else:
        out = provider.fn(inputs)
    # A fixed random upstream gradient: ones would let a kernel skip the multiply; scalar losses get 1.
    grad = torch.randn_like(out) if out.numel() > 1 else torch.ones_like(out)
    if mode == "backward":
        return lambda: torch.autograd.grad(out, wrt, grad, retain_graph=True)
    return lambda: torch.autograd.grad(provider.fn(inputs), wrt, grad)


def _outputs(op: OpBench, provider: Provider, kind: str, inputs: dict, frozen: dict, seed: int) -> List[torch.Tensor]:
    """The provider's output, and for training its gradients under a fixed upstream gradient (drawn from seed)."""
    if kind == "infer":
        with torch.no_grad():
            return [(provider.infer_fn or provider.fn)(frozen)]
    out = provider.fn(inputs)
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(out.shape, generator=gen).to(out) if out.numel() > 1 else torch.ones_like(out)
    grads = torch.autograd.grad(out, _differentiable(op, inputs, provider), grad, allow_unused=True)
    return [out.detach()] + list(grads)


def _float64(inputs: dict) -> dict:
    return {k: (v.detach().double().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
            for k, v in inputs.items()}


class Suite:
    def __init__(self, device: torch.device, quick: bool, backends: Sequence[str], compile_modes: Sequence[str],
                 providers: Optional[Sequence[str]] = None, time_budget: Optional[float] = None,
                 log: Callable[[str], None] = print):
        self.device, self.quick, self.backends = device, quick, list(backends)
        self.compile_modes, self.only = list(compile_modes), (list(providers) if providers else None)
        self.deadline = time.monotonic() + time_budget if time_budget else None
        self.log = log
        self.rows: List[dict] = []
        self.dropped: Dict[str, str] = {}  # provider -> why it no longer runs in this run


    def _row(self, case: Case, mode: str, provider: str, **fields) -> dict:
        s = case.shape
        row = {"op": case.op, "case": s.label, "shape": s.params(), "dtype": case.dtype, "mode": mode,
               "provider": provider, "note": s.note, **fields}
        self.rows.append(row)
        return row

    def run_group(self, case: Case) -> None:
        op, device = OPS[case.op], self.device
        names = [n for n in provider_names(op, device, self.backends, self.compile_modes)
                 if self.only is None or n in self.only or n == "eager"]
        for name in [n for n in names if n in self.dropped]:
            names.remove(name)
            for mode in case.modes:
                self._row(case, mode, name, status="skipped", reason=self.dropped[name])
        why_not = op.available() or (
            "time budget spent" if self.deadline and time.monotonic() > self.deadline else None)
        if why_not:
            self.log(f"  skipped: {why_not}")
            for mode in case.modes:
                for name in names:
                    self._row(case, mode, name, status="skipped", reason=why_not)
            return
        torch._dynamo.reset()  # a fresh compile cache per group: no recompile limit, no dynamic-shape fallback
        dtype = DTYPES[case.dtype]
        if op.model:
            dtype = torch.float32
        gen = torch.Generator().manual_seed(1234)
        inputs = op.inputs(case.shape, dtype, device, gen)
        for k in op.grad_keys:
            if k in inputs:
                inputs[k].requires_grad_(True)
        frozen = {k: v.detach() for k, v in inputs.items()}
        kinds = sorted({_kind(m) for m in case.modes})
        eager = op.eager(case.shape, device, dtype)
        golds = self._golds(op, case, eager, kinds, inputs, frozen)
        ready: Dict[str, Provider] = {}
        checks: Dict[str, dict] = {}
        for name in names:
            t0 = time.perf_counter()
            try:
                provider = _build(op, case, name, device, dtype, eager)
                verdicts = [measure.compare(_outputs(op, provider, kind, inputs, frozen, seed=7), golds[kind],
                                            case.dtype, labels=kind == "infer" and (op.model or case.op == "upsample_argmax"))
                            for kind in kinds]
                measure.synchronize(device)
                check = max(verdicts, key=lambda v: (not v["ok"], v.get("error") if isinstance(v.get("error"), float) else 0))
                if name.startswith("compile"):
                    provider.compile_s = time.perf_counter() - t0  # first calls: tracing + compiling dominate
                    if name != "compile" and provider.compile_s > MAX_AUTOTUNE_COMPILE_S:
                        self.dropped[name] = (f"compiling took {provider.compile_s:.0f} s on {case.op} "
                                              f"{case.shape.label} {case.dtype}: not run after that")
                checks[name] = check
                if check["ok"]:
                    ready[name] = provider
                else:
                    self.log(f"  {name}: FAILED correctness check: {check}")
            except Exception as exc:  # a provider that cannot run this case is reported, not fatal
                checks[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
                self.log(f"  {name}: error: {checks[name]['error']}")
        for mode in case.modes:
            nbytes = op.bytes(case.shape, case.dtype, mode)
            for name in names:
                if name not in ready:
                    self._row(case, mode, name, status="failed", reason=str(checks[name].get("error")),
                              check=checks[name])
                    continue
                provider = ready[name]
                try:
                    fn = _mode_callable(op, provider, mode, inputs, frozen)
                    timing = measure.time_fn(fn, device, self.quick)
                    peak = measure.peak_memory(fn, device)
                except Exception as exc:
                    self._row(case, mode, name, status="failed", reason=f"{type(exc).__name__}: {exc}"[:300])
                    self.log(f"  {mode:9s} {name:24s} failed: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                del fn
                seconds = timing["median_ms"] * 1e-3
                row = self._row(case, mode, name, status="ok", **timing, peak_bytes=peak, check=checks[name],
                                bytes=nbytes, bytes_formula=op.bytes_formula.get(mode),
                                gbps=(nbytes / seconds / 1e9) if nbytes else None,
                                images_per_s=(case.shape.n / seconds) if op.model else None,
                                compile_s=provider.compile_s)
                self.log(f"  {mode:9s} {name:24s} {timing['median_ms']:10.3f} ms  "
                         f"[{timing['p20_ms']:.3f}-{timing['p80_ms']:.3f}]  peak {peak / 2**20:8.1f} MiB"
                         + (f"  {row['gbps']:7.2f} GB/s" if row["gbps"] else ""))
        del ready, golds, inputs, frozen
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def _golds(self, op: OpBench, case: Case, eager: Provider, kinds, inputs, frozen) -> Dict[str, list]:
        """The eager composition in float64 (the model: in float32, its training precision) on the same inputs."""
        if op.model:
            return {kind: [t.detach() for t in _outputs(op, eager, kind, inputs, frozen, seed=7)] for kind in kinds}
        gold_inputs = _float64(inputs)
        gold = op.eager(case.shape, self.device, torch.float64)
        return {kind: [None if t is None else t.detach() for t in
                       _outputs(op, gold, kind, gold_inputs, _float64(frozen), seed=7)] for kind in kinds}

    def run(self, cases: Sequence[Case], after_group: Optional[Callable[[List[dict]], None]] = None) -> List[dict]:
        """All cases; ``after_group(rows)`` after each group (the CLI saves partial results there, so that a run
        killed at its time limit keeps what it measured)."""
        for i, case in enumerate(cases):
            self.log(f"[{i + 1}/{len(cases)}] {case.op} | {case.shape.label} | {case.dtype} | {', '.join(case.modes)}"
                     + (f" | {case.shape.note}" if case.shape.note else ""))
            self.run_group(case)
            add_speedups(self.rows)
            if after_group:
                after_group(self.rows)
        return self.rows


def add_speedups(rows: List[dict]) -> None:
    """speedup_vs_eager / speedup_vs_compile: the eager (compile) median over this row's, within one case and mode."""
    by_key: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        if r.get("status") == "ok":
            by_key.setdefault((r["op"], r["case"], r["dtype"], r["mode"]), {})[r["provider"]] = r
    for group in by_key.values():
        for r in group.values():
            for base, key in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
                r[key] = group[base]["median_ms"] / r["median_ms"] if base in group else None

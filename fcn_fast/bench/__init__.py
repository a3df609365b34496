"""fcn_fast's benchmark suite: every op and backend against eager PyTorch and torch.compile.

    fcn-fast bench [--ops OP,...] [--quick] [--device cpu|cuda] ...      (same as: python -m benchmarks ...)
    fcn-fast bench compare A.json B.json [-o OUT.md]
    fcn-fast bench report RESULTS.json                                    (rewrites its markdown and PNGs)
    fcn-fast bench list [--quick] [--device ...]                          (the cases a run would measure)

A run writes <out>/<stem>.json (rows + environment), <stem>.md (tables) and <stem>_<op>.png (speed-up charts).
See the README, "Benchmarks", for what is measured and how.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

SUBCOMMANDS = ("run", "compare", "report", "list")


def _csv(text: Optional[str]) -> Optional[List[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _run_parser(prog: str) -> argparse.ArgumentParser:
    from fcn_fast.bench.cases import DTYPES, MODES, OPS

    p = argparse.ArgumentParser(prog=prog, description="Benchmark fcn_fast's ops against eager PyTorch and "
                                "torch.compile (README, Benchmarks).")
    p.add_argument("--ops", help=f"comma-separated subset of: {', '.join(OPS)}")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, fp32, forward and forward+backward, no torch.compile: a smoke run (<1 min on CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--dtypes", help=f"comma-separated subset of: {', '.join(DTYPES)}")
    p.add_argument("--modes", help=f"comma-separated subset of: {', '.join(MODES)} (full = forward+backward)")
    p.add_argument("--providers", help="only these providers (eager always runs: it is the baseline), e.g. "
                   "fcn_fast:cpu,compile")
    p.add_argument("--cases", help="only cases whose label contains this text, e.g. caffe500")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="include torch.compile providers (default: on, off with --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--max-autotune", dest="max_autotune", action="store_true", default=None,
                   help="also torch.compile(mode='max-autotune') (default: on for cuda without --quick)")
    p.add_argument("--no-max-autotune", dest="max_autotune", action="store_false")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the CPU run")
    p.add_argument("--time-budget", type=float, help="seconds; cases not started by then are recorded as skipped")
    p.add_argument("--out", default="benchmarks/results", help="folder for the results (default: %(default)s)")
    p.add_argument("--name", help="file stem (default: <device>_<name>[_<threads>t][_quick])")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG charts")
    return p


def run(argv: Sequence[str], prog: str = "fcn-fast bench") -> Path:
    args = _run_parser(prog).parse_args(argv)
    import torch

    from fcn_fast._backends import usable_backends
    from fcn_fast.bench import measure, report
    from fcn_fast.bench.cases import build_cases
    from fcn_fast.bench.suite import Suite

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    # The Triton interpreter runs on the CPU for tests; it is orders of magnitude too slow to time.
    backends = [b for b in usable_backends(device) if b != "reference" and not (b == "triton" and device.type == "cpu")]
    use_compile = (not args.quick) if args.compile is None else args.compile
    autotune = (device.type == "cuda" and not args.quick) if args.max_autotune is None else args.max_autotune
    compile_modes = (["default"] + (["max-autotune"] if autotune else [])) if use_compile else []
    cases = build_cases(device.type, args.quick, _csv(args.ops), _csv(args.dtypes), _csv(args.modes), args.cases)
    print(f"fcn_fast bench: {len(cases)} case groups on {device} ({torch.get_num_threads()} threads); "
          f"backends {backends}; compile {compile_modes or 'off'}", flush=True)
    t0 = time.perf_counter()
    env = report.environment(device)
    copy_bw = measure.copy_bandwidth(device, args.quick)
    print(f"copy bandwidth: {copy_bw['gbps']:.1f} GB/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (args.name or report.default_stem(env, args.quick))

    def save(rows):
        report.write_json(stem.with_suffix(".json"), env, copy_bw, rows, argv, time.perf_counter() - t0)

    suite = Suite(device, args.quick, backends, compile_modes, _csv(args.providers), args.time_budget,
                  log=lambda line: print(line, flush=True))
    with measure.float32_as_float32():  # float32 is timed and checked as float32, eager's cuDNN included
        rows = suite.run(cases, after_group=save)
    save(rows)
    written = report.write_all(report.load(stem.with_suffix(".json")), stem, plots=not args.no_plots)
    print(f"wrote {stem.with_suffix('.json')}, " + ", ".join(str(p) for p in written), flush=True)
    failed = [r for r in rows if r["status"] == "failed" and r["provider"] == "eager"]
    if failed:
        raise SystemExit(f"the eager baseline failed its check in {len(failed)} rows: the suite is broken")
    return stem.with_suffix(".json")


def main(argv: Optional[Sequence[str]] = None, prog: str = "fcn-fast bench") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "run"
    if command == "run":
        run(argv, prog)
        return 0
    from fcn_fast.bench import report

    if command == "compare":
        p = argparse.ArgumentParser(prog=f"{prog} compare", description="Two results files side by side.")
        p.add_argument("a")
        p.add_argument("b")
        p.add_argument("-o", "--output", help="write the markdown here (default: print it)")
        args = p.parse_args(argv)
        text = report.compare(report.load(args.a), report.load(args.b),
                              (Path(args.a).stem, Path(args.b).stem))
        if args.output:
            Path(args.output).write_text(text)
        else:
            print(text)
        return 0
    if command == "report":
        p = argparse.ArgumentParser(prog=f"{prog} report", description="Rewrite a results file's markdown and PNGs.")
        p.add_argument("results")
        p.add_argument("--no-plots", action="store_true")
        args = p.parse_args(argv)
        path = Path(args.results)
        for written in report.write_all(report.load(path), path.with_suffix(""), plots=not args.no_plots):
            print(written)
        return 0
    p = _run_parser(f"{prog} list")
    args = p.parse_args(argv)
    import torch

    from fcn_fast.bench.cases import build_cases

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for case in build_cases(device, args.quick, _csv(args.ops), _csv(args.dtypes), _csv(args.modes), args.cases):
        s = case.shape
        print(f"{case.op:24s} {s.label:32s} {case.dtype:5s} {','.join(case.modes):24s} N={s.n} C={s.c} "
              f"in={s.coarse_hw} out={s.out_hw} x{s.factor} {s.note}")
    return 0


__all__ = ["main", "run"]

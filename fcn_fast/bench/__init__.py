"""fcn_fast's benchmark suite: every op and backend against eager PyTorch and torch.compile.

    fcn-fast bench [--ops OP,...] [--quick] [--device cpu|cuda] ...   a run (same as: python -m benchmarks ...)
    fcn-fast bench report [SET ...]                                   rewrite the sets' markdown from the data file
    fcn-fast bench chart [SET | RUN ...] [-o DIR]                     draw the sets' (or runs') speed-up charts
    fcn-fast bench compare A B [--set SET] [-o OUT.md]                two sets or runs side by side
    fcn-fast bench runs                                               the runs in the data file
    fcn-fast bench list [--quick] [--device ...]                      the cases a run would measure

A run appends its rows to <out>/runs.jsonl (fcn_fast.bench.results) and rewrites the report of each (device, dtype,
threads) set it measured, <out>/<set>.md, and its chart <set>.png. docs/benchmarks.md says what is measured and how.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from fcn_fast.bench.results import DATA_FILE

RESULTS_DIR = "benchmarks/results"
SUBCOMMANDS = ("run", "report", "chart", "compare", "runs", "list")


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
    p.add_argument("--out", default=RESULTS_DIR, help=f"folder of the data file {DATA_FILE} and the reports "
                   "(default: %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG charts")
    return p


def _results_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default=RESULTS_DIR, help=f"folder of {DATA_FILE} (default: %(default)s)")


def run(argv: Sequence[str], prog: str = "fcn-fast bench") -> Path:
    args = _run_parser(prog).parse_args(argv)
    import torch

    from fcn_fast._backends import usable_backends
    from fcn_fast.bench import measure, report, results
    from fcn_fast.bench.cases import build_cases
    from fcn_fast.bench.suite import Suite

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    # The Triton interpreter and the emulated CUDA kernels run on the CPU for tests; they are orders of magnitude too
    # slow to time.
    backends = [b for b in usable_backends(device)
                if b not in ("reference", "cuda_emulated") and not (b == "triton" and device.type == "cpu")]
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
    writer = results.RunWriter(out / DATA_FILE, env, copy_bw, argv, args.quick)
    suite = Suite(device, args.quick, backends, compile_modes, _csv(args.providers), args.time_budget,
                  log=lambda line: print(line, flush=True))
    with measure.float32_as_float32():  # float32 is timed and checked as float32, eager's cuDNN included
        rows = suite.run(cases, after_group=writer.rows)
    writer.end(time.perf_counter() - t0)
    data = results.load(out / DATA_FILE)
    written = [p for name in writer.sets for p in report.write_report(data, name, out, plots=not args.no_plots)]
    print(f"appended run {writer.run} to {out / DATA_FILE}; wrote " + ", ".join(str(p) for p in written), flush=True)
    failed = [r for r in rows if r["status"] == "failed" and r["provider"] == "eager"]
    if failed:
        raise SystemExit(f"the eager baseline failed its check in {len(failed)} rows: the suite is broken")
    return out / DATA_FILE


def main(argv: Optional[Sequence[str]] = None, prog: str = "fcn-fast bench") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "run"
    if command == "run":
        run(argv, prog)
        return 0
    from fcn_fast.bench import report, results

    if command == "list":
        return _list(argv, prog)
    p = argparse.ArgumentParser(prog=f"{prog} {command}", description=DESCRIPTIONS[command])
    _results_option(p)
    if command == "compare":
        p.add_argument("a", help="a set name (its current rows), or a run id or git commit (prefix)")
        p.add_argument("b")
        p.add_argument("--set", help="only this set's rows (when a run or commit holds several)")
        p.add_argument("-o", "--output", help="write the markdown here (default: print it)")
    elif command in ("report", "chart"):
        p.add_argument("which", nargs="*", metavar="SET" if command == "report" else "SET_OR_RUN",
                       help="default: every set" + ("" if command == "report" else "; a run id or commit draws "
                                                    "that run's rows, one chart per set"))
    if command == "chart":
        p.add_argument("-o", "--output-dir", help="folder for the PNGs (default: the results folder)")
    args = p.parse_args(argv)
    folder = Path(args.results)
    try:
        data = results.load(folder / DATA_FILE)
    except FileNotFoundError:
        raise SystemExit(f"{folder / DATA_FILE} does not exist: run the suite first (--out {folder})") from None
    try:
        if command == "runs":
            for rid, record in data.runs.items():
                e, mine = record["env"], [r for r in data.rows if r["run"] == rid]
                print(f"{rid}  {e['device_name']:28s} {e['device_type']:4s} torch {e['torch']:14s} "
                      f"{len(mine):4d} rows  {', '.join(dict.fromkeys(r['set'] for r in mine))}"
                      + ("" if rid in data.elapsed else "  (stopped before its end)"))
        elif command == "compare":
            (rows_a, name_a), (rows_b, name_b) = (results.select(data, x, args.set) for x in (args.a, args.b))
            text = report.compare(data, rows_a, rows_b, (name_a, name_b))
            if args.output:
                Path(args.output).write_text(text)
            else:
                print(text)
        elif command == "report":
            for name in args.which or data.sets():
                if name not in data.sets():
                    raise ValueError(f"no set {name!r}; sets: {', '.join(data.sets())}")
                print(*report.write_report(data, name, folder, plots=False))
        else:
            out = Path(args.output_dir or folder)
            out.mkdir(parents=True, exist_ok=True)
            for which in args.which or data.sets():
                if which in data.sets():
                    print(report.chart(data.current(which), which, out / f"{which}.png"))
                    continue
                rows, _ = results.select(data, which)
                for name in dict.fromkeys(r["set"] for r in rows):
                    mine = [r for r in rows if r["set"] == name]
                    stem = f"{name}_{'+'.join(dict.fromkeys(r['run'] for r in mine))}"
                    print(report.chart(mine, stem, out / f"{stem}.png"))
    except ValueError as exc:
        raise SystemExit(f"{prog} {command}: {exc}") from None
    return 0


DESCRIPTIONS = {
    "report": "Rewrite each set's markdown report (<set>.md) from the data file: per case, the latest run.",
    "chart": "Draw speed-up charts (<set>.png) from the data file.",
    "compare": "Two sets or runs side by side, from the data file.",
    "runs": "The runs in the data file: id, device, versions, rows, sets.",
}


def _list(argv: Sequence[str], prog: str) -> int:
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

"""What the results say: the environment a run records, a set's markdown report, its PNG chart, and two selections
of rows compared. The rows come from the data file (fcn_fast.bench.results)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fcn_fast.bench.cases import is_model



def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> Optional[str]:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    """Everything needed to tell two runs apart: device, versions, threads, date, commit."""
    import fcn_fast
    from fcn_fast import _extension
    from fcn_fast._backends import available_backends

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    env = {
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "fcn_fast": fcn_fast.__version__,
        "fcn_fast_build": _extension.build_info(),
        "backends": {k: {"available": v.available, "reason": v.reason} for k, v in available_backends().items()},
        "git_commit": commit,
        "git_dirty": bool(dirty) if commit else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname_platform": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_memory_bytes=props.total_memory, gpu_sms=props.multi_processor_count,
                   gpu_capability=f"{props.major}.{props.minor}")
    return env


# ---- markdown ---------------------------------------------------------------------------------------------------------

def _f(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def env_lines(run: dict, elapsed_s: Optional[float] = None) -> List[str]:
    """A run's record as markdown: device, versions, commit, date, command, copy bandwidth."""
    e, bw = run["env"], run.get("copy_bandwidth") or {}
    build = e.get("fcn_fast_build") or {}
    took = "stopped before its end" if elapsed_s is None else f"took {elapsed_s:.0f} s"
    return [
        f"- device: **{e['device_name']}** ({e['device_type']}"
        + (f", {e['cpu_threads']} thread{'s' if e['cpu_threads'] != 1 else ''} of {e['cpu_count']} CPUs" if e["device_type"] == "cpu" else
           f", {e.get('gpu_sms')} SMs, capability {e.get('gpu_capability')}") + ")",
        f"- CPU: {e['cpu_model']}; torch {e['torch']}, triton {e['triton']}, CUDA {e['cuda']}, Python {e['python']}",
        f"- fcn_fast {e['fcn_fast']} at commit `{(e.get('git_commit') or '?')[:12]}`"
        + (" (uncommitted changes)" if e.get("git_dirty") else "")
        + f"; usable backends: {', '.join(k for k, v in e['backends'].items() if v['available'])}"
        + (f"; build {json.dumps(build)}" if build else ""),
        f"- date: {e['date_utc']}; run {took}; command: `{' '.join(run['argv']) or '(defaults)'}`",
        f"- measured copy bandwidth: **{_f(bw.get('gbps'), '.1f')} GB/s** (read + write of "
        f"{_f((bw.get('bytes') or 0) / 2**20 / 2, '.0f')} MiB)",
    ]


def _runs_lines(results, rows: Sequence[dict]) -> List[str]:
    ids = list(dict.fromkeys(r["run"] for r in rows))
    out: List[str] = []
    for rid in ids:
        out += ([f"Run `{rid}` ({sum(r['run'] == rid for r in rows)} rows):", ""] if len(ids) > 1 else
                [f"Run `{rid}`:", ""])
        out += env_lines(results.runs[rid], results.elapsed.get(rid)) + [""]
    return out


def summary(rows: Sequence[dict]) -> List[str]:
    """One line per (op, case, dtype, mode): the fastest fcn_fast backend against eager and compile, time and memory."""
    groups: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault((r["op"], r["case"], r["dtype"], r["mode"]), {})[r["provider"]] = r
    lines = ["| op | case | dtype | mode | fcn_fast ms | eager ms | compile ms | × eager | × compile "
             "| peak MiB fcn_fast / eager |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (op, case, dtype, mode), g in groups.items():
        fused = [r for p, r in g.items() if p.startswith("fcn_fast:")]
        if not fused or "eager" not in g:
            continue
        best = min(fused, key=lambda r: r["median_ms"])
        eager, comp = g["eager"], g.get("compile")
        lines.append(
            f"| {op} | {case} | {dtype} | {mode} | {best['median_ms']:.3f} ({best['provider'][9:]}) "
            f"| {eager['median_ms']:.3f} | {_f(comp and comp['median_ms'], '.3f')} "
            f"| **{eager['median_ms'] / best['median_ms']:.2f}** "
            f"| {_f(comp and comp['median_ms'] / best['median_ms'], '.2f')} "
            f"| {best['peak_bytes'] / 2**20:.1f} / {eager['peak_bytes'] / 2**20:.1f} |")
    return lines


def markdown(results, rows: Sequence[dict], name: str) -> str:
    """A set's report (or any selection of rows): the runs they come from, a summary, every row per op."""
    ids = list(dict.fromkeys(r["run"] for r in rows))
    several = len(ids) > 1
    device = results.runs[ids[0]]["env"]["device_name"] if ids else "?"
    out = [f"# fcn_fast benchmark: {name} ({device})", "",
           "Generated from `runs.jsonl` by `fcn-fast bench report`: per case, the latest run that measured it. "
           "Median time of one call (20th–80th percentile), speed-up over the eager PyTorch composition and over its "
           "torch.compile in the same run, achieved GB/s (the fewest bytes the op must move over the median time; "
           "formulas in docs/benchmarks.md, each row's in the data file), that as % of the measured copy bandwidth, "
           "and the peak memory the call allocates above its inputs. Every provider passed the correctness check "
           "against the float64 eager result before it was timed; failed or skipped providers are listed with the "
           "reason.", ""] + _runs_lines(results, rows) + [
           "## Summary: the fastest fcn_fast backend", ""] + summary(rows) + [""]
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op]
        model = is_model(op)
        out += [f"## {op}", ""]
        if any(r["status"] == "ok" for r in mine):
            out += ["| case | dtype | mode | provider | median ms [p20–p80] | × eager | × compile | "
                    + ("images/s" if model else "GB/s | % copy") + " | peak MiB | note |" + (" run |" if several else ""),
                    "|---|---|---|---|---|---|---|" + ("---|" if model else "---|---|") + "---|---|"
                    + ("---|" if several else "")]
        for r in (r for r in mine if r["status"] == "ok"):
            bw = (results.runs[r["run"]].get("copy_bandwidth") or {}).get("gbps")
            thr = _f(r.get("images_per_s"), ".2f") if model else (
                f"{_f(r.get('gbps'), '.1f')} | {_f(100 * r['gbps'] / bw if r.get('gbps') and bw else None, '.0f')}")
            out.append(f"| {r['case']} | {r['dtype']} | {r['mode']} | {r['provider']} "
                       f"| {r['median_ms']:.3f} [{r['p20_ms']:.3f}–{r['p80_ms']:.3f}] "
                       f"| {_f(r.get('speedup_vs_eager'), '.2f')} | {_f(r.get('speedup_vs_compile'), '.2f')} "
                       f"| {thr} | {r['peak_bytes'] / 2**20:.1f} | {r.get('note') or ''} |"
                       + (f" `{r['run']}` |" if several else ""))
        missing: Dict[Tuple[str, str], List[str]] = {}
        for r in mine:
            if r["status"] != "ok":
                why = f"{r['status']}: {str(r.get('reason'))[:160]}"
                missing.setdefault((r["provider"], why), []).append(f"{r['case']} {r['dtype']} {r['mode']}")
        if missing:
            out += ["", "Not measured:"]
            out += [f"- {p} ({len(where)} rows: {', '.join(dict.fromkeys(where[:4]))}{' …' if len(where) > 4 else ''})"
                    f" — {why}" for (p, why), where in missing.items()]
        out.append("")
    return "\n".join(out)


# ---- charts -------------------------------------------------------------------------------------------------------------

def chart(rows: Sequence[dict], title: str, path: Path) -> Path:
    """One PNG: a panel per op, the speed-up over eager per case and mode, one bar per provider, drawn from the 1×
    line (eager) up or down, on a log scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import matplotlib.ticker

    ok = [r for r in rows if r["status"] == "ok" and r.get("speedup_vs_eager") and r["provider"] != "eager"]
    ops = list(dict.fromkeys(r["op"] for r in ok))
    if not ops:
        raise ValueError(f"{title}: no measured rows to chart")

    def group(r):
        return f"{r['case'].replace(' ', chr(10))}\n{r['dtype']} {r['mode']}"

    panels = []
    for op in ops:
        mine = [r for r in ok if r["op"] == op]
        groups = list(dict.fromkeys(group(r) for r in mine))
        providers = list(dict.fromkeys(r["provider"] for r in mine))
        panels.append((op, groups, providers, {(group(r), r["provider"]): r["speedup_vs_eager"] for r in mine}))
    widest = max(len(g) * max(1, len(p)) for _, g, p, _ in panels)
    fig = Figure(figsize=(max(8.0, 0.5 * widest + 2), 3.4 * len(panels) + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    times = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×")
    colours = {p: f"C{i}" for i, p in enumerate(dict.fromkeys(p for _, _, ps, _ in panels for p in ps))}
    for i, (op, groups, providers, value) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        width = 0.8 / max(1, len(providers))
        for j, p in enumerate(providers):
            drawn = [(g, value[(name, p)]) for g, name in enumerate(groups) if (name, p) in value]
            xs = [g + (j - (len(providers) - 1) / 2) * width for g, _ in drawn]
            ax.bar(xs, [v - 1 for _, v in drawn], width, bottom=1, color=colours[p], label=p)
            for x, (_, v) in zip(xs, drawn):
                ax.text(x, v, f"{v:.3g}×", ha="center", va="bottom" if v >= 1 else "top", fontsize=6)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        values = list(value.values())
        # At least 0.5×-2×, so that a panel of small differences does not look like one of large ones.
        ax.set_ylim(min(0.5, min(values) / 1.5), max(2.0, max(values) * 1.5))
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(times)
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=7)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_ylabel("× eager PyTorch")
        ax.set_title(op, fontsize=10, loc="left")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{title}: speed-up over eager PyTorch (the 1× line; higher is faster)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path


# ---- compare ------------------------------------------------------------------------------------------------------------

def compare(results, a: Sequence[dict], b: Sequence[dict], names: Tuple[str, str] = ("A", "B")) -> str:
    """Two selections side by side: every (op, case, dtype, mode, provider) measured in both, with B's speed-up
    over A."""
    from fcn_fast.bench.results import row_key

    rows_b = {row_key(r): r for r in b if r["status"] == "ok"}
    out = [f"# fcn_fast benchmark comparison: {names[0]} vs {names[1]}", "",
           f"Generated from `runs.jsonl` by `fcn-fast bench compare {names[0]} {names[1]}`.", "",
           f"**{names[0]}**", ""] + _runs_lines(results, a) + [f"**{names[1]}**", ""] + _runs_lines(results, b) + [
        f"| op | case | dtype | mode | provider | {names[0]} ms | {names[1]} ms | {names[0]}/{names[1]} "
        f"| {names[0]} × eager | {names[1]} × eager | {names[0]} peak MiB | {names[1]} peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    shared = 0
    for ra in a:
        rb = rows_b.get(row_key(ra))
        if ra["status"] != "ok" or rb is None:
            continue
        shared += 1
        out.append("| " + " | ".join(str(x) for x in row_key(ra)) + f" | {ra['median_ms']:.3f} | {rb['median_ms']:.3f} "
                   f"| {ra['median_ms'] / rb['median_ms']:.2f} | {_f(ra.get('speedup_vs_eager'), '.2f')} "
                   f"| {_f(rb.get('speedup_vs_eager'), '.2f')} | {ra['peak_bytes'] / 2**20:.1f} "
                   f"| {rb['peak_bytes'] / 2**20:.1f} |")
    if not shared:
        out.append("| (no case was measured in both) | | | | | | | | | | | |")
    return "\n".join(out) + "\n"


def write_report(results, set_name: str, folder: Path, plots: bool = True) -> List[Path]:
    """A set's current report, <folder>/<set>.md, and with plots its chart <set>.png."""
    rows = results.current(set_name)
    md = Path(folder) / f"{set_name}.md"
    md.write_text(markdown(results, rows, set_name) + "\n")
    return [md] + ([chart(rows, set_name, md.with_suffix(".png"))] if plots else [])

"""Results files: the environment a run records, JSON, the markdown table, PNG bar charts, and two runs compared."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fcn_fast.bench.cases import is_model

SCHEMA = 1


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


def default_stem(env: dict, quick: bool) -> str:
    name = re.sub(r"[^A-Za-z0-9]+", "-", env["device_name"]).strip("-")
    threads = f"_{env['cpu_threads']}t" if env["device_type"] == "cpu" else ""
    return f"{env['device_type']}_{name}{threads}" + ("_quick" if quick else "")


ROW_ENV = ("device_name", "torch", "triton", "cuda", "cpu_threads", "date_utc", "git_commit")


def write_json(path: Path, env: dict, copy_bw: dict, rows: List[dict], argv: Sequence[str], elapsed_s: float) -> None:
    """The run's file; each row also carries the device, versions, date and commit, so that rows of several runs
    can be pooled and still tell where they came from (Liger-Kernel's benchmark rows do the same)."""
    stamp = {k: env.get(k) for k in ROW_ENV}
    doc = {"schema": SCHEMA, "env": env, "copy_bandwidth": copy_bw, "argv": list(argv), "elapsed_s": elapsed_s,
           "rows": [{**r, **stamp} for r in rows]}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def load(path) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: results schema {doc.get('schema')!r}, expected {SCHEMA}")
    return doc


# ---- markdown ---------------------------------------------------------------------------------------------------------

def _f(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def env_lines(doc: dict) -> List[str]:
    e, bw = doc["env"], doc.get("copy_bandwidth") or {}
    build = e.get("fcn_fast_build") or {}
    return [
        f"- device: **{e['device_name']}** ({e['device_type']}"
        + (f", {e['cpu_threads']} threads of {e['cpu_count']} CPUs" if e["device_type"] == "cpu" else
           f", {e.get('gpu_sms')} SMs, capability {e.get('gpu_capability')}") + ")",
        f"- CPU: {e['cpu_model']}; torch {e['torch']}, triton {e['triton']}, CUDA {e['cuda']}, Python {e['python']}",
        f"- fcn_fast {e['fcn_fast']} at commit `{(e.get('git_commit') or '?')[:12]}`"
        + (" (uncommitted changes)" if e.get("git_dirty") else "")
        + f"; usable backends: {', '.join(k for k, v in e['backends'].items() if v['available'])}"
        + (f"; build {json.dumps(build)}" if build else ""),
        f"- date: {e['date_utc']}; run took {doc['elapsed_s']:.0f} s; command: `{' '.join(doc['argv']) or '(defaults)'}`",
        f"- measured copy bandwidth: **{_f(bw.get('gbps'), '.1f')} GB/s** (read + write of "
        f"{_f((bw.get('bytes') or 0) / 2**20 / 2, '.0f')} MiB)",
    ]


def summary(doc: dict) -> List[str]:
    """One line per (op, case, dtype, mode): the fastest fcn_fast backend against eager and compile, time and memory."""
    groups: Dict[tuple, Dict[str, dict]] = {}
    for r in doc["rows"]:
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


def markdown(doc: dict) -> str:
    rows, bw = doc["rows"], (doc.get("copy_bandwidth") or {}).get("gbps")
    out = [f"# fcn_fast benchmark: {doc['env']['device_name']}", ""] + env_lines(doc) + [
        "",
        "Median time of one call (20th–80th percentile), speed-up over the eager PyTorch composition and over its "
        "torch.compile in the same run, achieved GB/s (the fewest bytes the op must move over the median time; "
        "formulas in the JSON and the README's Benchmarks section), that as % of the measured copy bandwidth, and the peak "
        "memory the call allocates above its inputs. Every provider passed the correctness check against the "
        "float64 eager result before it was timed; failed or skipped providers are listed with the reason.", "",
        "## Summary: the fastest fcn_fast backend", ""] + summary(doc) + [""]
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op]
        model = is_model(op)
        out += [f"## {op}", ""]
        if any(r["status"] == "ok" for r in mine):
            out += ["| case | dtype | mode | provider | median ms [p20–p80] | × eager | × compile | "
                    + ("images/s" if model else "GB/s | % copy") + " | peak MiB | note |",
                    "|---|---|---|---|---|---|---|" + ("---|" if model else "---|---|") + "---|---|"]
        for r in (r for r in mine if r["status"] == "ok"):
            thr = _f(r.get("images_per_s"), ".2f") if model else (
                f"{_f(r.get('gbps'), '.1f')} | {_f(100 * r['gbps'] / bw if r.get('gbps') and bw else None, '.0f')}")
            out.append(f"| {r['case']} | {r['dtype']} | {r['mode']} | {r['provider']} "
                       f"| {r['median_ms']:.3f} [{r['p20_ms']:.3f}–{r['p80_ms']:.3f}] "
                       f"| {_f(r.get('speedup_vs_eager'), '.2f')} | {_f(r.get('speedup_vs_compile'), '.2f')} "
                       f"| {thr} | {r['peak_bytes'] / 2**20:.1f} | {r.get('note') or ''} |")
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


# ---- plots --------------------------------------------------------------------------------------------------------------

def plot(doc: dict, stem: Path) -> List[Path]:
    """One PNG per op: speed-up over eager per case and mode, one bar per provider (log scale; 1 = eager)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    ok = [r for r in doc["rows"] if r["status"] == "ok" and r.get("speedup_vs_eager")]
    for op in dict.fromkeys(r["op"] for r in ok):
        mine = [r for r in ok if r["op"] == op]
        groups = list(dict.fromkeys(f"{r['case']}\n{r['dtype']} {r['mode']}" for r in mine))
        providers = list(dict.fromkeys(r["provider"] for r in mine))
        value = {(f"{r['case']}\n{r['dtype']} {r['mode']}", r["provider"]): r["speedup_vs_eager"] for r in mine}
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(providers)) / 2), 4.5))
        width = 0.8 / max(1, len(providers))
        for i, p in enumerate(providers):
            xs = [g + (i - (len(providers) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, [value.get((g, p), 0) for g in groups], width, label=p)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        times = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×")
        ax.yaxis.set_major_formatter(times)
        ax.yaxis.set_minor_formatter(times)
        ax.tick_params(axis="y", which="minor", labelsize=6)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speed-up over eager PyTorch (×)")
        ax.set_title(f"{op} on {doc['env']['device_name']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = stem.parent / f"{stem.name}_{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_all(doc: dict, stem: Path, plots: bool = True) -> List[Path]:
    md = stem.with_suffix(".md")
    md.write_text(markdown(doc) + "\n")
    return [md] + (plot(doc, stem) if plots else [])


# ---- compare ------------------------------------------------------------------------------------------------------------

def compare(a: dict, b: dict, names: Tuple[str, str] = ("A", "B")) -> str:
    """Two results side by side: every (op, case, dtype, mode, provider) measured in both, with B's speed-up over A."""
    def key(r):
        return r["op"], r["case"], r["dtype"], r["mode"], r["provider"]

    rows_b = {key(r): r for r in b["rows"] if r["status"] == "ok"}
    out = [f"# fcn_fast benchmark comparison: {names[0]} vs {names[1]}", "", f"**{names[0]}**", ""] + env_lines(a) + [
        "", f"**{names[1]}**", ""] + env_lines(b) + [
        "", f"| op | case | dtype | mode | provider | {names[0]} ms | {names[1]} ms | {names[0]}/{names[1]} "
            f"| {names[0]} × eager | {names[1]} × eager | {names[0]} peak MiB | {names[1]} peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    shared = 0
    for ra in a["rows"]:
        rb = rows_b.get(key(ra))
        if ra["status"] != "ok" or rb is None:
            continue
        shared += 1
        out.append("| " + " | ".join(str(x) for x in key(ra)) + f" | {ra['median_ms']:.3f} | {rb['median_ms']:.3f} "
                   f"| {ra['median_ms'] / rb['median_ms']:.2f} | {_f(ra.get('speedup_vs_eager'), '.2f')} "
                   f"| {_f(rb.get('speedup_vs_eager'), '.2f')} | {ra['peak_bytes'] / 2**20:.1f} "
                   f"| {rb['peak_bytes'] / 2**20:.1f} |")
    if not shared:
        out.append("| (no case was measured in both runs) | | | | | | | | | | | |")
    return "\n".join(out) + "\n"

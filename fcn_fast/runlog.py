"""A training run's folder: config, log, per-epoch metrics (CSV and JSON), PNG plots, checkpoints.

    RUN/config.json        the resolved training configuration
    RUN/log.txt            what the run printed, epoch by epoch
    RUN/metrics.csv|json   one row per epoch: train loss, LR, validation metrics, time
    RUN/plots/loss.png     training loss per logged step and per epoch
    RUN/plots/mean_iu.png  validation mean IU and pixel accuracy per epoch
    RUN/checkpoints/last.pt, best.pt
    RUN/summary.json       written last, only when the run completes
Every file is replaced atomically, so a killed run leaves each one whole (old or new) and no summary.json.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Dict, List, Sequence

COLUMNS = ("epoch", "step", "train_loss", "lr", "pixel_acc", "mean_acc", "mean_iu", "fw_iu", "time_s")


def _clean(obj):
    """JSON has no NaN: absent values (e.g. the IoU of a class never seen) become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(_clean(obj), indent=1) + "\n")


class RunFolder:
    def __init__(self, root: str, *, active: bool = True):
        """``active=False`` (DDP ranks other than 0): every write is skipped."""
        self.root, self.active = root, active
        self.checkpoints = os.path.join(root, "checkpoints")
        self.last = os.path.join(self.checkpoints, "last.pt")
        self.best = os.path.join(self.checkpoints, "best.pt")
        self.config = os.path.join(root, "config.json")
        self.summary = os.path.join(root, "summary.json")
        if active:
            os.makedirs(self.checkpoints, exist_ok=True)
            os.makedirs(os.path.join(root, "plots"), exist_ok=True)

    def log(self, message: str, echo=print) -> None:
        if not self.active:
            return
        if echo is not None:
            echo(message)
        with open(os.path.join(self.root, "log.txt"), "a") as f:
            f.write(message + "\n")

    def write_metrics(self, history: List[Dict[str, Any]]) -> None:
        if not self.active:
            return
        write_json(os.path.join(self.root, "metrics.json"), history)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
        write_text(os.path.join(self.root, "metrics.csv"), buf.getvalue())

    def plot(self, history: List[Dict[str, Any]], trace: Sequence[Sequence[float]], title: str = "") -> None:
        if not self.active:
            return
        plot_loss(os.path.join(self.root, "plots", "loss.png"), history, trace, title)
        plot_scores(os.path.join(self.root, "plots", "mean_iu.png"), [(title, history)],
                    f"{title} validation scores during training".strip())


def _figure():
    # The object-oriented Agg API: no pyplot, so no global backend switch and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.tight_layout()
    fig.savefig(tmp)
    os.replace(tmp, path)


def plot_loss(path: str, history: List[Dict[str, Any]], trace: Sequence[Sequence[float]], title: str = "") -> None:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    if trace:
        ax.plot([t[0] for t in trace], [t[1] for t in trace], lw=0.8, alpha=0.6, label="logged steps")
    rows = [r for r in history if r.get("train_loss") is not None]
    if rows:
        ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], "o-", label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per labelled pixel")
    ax.set_title(f"{title} training loss".strip())
    ax.legend()
    _save(fig, path)


def plot_scores(path: str, runs: Sequence[tuple], title: str = "", *, sequential: bool = False) -> None:
    """Validation mean IU (solid, circles) and pixel accuracy (dashed, squares) in % against the training step, one
    colour per run. ``sequential=True`` (stages trained one after another, each from the last one's weights) puts
    the runs on one cumulative step axis, each after the one before it, and marks where each stage starts."""
    from matplotlib.lines import Line2D

    fig = _figure()
    fig.set_size_inches(8, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    offset, drawn = 0, []
    for i, (name, history) in enumerate(runs):
        rows = [r for r in history if r.get("mean_iu") is not None]
        end = max((r["step"] for r in history), default=0)
        colour = f"C{i}"
        if sequential:
            ax.axvspan(offset, offset + end, color=colour, alpha=0.06, lw=0)
            ax.text(offset + end / 2, 101, name, color=colour, ha="center", va="bottom", fontsize="small",
                    fontweight="bold")
        if rows:
            steps = [offset + r["step"] for r in rows]
            ax.plot(steps, [100 * r["mean_iu"] for r in rows], "o-", color=colour, ms=4)
            ax.plot(steps, [100 * r["pixel_acc"] for r in rows], "s--", color=colour, ms=3.5, lw=1.2)
            for key, dy in (("mean_iu", -12), ("pixel_acc", 5)):  # the stage's last scores, below / above
                ax.annotate(f"{100 * rows[-1][key]:.1f}", (steps[-1], 100 * rows[-1][key]), textcoords="offset points",
                            xytext=(0, dy), ha="right", fontsize="x-small", color=colour)
            drawn.append((name, colour))
        if sequential:
            offset += end
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.set_ylabel("validation score (%)")
    ax.set_xlabel("training step" + (" (stages one after another)" if sequential else ""))
    ax.grid(alpha=0.3)
    ax.set_title(title or "validation scores during training", pad=18 if sequential else 6)
    if drawn:
        handles = [Line2D([], [], color="0.3", marker="o", ms=4, label="mean IU (validation)"),
                   Line2D([], [], color="0.3", ls="--", marker="s", ms=3.5, label="pixel accuracy (validation)")]
        if not sequential and len(drawn) > 1:  # stages are named above the plot instead
            handles += [Line2D([], [], color=c, lw=3, label=n) for n, c in drawn if n]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(handles),
                  fontsize="small", frameon=False)
    _save(fig, path)

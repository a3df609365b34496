"""``fcn-fast demo``: the synthetic data set, FCN-32s -> FCN-16s -> FCN-8s trained in stages (each initialised from
the previous, as in the paper), each evaluated on the synthetic val split, a table of the results, plots, and
example predictions (image | truth | 32s | 16s | 8s) where the finer stages' edges show.

It trains small models (``width`` 1/16 of VGG16's channels, ``geometry="same"``) from scratch with AdamW and a
cosine schedule, batches of 4 images, so that it runs on a laptop CPU in minutes; the paper's recipe (SGD, momentum
0.99, summed loss, batch 1, ImageNet init) is ``fcn-fast train``'s default.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, List

import numpy as np
from PIL import Image

from fcn_fast.data import IGNORE_INDEX, VOC_PALETTE, class_names_of, colorize, make_synthetic, open_dataset
from fcn_fast.errors import UserError
from fcn_fast.evaluate import resolve_device
from fcn_fast.runlog import plot_scores, write_json, write_text

STAGES = ("fcn32s", "fcn16s", "fcn8s")
TITLES = {"fcn32s": "FCN-32s", "fcn16s": "FCN-16s", "fcn8s": "FCN-8s"}
# Evaluations per stage during training, for the curves of plots/stages.png (each costs one pass over the val split).
EVALS_PER_STAGE = 12
# (train images, val images, image size, steps per stage)
FULL = dict(train=400, val=100, size=96, steps=(1500, 1000, 7000))
FAST = dict(train=24, val=8, size=64, steps=(30, 20, 30))


def _table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| stage  | steps | time (s) | pixel acc | mean IU |", "|--------|------:|---------:|----------:|--------:|"]
    for r in rows:
        lines.append(f"| {r['stage']:<6} | {r['steps']:>5} | {r['time_s']:>8.1f} | {100 * r['pixel_acc']:>9.2f} | "
                     f"{100 * r['mean_iu']:>7.2f} |")
    return "\n".join(lines)


def _examples(path: str, runs: Dict[str, str], data: str, device, titles: Dict[str, str], count: int = 4) -> None:
    """One row per val image: image | truth | each stage's prediction, titled columns and a legend of the classes
    that appear."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from fcn_fast.checkpoint import model_from_checkpoint
    from fcn_fast.predict import predict_image

    dataset = open_dataset(data, "val")
    names = class_names_of(data)
    models = {stage: model_from_checkpoint(ckpt, device=device)[0] for stage, ckpt in runs.items()}
    columns = ["image", "truth"] + [titles[stage] for stage in models]
    rows, present = [], set()
    for i in range(min(count, len(dataset))):
        image, label = dataset.load(i)
        labels = [label] + [predict_image(m, image, device=device) for m in models.values()]
        present.update(int(v) for lab in labels for v in np.unique(lab))
        rows.append([image] + [colorize(lab) for lab in labels])
    tile, gap, top, bottom = 1.8, 0.08, 0.95, 0.75  # inches: tile size, gap between tiles, title and legend room
    width = len(columns) * (tile + gap) + 0.2
    height = len(rows) * (tile + gap) + top + bottom
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.1 / width, right=1 - 0.1 / width, top=1 - top / height, bottom=bottom / height,
                        wspace=gap / tile, hspace=gap / tile)
    for r, tiles in enumerate(rows):
        for c, tile_image in enumerate(tiles):
            ax = fig.add_subplot(len(rows), len(columns), r * len(columns) + c + 1)
            ax.imshow(tile_image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=10)
    legend = [Patch(facecolor=VOC_PALETTE[k] / 255, edgecolor="0.4",
                    label=names[k] if k < len(names) else ("void (ignored)" if k == IGNORE_INDEX else str(k)))
              for k in sorted(present)]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=9, frameon=False,
               title="classes: the colours of the truth and prediction columns", title_fontsize=9)
    fig.suptitle(f"{len(rows)} validation images, their true labels and each stage's prediction", fontsize=11,
                 y=1 - 0.12 / height)
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp)
    os.replace(tmp, path)


def run_demo(out: str, *, fast: bool = False, device: str = "auto", seed: int = 0, threads: int = None,
             progress: bool = True) -> List[Dict[str, Any]]:
    from fcn_fast.train import TrainConfig, train

    plan = FAST if fast else FULL
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"{out} already exists and is not empty; remove it or choose another --out")
    dev = resolve_device(device)
    if threads is None and dev.type == "cpu":
        # These models are tiny: one thread is near the fastest on a free CPU, and many times faster than several
        # on a busy one, where OpenMP threads wait on each other.
        threads = 1
    start = time.perf_counter()
    data = make_synthetic(os.path.join(out, "data"), train=plan["train"], val=plan["val"],
                          size=(plan["size"], plan["size"]), seed=seed)
    print(f"synthetic data: {plan['train']} train + {plan['val']} val images of {plan['size']}x{plan['size']} in "
          f"{data} ({time.perf_counter() - start:.1f} s)")
    rows, runs, histories, previous = [], {}, [], None
    batch = 4
    per_epoch = math.ceil(plan["train"] / batch)
    for stage, steps in zip(STAGES, plan["steps"]):
        # Evaluation reads no random numbers and leaves the weights alone: the training is the same with or without.
        cfg = TrainConfig(out=os.path.join(out, stage), data=data, model=stage, width=1 / 16, geometry="same",
                          dropout=0.0, optimizer="adamw", lr=2e-3, weight_decay=1e-4, loss_reduction="mean",
                          schedule="cosine", warmup=min(50, steps // 10), batch_size=batch, steps=steps, epochs=1,
                          eval_every=max(1, math.ceil(steps / per_epoch) // EVALS_PER_STAGE), init_from=previous,
                          device=device, seed=seed, threads=threads, progress=progress, log_every=25)
        summary = train(cfg)
        final = summary["final"]
        rows.append({"stage": stage, "steps": steps, "time_s": summary["time_s"], "pixel_acc": final["pixel_acc"],
                     "mean_iu": final["mean_iu"], "fw_iu": final["fw_iu"], "checkpoint": summary["checkpoint"]})
        runs[stage] = previous = summary["checkpoint"]
        with open(os.path.join(out, stage, "metrics.json")) as f:
            histories.append((stage, json.load(f)))
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    plot_scores(os.path.join(out, "plots", "stages.png"), [(TITLES[s], h) for s, h in histories],
                "Demo: validation scores while training FCN-32s, then FCN-16s, then FCN-8s\n"
                "(each stage starts from the weights the stage before it ended with)", sequential=True)
    _examples(os.path.join(out, "examples.png"), runs, data, dev,
              {r["stage"]: f"{TITLES[r['stage']]}\n(val mean IU {100 * r['mean_iu']:.1f})" for r in rows})
    table = _table(rows)
    total = time.perf_counter() - start
    write_text(os.path.join(out, "results.md"), table + f"\n\ntotal {total:.1f} s on {dev}\n")
    write_json(os.path.join(out, "results.json"), {"stages": rows, "total_s": total, "device": str(dev),
                                                   "fast": fast})
    print(table)
    print(f"total {total:.1f} s on {dev}; plots in {out}/*/plots, example predictions in {out}/examples.png")
    return rows


def add_arguments(p) -> None:
    p.add_argument("--out", default="fcn-fast-demo", help="new folder for everything (default: fcn-fast-demo)")
    p.add_argument("--fast", action="store_true", help="a one-minute version (small data, few steps)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default on the CPU: 1)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def main(args) -> List[Dict[str, Any]]:
    return run_demo(args.out, fast=args.fast, device=args.device, seed=args.seed, threads=args.threads,
                    progress=args.progress)

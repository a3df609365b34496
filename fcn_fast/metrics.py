"""Segmentation metrics of the FCN paper from a confusion matrix kept on the device.

With n_ij the pixels of class i predicted as class j, t_i = sum_j n_ij, and classes absent from both the labels and
the predictions left out (NaN, as the FCN reference code's ``np.nanmean``):
  pixel accuracy        sum_i n_ii / sum_i t_i
  mean accuracy         mean_i n_ii / t_i
  mean IU               mean_i n_ii / (t_i + sum_j n_ji - n_ii)
  frequency-weighted IU (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch


class ConfusionMatrix:
    """Accumulates (num_classes, num_classes) pixel counts, rows = label, columns = prediction.

    ``update`` never synchronises with the host: pixels are counted with ``index_add_`` into a flat buffer with two
    extra bins, one for ignored pixels and one for values outside the classes, which ``compute`` reports as an
    error (checking them in ``update`` would cost a device round-trip per image).
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255, device=None):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.counts = torch.zeros(num_classes * num_classes + 2, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.counts.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count a batch: ``pred`` and ``target`` integer tensors of one shape (e.g. (N, H, W))."""
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
        n = self.num_classes
        pred = pred.to(self.counts.device, torch.int64).reshape(-1)
        target = target.to(self.counts.device, torch.int64).reshape(-1)
        valid = (target >= 0) & (target < n) & (pred >= 0) & (pred < n)
        ignored = target == self.ignore_index
        index = torch.where(valid, target * n + pred, torch.where(ignored, n * n, n * n + 1))
        self.counts.index_add_(0, index, torch.ones_like(index))

    def all_reduce(self) -> None:
        """Sum the counts of every process (torch.distributed must be initialised)."""
        import torch.distributed as dist

        dist.all_reduce(self.counts)

    @property
    def matrix(self) -> torch.Tensor:
        n = self.num_classes
        return self.counts[:n * n].view(n, n)

    def compute(self) -> Dict[str, object]:
        """pixel_acc, mean_acc, mean_iu, fw_iu (floats; NaN with no labelled pixel), per-class ``iou`` and ``acc``
        lists (NaN for absent classes), ``pixels`` (labelled pixels counted) and ``ignored``."""
        counts = self.counts.cpu()
        invalid = int(counts[-1])
        if invalid:
            raise ValueError(f"{invalid} pixels had labels or predictions outside the {self.num_classes} classes "
                             f"0..{self.num_classes - 1} (and not ignore_index={self.ignore_index})")
        return scores(counts[:-2].view(self.num_classes, self.num_classes), ignored=int(counts[-2]))


def scores(matrix: torch.Tensor, ignored: int = 0) -> Dict[str, object]:
    """The metrics of a (C, C) confusion matrix (rows = label, columns = prediction)."""
    m = matrix.double()
    diag, truth, predicted = m.diag(), m.sum(1), m.sum(0)
    total = truth.sum()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    acc = torch.where(truth > 0, diag / truth.clamp(min=1), nan)
    union = truth + predicted - diag
    iou = torch.where(union > 0, diag / union.clamp(min=1), nan)
    if total > 0:
        pixel_acc = (diag.sum() / total).item()
        fw_iu = ((truth / total)[truth > 0] * iou[truth > 0]).sum().item()
    else:
        pixel_acc = fw_iu = float("nan")
    return {
        "pixel_acc": pixel_acc,
        "mean_acc": _nanmean(acc),
        "mean_iu": _nanmean(iou),
        "fw_iu": fw_iu,
        "iou": iou.tolist(),
        "acc": acc.tolist(),
        "pixels": int(total.item()),
        "ignored": ignored,
    }


def _nanmean(t: torch.Tensor) -> float:
    keep = ~torch.isnan(t)
    return t[keep].mean().item() if keep.any() else float("nan")


def format_table(result: Dict[str, object], class_names: Optional[Sequence[str]] = None) -> str:
    """The summary metrics and a per-class IoU / accuracy table, as text."""
    iou, acc = result["iou"], result["acc"]
    names = list(class_names) if class_names else [str(i) for i in range(len(iou))]
    width = max(12, *(len(n) for n in names))
    lines = [
        f"pixel acc {_pct(result['pixel_acc'])}   mean acc {_pct(result['mean_acc'])}   "
        f"mean IU {_pct(result['mean_iu'])}   fw IU {_pct(result['fw_iu'])}   ({result['pixels']} pixels)",
        "",
        f"{'class':<{width}}  {'IoU':>7}  {'acc':>7}",
    ]
    for name, i, a in zip(names, iou, acc):
        lines.append(f"{name:<{width}}  {_pct(i):>7}  {_pct(a):>7}")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.2f}"

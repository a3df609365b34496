"""upsample_cross_entropy and upsample_argmax (issue 4).

PLACEHOLDER: the composition of upsample_add and softmax_cross_entropy / argmax (reference semantics, full-resolution
logits materialized), so that models and the pipeline can be written against the final API; the fused custom ops
with cpu/cuda/triton backends replace this module.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fcn_fast.ops.cross_entropy import softmax_cross_entropy
from fcn_fast.ops.upsample_add import upsample_add


def upsample_cross_entropy(coarse: torch.Tensor, target: torch.Tensor, *, factor: int, mode: str = "deconv",
                           offset=(0, 0), align_corners: bool = False, weight: Optional[torch.Tensor] = None,
                           ignore_index: int = 255, reduction: str = "mean", label_smoothing: float = 0.0,
                           check_targets: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    logits = upsample_add(coarse, factor=factor, mode=mode, out_size=tuple(target.shape[-2:]), offset=offset,
                          align_corners=align_corners, backend=backend)
    return softmax_cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                                 label_smoothing=label_smoothing, check_targets=check_targets, backend=backend)


def upsample_argmax(coarse: torch.Tensor, *, factor: int, mode: str = "deconv", out_size: Sequence[int],
                    offset=(0, 0), align_corners: bool = False, dtype: torch.dtype = torch.int64,
                    backend: Optional[str] = None) -> torch.Tensor:
    logits = upsample_add(coarse, factor=factor, mode=mode, out_size=out_size, offset=offset,
                          align_corners=align_corners, backend=backend)
    return logits.argmax(1).to(dtype)


class UpsampleCrossEntropyLoss(torch.nn.Module):
    """``forward(coarse, target, factor=..., offset=...)`` or ``forward(coarse_output, target)`` where coarse_output
    carries the geometry (see fcn_fast.models)."""

    def __init__(self, weight: Optional[torch.Tensor] = None, ignore_index: int = 255, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, mode: str = "deconv", backend: Optional[str] = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.mode, self.backend = mode, backend

    def forward(self, coarse, target: torch.Tensor, *, factor: Optional[int] = None, offset=(0, 0),
                align_corners: bool = False) -> torch.Tensor:
        mode = self.mode
        if not isinstance(coarse, torch.Tensor):  # a model's CoarseOutput: logits plus geometry
            coarse, factor, offset, mode, align_corners = (coarse.logits, coarse.factor, coarse.offset, coarse.mode,
                                                           coarse.align_corners)
        return upsample_cross_entropy(coarse, target, factor=factor, mode=mode, offset=offset,
                                      align_corners=align_corners, weight=self.weight, ignore_index=self.ignore_index,
                                      reduction=self.reduction, label_smoothing=self.label_smoothing,
                                      backend=self.backend)

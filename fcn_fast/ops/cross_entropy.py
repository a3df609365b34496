"""softmax_cross_entropy: per-pixel softmax cross-entropy over NCHW logits (issue 4).

PLACEHOLDER: reference semantics only (F.cross_entropy), so that models and the pipeline can be written against the
final API; the custom op with cpu/cuda/triton backends replaces this module.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, weight: Optional[torch.Tensor] = None,
                          ignore_index: int = 255, reduction: str = "mean", label_smoothing: float = 0.0,
                          check_targets: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    return F.cross_entropy(logits, target.long(), weight=weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


class SoftmaxCrossEntropyLoss(torch.nn.Module):
    def __init__(self, weight: Optional[torch.Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *, backend: Optional[str] = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing, self.backend = ignore_index, reduction, label_smoothing, backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return softmax_cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                     reduction=self.reduction, label_smoothing=self.label_smoothing, backend=self.backend)

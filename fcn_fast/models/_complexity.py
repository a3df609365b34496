"""Parameter and FLOP counts of a model, from the shapes its convolutions see (run on the meta device: no memory,
no arithmetic)."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn


def conv_macs(conv: nn.Conv2d, out: torch.Tensor) -> int:
    """Multiply-accumulates of one convolution: every output element sums (C_in / groups) * kh * kw products."""
    kh, kw = conv.kernel_size
    return out.numel() * (conv.in_channels // conv.groups) * kh * kw


def complexity(name: str, size: Tuple[int, int] = (500, 500), num_classes: int = 21, **options) -> Dict[str, float]:
    """``{"params": …, "gflops": …}`` of ``build(name, num_classes, **options)`` on one 3 x H x W image.

    params counts parameters (not the fixed bilinear upsampling buffers); gflops is 2 x the multiply-accumulates of
    the convolutions (fc6/fc7 and the scorers included), the convention of the FCN and torchvision tables. The
    bilinear upsampling, pooling and activations are left out (under 0.1% of the total here).
    """
    from fcn_fast.models import build

    with torch.device("meta"):
        model = build(name, num_classes, **options).eval()
        x = torch.empty(1, 3, *size)
    macs = []
    hooks = [m.register_forward_hook(lambda m, args, out: macs.append(conv_macs(m, out)))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.coarse(x)
    for h in hooks:
        h.remove()
    return {"params": sum(p.numel() for p in model.parameters()), "gflops": 2 * sum(macs) / 1e9}

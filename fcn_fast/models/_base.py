"""What every FCN shares: the coarse-output contract, the Caffe bilinear deconvolution layer, input checks, and the
head logic that runs each skip fusion either fused (fcn_fast.upsample_add) or with plain PyTorch layers."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fcn_fast._validation import check_tensor, describe
from fcn_fast.ops._resample import bilinear_kernel
from fcn_fast.ops.upsample_add import upsample_add
from fcn_fast.ops.upsample_cross_entropy import upsample_argmax

INPUT_TRANSFORMS = ("caffe_bgr", "imagenet")


@dataclass
class CoarseOutput:
    """The score map at the input of a model's final upsampling, and the geometry that turns it into full-resolution
    logits of the input size: ``upsample_add(logits, factor=factor, mode=mode, out_size=out_size, offset=offset,
    align_corners=align_corners)``.

    Consumers that fuse the final upsampling with what follows take it as is:
    ``fcn_fast.nn.UpsampleCrossEntropyLoss()(coarse, target)`` (training: the full-resolution logits are never
    stored) and :meth:`argmax` (prediction).
    """

    logits: torch.Tensor  # (N, C, h, w)
    factor: int
    offset: Tuple[int, int]
    out_size: Tuple[int, int]
    mode: str  # "deconv" (Caffe's bilinear deconvolution + crop) or "interp" (F.interpolate)
    align_corners: bool = False

    def upsample(self, backend: Optional[str] = None) -> torch.Tensor:
        """The full-resolution logits, (N, C, H, W) with (H, W) = out_size."""
        return upsample_add(self.logits, factor=self.factor, mode=self.mode, out_size=self.out_size,
                            offset=self.offset, align_corners=self.align_corners, backend=backend)

    def argmax(self, dtype: torch.dtype = torch.int64, backend: Optional[str] = None) -> torch.Tensor:
        """The labels, (N, H, W), without storing the full-resolution logits."""
        return upsample_argmax(self.logits, factor=self.factor, mode=self.mode, out_size=self.out_size,
                               offset=self.offset, align_corners=self.align_corners, dtype=dtype, backend=backend)


def scaled(channels: int, width: float) -> int:
    """A layer's channel count under the width multiplier, at least 1."""
    return max(1, int(round(channels * width)))


class BilinearDeconv(nn.Module):
    """Caffe's ``Deconvolution`` layer of the FCN nets: a C×C transposed convolution with stride ``factor``, kernel
    ``2*factor - factor % 2``, no bias, bilinear on the diagonal.

    The weight has the Caffe shape (C, C, K, K) under the key ``<layer>.weight`` whether fixed or learnable, so that
    weights converted from the Caffe models, and state dicts of either kind, load unchanged. Fixed (the reference
    nets' ``lr_mult: 0``) it is a buffer: no optimizer sees it, it follows ``.to()``. Learnable it is a Parameter.
    """

    def __init__(self, channels: int, factor: int, learnable: bool = False) -> None:
        super().__init__()
        self.channels, self.factor, self.learnable = channels, factor, learnable
        weight = bilinear_kernel(channels, factor, diagonal=True)
        if learnable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)
        # The fused path computes the depthwise bilinear filter itself; it may stand in for this layer only while
        # the stored weight is that filter, which a load can change.
        self.is_bilinear = True
        self.register_load_state_dict_post_hook(BilinearDeconv._recheck)

    @staticmethod
    def _recheck(module: "BilinearDeconv", incompatible_keys) -> None:
        expected = bilinear_kernel(module.channels, module.factor, dtype=module.weight.dtype, diagonal=True)
        module.is_bilinear = bool(torch.allclose(module.weight.detach().cpu(), expected, rtol=1e-6, atol=1e-7))

    @property
    def exact(self) -> bool:
        """Whether ``fcn_fast.upsample_add(mode="deconv")`` computes exactly this layer."""
        return not self.learnable and self.is_bilinear

    @torch.no_grad()
    def reset_bilinear(self) -> None:
        self.weight.copy_(bilinear_kernel(self.channels, self.factor, dtype=self.weight.dtype, diagonal=True))
        self.is_bilinear = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.weight, stride=self.factor)

    def extra_repr(self) -> str:
        return f"{self.channels}, {self.channels}, factor={self.factor}, learnable={self.learnable}"


def _crop(x: torch.Tensor, offset: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    return x[:, :, offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]]


class FCN(nn.Module):
    """Base of the family. Subclasses implement ``coarse`` and name their backbone layers (``backbone_prefixes``)."""

    arch: str
    input_transform: str
    backbone_prefixes: Tuple[str, ...] = ()

    def __init__(self, arch: str, num_classes: int, fused: bool, input_transform: str) -> None:
        super().__init__()
        self.arch, self.num_classes, self.fused = arch, num_classes, fused
        self.input_transform = input_transform
        self.final_layer: Optional[str] = None  # name of the final BilinearDeconv (caffe geometry)
        self._warned_fallback = False

    # ---- input ---------------------------------------------------------------------------------------------------

    def _check_input(self, x) -> Tuple[int, int]:
        check_tensor(self.arch, "x", x, ndim=4)
        if x.shape[1] != 3:
            raise ValueError(f"{self.arch}: x must have 3 channels (N, 3, H, W), got {describe(x)}")
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"{self.arch}: x must have H, W >= 1, got {describe(x)}")
        dtype = self.input_conv.weight.dtype
        if x.dtype != dtype:
            raise TypeError(f"{self.arch}: x must have the model's dtype {dtype}, got {describe(x)}")
        return x.shape[2], x.shape[3]

    @property
    def input_conv(self) -> nn.Conv2d:
        """The first convolution (its dtype is the model's)."""
        raise NotImplementedError

    # ---- head ----------------------------------------------------------------------------------------------------

    def upsampling_layers(self) -> Dict[str, BilinearDeconv]:
        return {name: m for name, m in self.named_modules() if isinstance(m, BilinearDeconv)}

    def _uses_fused(self, layer: Optional[BilinearDeconv]) -> bool:
        if not self.fused:
            return False
        if layer is None or layer.exact:
            return True
        if not self._warned_fallback:
            self._warned_fallback = True
            inexact = [n for n, m in self.upsampling_layers().items() if not m.exact]
            warnings.warn(
                f"{self.arch}: upsampling layers {inexact} are learnable or were loaded with non-bilinear weights, "
                f"which the fused upsample_add (fixed depthwise bilinear) cannot compute: they run as plain "
                f"conv_transpose2d layers (the rest stays fused)", stacklevel=3)
        return False

    def _fuse(self, score: torch.Tensor, skip: torch.Tensor, layer: Optional[BilinearDeconv],
              skip_offset: Tuple[int, int]) -> torch.Tensor:
        """One skip fusion: upsample ``score`` x2 and add ``skip``. Caffe geometry (``layer`` given): the full
        deconvolution plus ``skip`` cropped at ``skip_offset``; same geometry (``layer`` None): bilinear
        interpolation to the skip's size."""
        if layer is None:
            size = (skip.shape[2], skip.shape[3])
            if self.fused:
                return upsample_add(score, skip, factor=2, mode="interp", out_size=size)
            return F.interpolate(score, size=size, mode="bilinear", align_corners=False) + skip
        if self._uses_fused(layer):
            return upsample_add(score, skip, factor=layer.factor, mode="deconv", skip_offset=skip_offset)
        up = layer(score)
        return up + _crop(skip, skip_offset, up.shape[2:])

    def _coarse_output(self, score: torch.Tensor, factor: int, offset: Tuple[int, int],
                       out_size: Tuple[int, int]) -> CoarseOutput:
        layer = getattr(self, self.final_layer) if self.final_layer else None
        if layer is None:
            return CoarseOutput(score, factor, (0, 0), out_size, "interp", False)
        if layer.exact:
            return CoarseOutput(score, factor, offset, out_size, "deconv", False)
        if self.fused:
            self._uses_fused(layer)  # the one-time warning
        # A learned final upsampling is no bilinear resampling: hand consumers the full logits with the identity
        # geometry (factor 1 is a 1x1 deconvolution of weight 1), so every consumer stays correct.
        return CoarseOutput(_crop(layer(score), offset, out_size), 1, (0, 0), out_size, "deconv", False)

    def coarse(self, x: torch.Tensor) -> CoarseOutput:
        """The coarse score map and its geometry (see :class:`CoarseOutput`)."""
        raise NotImplementedError

    # ---- outputs -------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution logits, (N, num_classes, H, W) for an (N, 3, H, W) input."""
        out = self.coarse(x)
        if out.factor == 1:
            return out.logits
        if self.fused:
            return out.upsample()
        if out.mode == "interp":
            return F.interpolate(out.logits, size=out.out_size, mode="bilinear", align_corners=out.align_corners)
        return _crop(getattr(self, self.final_layer)(out.logits), out.offset, out.out_size)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Labels, int64 (N, H, W) (no gradient)."""
        with torch.no_grad():
            if self.fused:
                return self.coarse(x).argmax()
            return self.forward(x).argmax(1)

    # ---- training regimes ----------------------------------------------------------------------------------------

    def backbone_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.split(".")[0] in self.backbone_prefixes]

    def head_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.split(".")[0] not in self.backbone_prefixes]

    def freeze_backbone(self) -> "FCN":
        """Classifier-only fine-tuning (the paper's "fine-tune the output classifier alone"): the ImageNet layers
        keep their weights (and batch-norm statistics); only the scorers (and learnable upsampling) train."""
        for p in self.backbone_parameters():
            p.requires_grad_(False)
        self.frozen_backbone = True
        return self.train(self.training)

    def train(self, mode: bool = True) -> "FCN":
        super().train(mode)
        if getattr(self, "frozen_backbone", False):
            for name, m in self.named_modules():
                if name.split(".")[0] in self.backbone_prefixes and isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, fused={self.fused}, input_transform={self.input_transform!r}"

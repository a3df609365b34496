"""VGG16 FCN-32s, FCN-16s, FCN-8s and FCN-8s at-once, as the reference Caffe nets of Long, Shelhamer & Darrell
(github.com/shelhamer/fcn.berkeleyvision.org, voc-fcn*s/net.py), plus the ``geometry="same"`` variant."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fcn_fast.models._base import FCN, BilinearDeconv, CoarseOutput, scaled
from fcn_fast.ops._resample import deconv_kernel_size

# VGG16's convolution blocks (channels of each 3x3 conv); a 2x2/2 max pool ends each block.
VGG16_BLOCKS: Tuple[Tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
FC_CHANNELS = 4096
CONV1_PAD_CAFFE = 100  # lets any input, even 1x1, survive five pools and the valid 7x7 fc6

# stride -> (upsampling factors, coarse to fine, with their Caffe layer names); the skips are pool4 then pool3.
HEADS: Dict[int, Tuple[Tuple[str, int], ...]] = {
    32: (("upscore", 32),),
    16: (("upscore2", 2), ("upscore16", 16)),
    8: (("upscore2", 2), ("upscore_pool4", 2), ("upscore8", 8)),
}
SKIPS = (("score_pool4", "pool4", 512), ("score_pool3", "pool3", 256))
ATONCE_SCALES = {"pool4": 0.01, "pool3": 0.0001}  # voc-fcn8s-atonce: keeps the skips from swamping fc7 early on


def conv_names() -> List[str]:
    return [f"conv{b + 1}_{i + 1}" for b, block in enumerate(VGG16_BLOCKS) for i in range(len(block))]


# ---- Caffe crop arithmetic ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CoordMap:
    """Caffe's coord_map: a blob position p sits at data coordinate ``scale * p + shift`` (the centre of its
    receptive field, for deconvolutions the position that maps back to the input's)."""

    scale: Fraction
    shift: Fraction

    def conv(self, kernel: int, stride: int = 1, pad: int = 0) -> "CoordMap":
        # output o reads input stride*o - pad ... + kernel - 1: centre stride*o + (kernel - 1)/2 - pad
        return CoordMap(self.scale * stride, self.scale * (Fraction(kernel - 1, 2) - pad) + self.shift)

    def deconv(self, kernel: int, stride: int) -> "CoordMap":
        # the inverse of the conv map: input i = (o - (kernel - 1)/2) / stride
        return CoordMap(self.scale / stride, self.shift - self.scale * Fraction(kernel - 1, 2 * stride))

    def crop_offset(self, reference: "CoordMap") -> int:
        """Where a crop of this blob to ``reference``'s size starts, so that the two align (Caffe's Crop layer)."""
        if self.scale != reference.scale:
            raise AssertionError(f"crop between blobs of strides {self.scale} and {reference.scale}")
        offset = (reference.shift - self.shift) / self.scale
        if offset.denominator != 1 or offset < 0:
            raise AssertionError(f"misaligned crop: offset {offset}")
        return int(offset)


def caffe_crops(stride: int) -> Tuple[List[int], int]:
    """The crop offsets of the reference nets, derived from the layer arithmetic: (skip offsets, coarse to fine;
    final offset). FCN-32s: ([], 19); FCN-16s: ([5], 27); FCN-8s: ([5, 9], 31)."""
    data = CoordMap(Fraction(1), Fraction(0))
    m = data.conv(3, pad=CONV1_PAD_CAFFE)  # conv1_1; the other 3x3 convs (pad 1) keep the map
    pools = []
    for _ in VGG16_BLOCKS:
        m = m.conv(2, stride=2)
        pools.append(m)
    m = m.conv(7)  # fc6 (fc7 and the scorers are 1x1)
    skips = []
    for (_, factor), (_, pool, _) in zip(HEADS[stride][:-1], SKIPS):
        m = m.deconv(deconv_kernel_size(factor), factor)
        skips.append(pools[{"pool4": 3, "pool3": 2}[pool]].crop_offset(m))
    factor = HEADS[stride][-1][1]
    m = m.deconv(deconv_kernel_size(factor), factor)
    return skips, m.crop_offset(data)


# ---- the network -------------------------------------------------------------------------------------------------

class Scale(nn.Module):
    """Caffe's fixed ``Scale`` layer (``lr_mult: 0``) of FCN-8s at-once: a per-channel constant, kept as a buffer
    under the Caffe key ``scale_poolN.weight``."""

    def __init__(self, channels: int, value: float) -> None:
        super().__init__()
        self.register_buffer("weight", torch.full((channels,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1)


class VGGFCN(FCN):
    """FCN-32s / 16s / 8s / 8s at-once on VGG16 (built by :func:`fcn_fast.models.build`)."""

    backbone_prefixes = tuple(conv_names()) + ("fc6", "fc7")

    def __init__(self, arch: str, num_classes: int, stride: int, *, atonce: bool = False, fused: bool = True,
                 width: float = 1.0, geometry: str = "caffe", learnable_upsample: bool = False,
                 dropout: float = 0.5) -> None:
        super().__init__(arch, num_classes, fused, "caffe_bgr")
        self.stride, self.atonce, self.geometry = stride, atonce, geometry
        caffe = geometry == "caffe"
        in_ch = 3
        for name, out in zip(conv_names(), (c for block in VGG16_BLOCKS for c in block)):
            pad = CONV1_PAD_CAFFE if (name == "conv1_1" and caffe) else 1
            setattr(self, name, nn.Conv2d(in_ch, scaled(out, width), 3, padding=pad))
            in_ch = scaled(out, width)
        fc = scaled(FC_CHANNELS, width)
        self.fc6 = nn.Conv2d(in_ch, fc, 7, padding=0 if caffe else 3)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.drop7 = nn.Dropout(dropout)
        self.score_fr = nn.Conv2d(fc, num_classes, 1)
        heads = HEADS[stride]
        self.skips = [skip for skip, _ in zip(SKIPS, heads[:-1])]
        for score, pool, channels in self.skips:
            if atonce:
                setattr(self, f"scale_{pool}", Scale(scaled(channels, width), ATONCE_SCALES[pool]))
            setattr(self, score, nn.Conv2d(scaled(channels, width), num_classes, 1))
        self.upsample_names: List[Optional[str]] = [None] * len(heads)
        if caffe:
            for name, factor in heads:
                setattr(self, name, BilinearDeconv(num_classes, factor, learnable_upsample))
            self.upsample_names = [name for name, _ in heads]
            self.final_layer = heads[-1][0]
            self.skip_offsets, self.final_offset = caffe_crops(stride)
        else:
            self.skip_offsets, self.final_offset = [0] * len(self.skips), 0
        self.final_factor = heads[-1][1]
        self.reset_parameters()

    @property
    def input_conv(self) -> nn.Conv2d:
        return self.conv1_1

    def reset_parameters(self) -> None:
        """Random VGG layers (He init, as torchvision's VGG), zero scorers (the paper: zero-initialised class
        scoring layers; random init gave no better results), bilinear upsampling."""
        for name in self.backbone_prefixes:
            conv = getattr(self, name)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for name in ["score_fr"] + [score for score, _, _ in self.skips]:
            nn.init.zeros_(getattr(self, name).weight)
            nn.init.zeros_(getattr(self, name).bias)
        for layer in self.upsampling_layers().values():
            layer.reset_bilinear()

    def _features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        pools = {}
        names = iter(conv_names())
        for b, block in enumerate(VGG16_BLOCKS):
            for _ in block:
                x = F.relu(getattr(self, next(names))(x), inplace=True)
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            pools[f"pool{b + 1}"] = x
        return pools

    def _score_skip(self, score: str, pool: str, x: torch.Tensor) -> torch.Tensor:
        conv = getattr(self, score)
        if not self.atonce:
            return conv(x)
        scale = getattr(self, f"scale_{pool}").weight
        if self.fused:
            # The scale folded into the scorer's (classes x channels) weight: the same product, without a pass
            # over the pool4/pool3 activations.
            return F.conv2d(x, conv.weight * scale.view(1, -1, 1, 1), conv.bias)
        return conv(getattr(self, f"scale_{pool}")(x))

    def coarse(self, x: torch.Tensor) -> CoarseOutput:
        out_size = self._check_input(x)
        pools = self._features(x)
        h = self.drop6(F.relu(self.fc6(pools["pool5"]), inplace=True))
        h = self.drop7(F.relu(self.fc7(h), inplace=True))
        score = self.score_fr(h)
        for i, (score_name, pool, _) in enumerate(self.skips):
            layer = getattr(self, self.upsample_names[i]) if self.upsample_names[i] else None
            offset = self.skip_offsets[i]
            score = self._fuse(score, self._score_skip(score_name, pool, pools[pool]), layer, (offset, offset))
        return self._coarse_output(score, self.final_factor, (self.final_offset, self.final_offset), out_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, geometry={self.geometry!r}"


def torchvision_vgg16_keys() -> Dict[str, str]:
    """torchvision ``vgg16`` state-dict key -> this model's key (``features.N`` convs, ``classifier.0/3`` the
    Linear layers that become fc6/fc7; ``classifier.6``, the ImageNet scorer, has no counterpart)."""
    keys, index = {}, 0
    names = iter(conv_names())
    for block in VGG16_BLOCKS:
        for _ in block:
            name = next(names)
            keys[f"features.{index}.weight"], keys[f"features.{index}.bias"] = f"{name}.weight", f"{name}.bias"
            index += 2  # conv, ReLU
        index += 1  # MaxPool
    for linear, fc in (("classifier.0", "fc6"), ("classifier.3", "fc7")):
        keys[f"{linear}.weight"], keys[f"{linear}.bias"] = f"{fc}.weight", f"{fc}.bias"
    return keys

"""ResNet-50 FCN-8s: torchvision's ResNet-50 (v1.5: stride on the 3x3 conv) written out here, with torchvision's
parameter names so its ImageNet state dicts load, and an FCN-8s head on layer4/layer3/layer2 (strides 32/16/8)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fcn_fast.models._base import FCN, CoarseOutput, scaled

LAYERS = (3, 4, 6, 3)  # bottleneck blocks of layer1..layer4
PLANES = (64, 128, 256, 512)
EXPANSION = 4


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        return F.relu(self.bn3(self.conv3(out)) + identity, inplace=True)


def _layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes * EXPANSION:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(planes * EXPANSION))
    layers = [Bottleneck(inplanes, planes, stride, downsample)]
    layers += [Bottleneck(planes * EXPANSION, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNetFCN8s(FCN):
    """FCN-8s on ResNet-50: 1x1 scorers on layer4, layer3, layer2, fused x2 upsample+add in interp mode to each
    skip's size, x8 bilinear interpolation to the input (built by :func:`fcn_fast.models.build`)."""

    backbone_prefixes = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, arch: str, num_classes: int, *, fused: bool = True, width: float = 1.0) -> None:
        super().__init__(arch, num_classes, fused, "imagenet")
        stem = scaled(64, width)
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        inplanes = stem
        for i, (blocks, planes) in enumerate(zip(LAYERS, PLANES)):
            planes = scaled(planes, width)
            setattr(self, f"layer{i + 1}", _layer(inplanes, planes, blocks, 1 if i == 0 else 2))
            inplanes = planes * EXPANSION
        tap = lambda i: scaled(PLANES[i], width) * EXPANSION  # noqa: E731
        self.score_layer4 = nn.Conv2d(tap(3), num_classes, 1)
        self.score_layer3 = nn.Conv2d(tap(2), num_classes, 1)
        self.score_layer2 = nn.Conv2d(tap(1), num_classes, 1)
        self.reset_parameters()

    @property
    def input_conv(self) -> nn.Conv2d:
        return self.conv1

    def reset_parameters(self) -> None:
        """torchvision's ResNet init for the backbone, zero scorers (as the VGG FCNs)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for score in (self.score_layer4, self.score_layer3, self.score_layer2):
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)

    def coarse(self, x: torch.Tensor) -> CoarseOutput:
        out_size = self._check_input(x)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.max_pool2d(x, 3, 2, 1)
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        score = self._fuse(self.score_layer4(c4), self.score_layer3(c3), None, (0, 0))
        score = self._fuse(score, self.score_layer2(c2), None, (0, 0))
        return self._coarse_output(score, 8, (0, 0), out_size)


def torchvision_resnet50_keys(model: ResNetFCN8s) -> dict:
    """torchvision ``resnet50`` state-dict key -> this model's key: the same names (``fc``, the ImageNet scorer,
    has no counterpart)."""
    return {k: k for k in model.state_dict() if k.split(".")[0] in ResNetFCN8s.backbone_prefixes}

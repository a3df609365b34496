"""Input normalisation (chosen by a model's ``input_transform``), training augmentation, and batching."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fcn_fast.data.palette import IGNORE_INDEX

# The Caffe VGG16 mean, in BGR order, on 0..255 pixels (the FCN reference nets subtract it from BGR images).
CAFFE_BGR_MEAN = (104.00699, 116.66877, 122.67892)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_TRANSFORMS = ("caffe_bgr", "imagenet")


def normalize(image: np.ndarray, kind: str) -> torch.Tensor:
    """(H, W, 3) uint8 RGB to a (3, H, W) float32 network input: ``caffe_bgr`` (BGR 0..255 minus the Caffe mean)
    for the VGG16 FCNs, ``imagenet`` (RGB 0..1, ImageNet mean and std) for the ResNet one. A pixel equal to the mean
    maps to 0, which is what padding adds."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
    if kind == "caffe_bgr":
        return x.flip(0) - torch.tensor(CAFFE_BGR_MEAN).view(3, 1, 1)
    if kind == "imagenet":
        return (x / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    raise ValueError(f"input_transform must be one of {INPUT_TRANSFORMS}, got {kind!r}")


@dataclass(frozen=True)
class Augment:
    """Random scale (bilinear image, nearest label), crop (padding with 0 = the mean, and the ignore label) and
    horizontal flip, drawn from a per-sample generator so that a run is reproducible and resumable."""

    scale: Optional[Tuple[float, float]] = None
    crop: Optional[int] = None
    flip: bool = False

    def __bool__(self) -> bool:
        return self.scale is not None or self.crop is not None or self.flip

    def __call__(self, image: torch.Tensor, label: torch.Tensor, gen: torch.Generator):
        if self.scale is not None:
            lo, hi = self.scale
            s = lo + (hi - lo) * torch.rand((), generator=gen).item()
            h, w = label.shape
            size = (max(1, round(h * s)), max(1, round(w * s)))
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
            label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        if self.crop is not None:
            c = self.crop
            h, w = label.shape
            ph, pw = max(0, c - h), max(0, c - w)
            if ph or pw:
                image = F.pad(image, (0, pw, 0, ph), value=0.0)
                label = F.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
            h, w = label.shape
            y = int(torch.randint(0, h - c + 1, (), generator=gen))
            x = int(torch.randint(0, w - c + 1, (), generator=gen))
            image, label = image[:, y:y + c, x:x + c], label[y:y + c, x:x + c]
        if self.flip and torch.rand((), generator=gen).item() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return image.contiguous(), label.contiguous()


def pad_batch(images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack images of different sizes, padding bottom/right with 0 (the mean) and labels with the ignore index,
    so padding never counts in the loss or the metrics."""
    h = max(int(t.shape[-2]) for t in labels)
    w = max(int(t.shape[-1]) for t in labels)
    x = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    y = labels[0].new_full((len(labels), h, w), IGNORE_INDEX)
    for i, (im, lab) in enumerate(zip(images, labels)):
        x[i, :, :im.shape[-2], :im.shape[-1]] = im
        y[i, :lab.shape[-2], :lab.shape[-1]] = lab
    return x, y


def collate(batch: List[tuple]):
    """DataLoader collate: (images (N, 3, H, W), labels (N, H, W) int64, ids); whole images at batch 1."""
    images, labels, ids = zip(*batch)
    x, y = pad_batch(images, labels)
    return x, y, list(ids)

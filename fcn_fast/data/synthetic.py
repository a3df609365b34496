"""The synthetic data set: coloured shapes, some with thin parts (rings, bars, crosses), on textured backgrounds,
with exact labels, written in the PASCAL VOC layout so that every command works without a download.

Each image depends only on (seed, index): the set is the same on every machine and for any number of images.
Boundaries are pixel-exact and the thin parts are a few pixels wide, finer than the 32-pixel stride of FCN-32s's
output, so FCN-16s and FCN-8s have edges to win on.
"""

from __future__ import annotations

import os
import shutil
from typing import Tuple

import numpy as np
from PIL import Image

from fcn_fast.data.palette import label_image
from fcn_fast.errors import UserError

CLASSES = ("background", "disc", "ring", "bar", "triangle", "cross")
# Each class has a hue (jittered per shape); the background is kept unsaturated so colour separates the two, while
# telling a ring from a disc of similar hue needs shape, and every thin part needs fine localisation.
_COLOURS = np.array([(0, 0, 0), (215, 60, 50), (50, 165, 70), (45, 95, 215), (225, 195, 35), (185, 65, 195)],
                    dtype=np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grey = rng.uniform(60, 190)
    tint = rng.uniform(-12, 12, 3)
    gx, gy = rng.uniform(-0.6, 0.6, 2)
    img = grey + tint + (gx * (xx - w / 2) + gy * (yy - h / 2))[..., None]
    # Stripes at a random angle and period, a texture the net must learn to see through.
    theta, period = rng.uniform(0, np.pi), rng.uniform(4, 14)
    stripes = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period)
    img = img + rng.uniform(5, 25) * stripes[..., None]
    return img + rng.normal(0, 6, (h, w, 3))


def _rotated(xx, yy, cx, cy, angle):
    c, s = np.cos(angle), np.sin(angle)
    return (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c


def _shape_mask(cls: int, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    size = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    cy, cx = rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)
    angle = rng.uniform(0, np.pi)
    d2 = (xx - cx) ** 2 + (yy - cy) ** 2
    if cls == 1:  # disc
        r = rng.uniform(0.08, 0.2) * size
        return d2 < r * r
    if cls == 2:  # ring: a thin annulus
        r = rng.uniform(0.12, 0.26) * size
        t = rng.uniform(0.035, 0.06) * size
        return (d2 < r * r) & (d2 >= (r - t) ** 2)
    u, v = _rotated(xx, yy, cx, cy, angle)
    if cls == 3:  # bar: a long thin rectangle
        length, width = rng.uniform(0.35, 0.75) * size, rng.uniform(0.035, 0.07) * size
        return (np.abs(u) < length / 2) & (np.abs(v) < width / 2)
    if cls == 4:  # triangle
        r = rng.uniform(0.12, 0.25) * size
        mask = np.ones((h, w), dtype=bool)
        for k in range(3):
            a = angle + 2 * np.pi * k / 3
            mask &= (u * np.cos(a) + v * np.sin(a)) < r / 2
        return mask
    # cross: two thin bars
    arm, width = rng.uniform(0.15, 0.3) * size, rng.uniform(0.04, 0.08) * size
    return ((np.abs(u) < arm) & (np.abs(v) < width / 2)) | ((np.abs(v) < arm) & (np.abs(u) < width / 2))


def render(seed: int, index: int, size: Tuple[int, int] = (96, 96)) -> Tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of the set ``seed``: (H, W, 3) uint8 RGB and its exact (H, W) uint8 label."""
    h, w = size
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    img = _background(rng, h, w)
    label = np.zeros((h, w), dtype=np.uint8)
    for _ in range(rng.integers(2, 6)):
        cls = int(rng.integers(1, len(CLASSES)))
        mask = _shape_mask(cls, rng, h, w)
        colour = _COLOURS[cls] + rng.normal(0, 12, 3)
        shade = 1 + rng.uniform(0.05, 0.2) * rng.standard_normal((h, w, 1))
        img[mask] = (colour * shade)[mask]
        label[mask] = cls
    return np.clip(img, 0, 255).round().astype(np.uint8), label


def make_synthetic(root: str, *, train: int = 200, val: int = 50, size: Tuple[int, int] = (96, 96),
                   seed: int = 0) -> str:
    """Write the synthetic set to ``root`` (which must not exist, or be empty) in the VOC layout: JPEGImages/*.png,
    SegmentationClass/*.png (VOC palette), ImageSets/Segmentation/{train,val,trainval}.txt, class_names.txt.
    Written into a temporary folder that is renamed into place when complete."""
    if train < 1 or val < 1:
        raise UserError(f"the synthetic set needs at least one train and one val image, got train={train}, val={val}")
    if min(size) < 8:
        raise UserError(f"synthetic image size {size[0]}x{size[1]} is too small (at least 8x8)")
    root = os.path.abspath(root)
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise UserError(f"{root} already exists and is not empty; choose a new folder")
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = f"{root}.partial{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
            os.makedirs(os.path.join(tmp, sub))
        ids = [f"syn_{i:06d}" for i in range(train + val)]
        for i, name in enumerate(ids):
            image, label = render(seed, i, size)
            # PNG images, not JPEG: lossless, so the pixels at every border are exactly those the label describes.
            Image.fromarray(image).save(os.path.join(tmp, "JPEGImages", name + ".png"))
            label_image(label).save(os.path.join(tmp, "SegmentationClass", name + ".png"))
        sets = os.path.join(tmp, "ImageSets", "Segmentation")
        for split, names in (("train", ids[:train]), ("val", ids[train:]), ("trainval", ids)):
            with open(os.path.join(sets, split + ".txt"), "w") as f:
                f.write("\n".join(names) + "\n")
        with open(os.path.join(tmp, "class_names.txt"), "w") as f:
            f.write("\n".join(CLASSES) + "\n")
        if os.path.isdir(root):
            os.rmdir(root)
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root

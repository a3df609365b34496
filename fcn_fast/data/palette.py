"""Label images: the PASCAL VOC colour map, reading and writing index ("palette") PNGs, colour overlays."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from fcn_fast.errors import UserError

IGNORE_INDEX = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_colormap(n: int = 256) -> np.ndarray:
    """The VOC colour map, (n, 3) uint8: the bits of the class index spread over the high bits of R, G and B."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


VOC_PALETTE = voc_colormap()


def read_label(path: str) -> np.ndarray:
    """A label PNG as (H, W) uint8 class indices. Palette ("P") and greyscale PNGs hold indices directly; a colour
    PNG would need its colours mapped back, which is ambiguous, so it is refused."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise UserError(f"label {path} is a {im.mode} image; labels must be palette or greyscale PNGs of "
                                f"class indices")
            arr = np.asarray(im)
    except (OSError, SyntaxError) as exc:
        raise UserError(f"cannot read label {path}: {exc}") from None
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise UserError(f"label {path} has values outside 0..255")
        arr = arr.astype(np.uint8)
    return arr


def read_image(path: str) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None


def label_image(label: np.ndarray) -> Image.Image:
    """A palette PIL image of (H, W) class indices with the VOC colour map."""
    im = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="P")
    im.putpalette(VOC_PALETTE.tobytes())
    return im


def colorize(label: np.ndarray) -> np.ndarray:
    """(H, W) indices to (H, W, 3) uint8 VOC colours."""
    return VOC_PALETTE[np.asarray(label, dtype=np.uint8)]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5,
            ignore_index: Optional[int] = IGNORE_INDEX) -> np.ndarray:
    """The image blended with the label colours (background and ignored pixels left as they are)."""
    label = np.asarray(label)
    colour = colorize(label).astype(np.float32)
    out = image.astype(np.float32)
    mask = label != 0
    if ignore_index is not None:
        mask &= label != ignore_index
    out[mask] = (1 - alpha) * out[mask] + alpha * colour[mask]
    return out.round().astype(np.uint8)


def save_atomic(image: Image.Image, path: str) -> None:
    """Write an image so that the path holds either nothing or the complete file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        image.save(tmp, format=_format(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(ext, "PNG")


def read_class_names(path: str) -> Sequence[str]:
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise UserError(f"{path} lists no class names")
    if len(names) > 255:
        raise UserError(f"{path} lists {len(names)} classes; at most 255 fit in 8-bit labels beside 255 = ignore")
    return tuple(names)

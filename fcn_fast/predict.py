"""Prediction (``fcn-fast predict``): label images of any size with a trained model, through the fused
upsample-argmax head (``model.predict``), and write palette PNG labels and colour overlays."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from fcn_fast.data import label_image, normalize, overlay, read_image
from fcn_fast.data.palette import save_atomic
from fcn_fast.errors import UserError
from fcn_fast.evaluate import AMP_DTYPES, autocast, resolve_device


@torch.no_grad()
def predict_image(model, image: np.ndarray, *, device: torch.device, amp: Optional[str] = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB to (H, W) uint8 labels."""
    x = normalize(image, model.input_transform)[None].to(device)
    with autocast(device, amp):
        return model.predict(x)[0].to(torch.uint8).cpu().numpy()


def predict_files(model, paths: Sequence[str], out: str, *, device: torch.device, amp: Optional[str] = None,
                  alpha: float = 0.5) -> List[str]:
    """Write ``<out>/<stem>.png`` (labels, VOC palette) and ``<out>/<stem>_overlay.png`` for every image. All
    inputs are checked before anything is written; each output file is written atomically."""
    stems = {}
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"image {path} does not exist")
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            raise UserError(f"images {stems[stem]} and {path} would both be written as {stem}.png")
        stems[stem] = path
    for path in paths:
        try:
            with Image.open(path) as im:
                im.verify()
        except (OSError, SyntaxError) as exc:
            raise UserError(f"cannot read image {path}: {exc}") from None
    os.makedirs(out, exist_ok=True)
    written = []
    model.eval()
    for stem, path in stems.items():
        image = read_image(path)
        labels = predict_image(model, image, device=device, amp=amp)
        target = os.path.join(out, stem + ".png")
        save_atomic(label_image(labels), target)
        save_atomic(Image.fromarray(overlay(image, labels, alpha=alpha)), os.path.join(out, stem + "_overlay.png"))
        written.append(target)
    return written


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", help="image files (any size, any format PIL reads)")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by fcn-fast train")
    p.add_argument("--out", required=True, help="output folder for <name>.png labels and <name>_overlay.png")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--path", choices=("fused", "reference"), default="fused",
                   help="fused upsample-argmax head or the plain PyTorch one (default: fused)")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default=None, help="autocast dtype (GPU)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default: 0.5)")


def main(args) -> List[str]:
    from fcn_fast.checkpoint import model_from_checkpoint

    if not 0 <= args.alpha <= 1:
        raise UserError(f"--alpha must be in [0, 1], got {args.alpha}")
    device = resolve_device(args.device)
    model, ckpt = model_from_checkpoint(args.checkpoint, device=device, override={"fused": args.path == "fused"})
    written = predict_files(model, args.images, args.out, device=device, amp=args.amp, alpha=args.alpha)
    print(f"{ckpt['model']['name']}: wrote {len(written)} label PNGs and overlays to {args.out}")
    return written

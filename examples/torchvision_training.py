"""A torchvision segmentation training loop, converted to fcn_fast's fused head with one call.

The loop is torchvision's references/segmentation/train.py in miniature (SGD, poly learning rate, the aux head's
loss weighted 0.5). The conversion is two lines, marked "fcn_fast": ``fuse(model)`` and the criterion.

    python examples/torchvision_training.py --model deeplabv3_resnet50 --steps 20 --size 256
    python examples/torchvision_training.py --original ...      # the same loop without fcn_fast, to compare

Data: fcn_fast's synthetic set (coloured shapes with exact labels, rendered in memory), so nothing is downloaded;
the model starts from random weights (weights=None).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models import segmentation

from fcn_fast.data import normalize
from fcn_fast.data.synthetic import CLASSES, render
from fcn_fast.integrations import SegmentationLoss, fuse


def batch(step: int, size: int, n: int, seed: int):
    """n synthetic images (ImageNet-normalised, as torchvision's models expect) and their labels."""
    pairs = [render(seed, step * n + i, (size, size)) for i in range(n)]
    images = torch.stack([normalize(image, "imagenet") for image, _ in pairs])
    labels = torch.from_numpy(np.stack([label for _, label in pairs]).astype(np.int64))
    return images, labels


def reference_criterion(inputs, target):
    """torchvision's reference criterion, for --original."""
    losses = {name: F.cross_entropy(x, target, ignore_index=255) for name, x in inputs.items()}
    return losses["out"] if len(losses) == 1 else losses["out"] + 0.5 * losses["aux"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deeplabv3_mobilenet_v3_large",
                   help="a torchvision.models.segmentation builder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--size", type=int, default=128, help="square image size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--original", action="store_true", help="run the unconverted loop (no fcn_fast)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    kwargs = dict(weights=None, weights_backbone=None, num_classes=len(CLASSES))
    if not args.model.startswith("lraspp"):
        kwargs["aux_loss"] = True
    model = getattr(segmentation, args.model)(**kwargs).to(device)
    criterion = reference_criterion
    if not args.original:
        model = fuse(model)                      # fcn_fast: train mode returns coarse logits + their geometry
        criterion = SegmentationLoss(ignore_index=255, aux_weight=0.5)   # fcn_fast: upsampling fused into the loss

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / args.steps) ** 0.9)

    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        images, target = batch(step, args.size, args.batch_size, args.seed)
        output = model(images.to(device))
        loss = criterion(output, target.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}", flush=True)
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s "
          f"({'original' if args.original else 'fcn_fast.integrations.fuse'})")

    model.eval()
    images, target = batch(10_000, args.size, args.batch_size, args.seed + 1)
    with torch.no_grad():
        if args.original:
            labels = model(images.to(device))["out"].argmax(1)
        else:
            labels = model.predict(images.to(device))     # fcn_fast.upsample_argmax: no full-resolution logits
    accuracy = (labels.cpu() == target).float().mean().item()
    print(f"pixel accuracy on {args.batch_size} held-out images: {accuracy:.3f}")


if __name__ == "__main__":
    main()

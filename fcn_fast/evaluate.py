"""Evaluation: run a model over a split and score it (``fcn-fast eval``)."""

from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch
from tqdm import tqdm

from fcn_fast.data import make_loader, open_dataset, shard
from fcn_fast.errors import UserError
from fcn_fast.metrics import ConfusionMatrix, format_table
from fcn_fast.runlog import write_json

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: Optional[str]):
    """The autocast context of ``--amp`` (a no-op without it)."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is a GPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available")
    return device


@torch.no_grad()
def evaluate(model, dataset, *, device: torch.device, batch_size: int = 1, workers: int = 0, rank: int = 0,
             world: int = 1, amp: Optional[str] = None, progress: bool = False) -> Dict[str, object]:
    """Metrics of ``model`` on ``dataset`` (see fcn_fast.metrics): every image once over all processes, counted
    into a confusion matrix on the device (summed over processes when ``world > 1``)."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(dataset.num_classes, device=device)
    loader = make_loader(dataset, batch_size=batch_size, sampler=shard(len(dataset), rank, world), workers=workers,
                         pin_memory=device.type == "cuda")
    for x, y, _ in tqdm(loader, desc="eval", leave=False, disable=not progress, dynamic_ncols=True):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            pred = model.predict(x)
        cm.update(pred, y)
    if world > 1:
        cm.all_reduce()
    model.train(was_training)
    return cm.compute()


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="checkpoint written by fcn-fast train (e.g. RUN/checkpoints/best.pt)")
    p.add_argument("--data", required=True, help="data set folder (VOC layout, SBD, or image/label pairs)")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=1, help="images per batch, padded (default: 1, whole images)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--path", choices=("fused", "reference"), default="fused",
                   help="fused upsample-argmax head or the plain PyTorch one (default: fused)")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default=None, help="autocast dtype (GPU)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> Dict[str, object]:
    from fcn_fast.checkpoint import model_from_checkpoint

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = resolve_device(args.device)
    model, ckpt = model_from_checkpoint(args.checkpoint, device=device,
                                        override={"fused": args.path == "fused"})
    dataset = open_dataset(args.data, args.split, input_transform=model.input_transform)
    if dataset.num_classes != model.num_classes:
        raise UserError(f"checkpoint {args.checkpoint} predicts {model.num_classes} classes but {args.data} has "
                        f"{dataset.num_classes}")
    result = evaluate(model, dataset, device=device, batch_size=args.batch_size, workers=args.workers, amp=args.amp,
                      progress=not args.no_progress)
    print(f"{ckpt['model']['name']} on split {args.split!r} of {args.data} ({len(dataset)} images)")
    print(format_table(result, dataset.class_names))
    if args.json_out:
        write_json(args.json_out, {"checkpoint": args.checkpoint, "data": args.data, "split": args.split,
                                   "class_names": list(dataset.class_names), **result})
    return result

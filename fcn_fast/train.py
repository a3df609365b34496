"""Training (``fcn-fast train``): whole-image training of any model of the family, the staged FCN-32s -> 16s -> 8s
recipe, exact resume, and many GPUs through torchrun.

The paper's recipe (Long, Shelhamer & Darrell; the reference solvers of fcn.berkeleyvision.org) is the default:
SGD, momentum 0.99, weight decay 5e-4, batch 1 (whole images), the per-pixel loss *summed* over the image
("unnormalised"), a fixed learning rate of 1e-10 (FCN-32s), 1e-12 (FCN-16s from FCN-32s), 1e-14 (FCN-8s from
FCN-16s). The loss runs fused with the final upsampling (``UpsampleCrossEntropyLoss`` on ``model.coarse(x)``: the
full-resolution logits are never stored) unless ``--path reference`` asks for the plain PyTorch path.

Reproducibility: the model init, data order, augmentation and dropout depend only on ``--seed``; a checkpoint holds
the model, optimiser, grad scaler, step, history and every process's RNG states, and the learning rate is a function
of the step, so ``--resume`` continues exactly where the last checkpoint was taken. Data order and augmentation are
functions of (seed, epoch, index), so a resumed epoch starts at the right image without replaying the others.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from fcn_fast.checkpoint import FORMAT, load_checkpoint, model_from_checkpoint, model_spec, save_atomic
from fcn_fast.data import (IGNORE_INDEX, Augment, ResumableSampler, class_names_of, make_loader, make_synthetic,
                           open_dataset)
from fcn_fast.errors import UserError
from fcn_fast.evaluate import AMP_DTYPES, autocast, evaluate, resolve_device
from fcn_fast.runlog import RunFolder, write_json

# Learning rates of the reference solvers for the summed ("unnormalised") loss at batch 1.
PAPER_LR = {"fcn32s": 1e-10, "fcn16s": 1e-12, "fcn8s": 1e-14, "fcn8s_atonce": 1e-10}
SCHEDULES = ("fixed", "poly", "cosine")
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    out: str
    data: Optional[str] = None  # None: the synthetic set, made in <out>/data
    split: str = "train"
    val_split: Optional[str] = "val"  # None: no evaluation
    model: str = "fcn32s"
    num_classes: Optional[int] = None  # None: the data set's
    width: float = 1.0
    geometry: Optional[str] = None
    learnable_upsample: bool = False
    dropout: float = 0.5
    path: str = "fused"  # fused: fused head and loss; reference: plain PyTorch layers and F.cross_entropy
    backbone_weights: Optional[str] = None
    freeze_backbone: bool = False
    init_from: Optional[str] = None
    optimizer: str = "sgd"
    lr: Optional[float] = None  # None: the paper's for SGD + summed loss (PAPER_LR), 1e-4 otherwise
    momentum: float = 0.99
    weight_decay: float = 5e-4
    caffe_bias: bool = False  # biases at twice the LR and without weight decay, as the reference nets
    loss_reduction: str = "sum"
    loss_sampling: float = 0.0
    schedule: str = "fixed"
    warmup: int = 0
    epochs: int = 1
    steps: Optional[int] = None  # total optimiser steps; overrides epochs
    batch_size: int = 1
    scale: Optional[Tuple[float, float]] = None
    crop: Optional[int] = None
    flip: bool = False
    device: str = "auto"
    amp: Optional[str] = None
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    workers: int = 0
    threads: Optional[int] = None
    eval_every: int = 1
    checkpoint_every: int = 0
    log_every: int = 10
    progress: bool = True
    resume: bool = False


# What --resume may change: how the run executes and how long it goes on, not what it computes.
RUNTIME_FIELDS = ("device", "workers", "threads", "progress", "epochs", "steps", "eval_every", "checkpoint_every",
                  "log_every", "resume")


def resolved_lr(cfg: TrainConfig) -> float:
    if cfg.lr is not None:
        return cfg.lr
    if cfg.optimizer == "sgd" and cfg.loss_reduction == "sum":
        return PAPER_LR.get(cfg.model, 1e-10)
    return 1e-4


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """The learning rate at ``step`` as a fraction of the base rate."""
    f = 1.0
    if schedule == "poly":
        f = max(0.0, 1 - step / total) ** 0.9
    elif schedule == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    if warmup and step < warmup:
        f *= (step + 1) / warmup
    return f


def check_config(cfg: TrainConfig) -> None:
    from fcn_fast.models import available

    def bad(message):
        raise UserError(message)

    if cfg.model not in available():
        bad(f"--model {cfg.model!r} is not a model; choose from {', '.join(available())}")
    if cfg.optimizer not in OPTIMIZERS:
        bad(f"--optimizer {cfg.optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        bad(f"--schedule {cfg.schedule!r}: choose from {', '.join(SCHEDULES)}")
    if cfg.loss_reduction not in ("sum", "mean"):
        bad(f"--loss-reduction {cfg.loss_reduction!r}: choose sum or mean")
    if cfg.path not in ("fused", "reference"):
        bad(f"--path {cfg.path!r}: choose fused or reference")
    if not 0 <= cfg.loss_sampling < 1:
        bad(f"--loss-sampling must be in [0, 1), got {cfg.loss_sampling}")
    if cfg.lr is not None and not cfg.lr > 0:
        bad(f"--lr must be positive, got {cfg.lr}")
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            bad(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.steps is not None and cfg.steps < 1:
        bad(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.scale is not None and not 0 < cfg.scale[0] <= cfg.scale[1]:
        bad(f"--scale needs 0 < MIN <= MAX, got {cfg.scale[0]} {cfg.scale[1]}")
    if cfg.crop is not None and cfg.crop < 1:
        bad(f"--crop must be at least 1, got {cfg.crop}")
    if cfg.amp is not None and cfg.amp not in AMP_DTYPES:
        bad(f"--amp {cfg.amp!r}: choose from {', '.join(AMP_DTYPES)}")
    for name in ("backbone_weights", "init_from"):
        path = getattr(cfg, name)
        if path is not None and not os.path.isfile(path):
            bad(f"--{name.replace('_', '-')} {path} does not exist")
    if cfg.data is not None and not os.path.isdir(cfg.data):
        bad(f"data folder {cfg.data} does not exist")


class Objective(nn.Module):
    """The summed per-pixel loss of a batch, as one module so that DistributedDataParallel and torch.compile wrap
    the whole forward: fused, ``UpsampleCrossEntropyLoss`` on ``model.coarse(x)``; reference, ``F.cross_entropy``
    (through SoftmaxCrossEntropyLoss) on the full logits ``model(x)``."""

    def __init__(self, model: nn.Module, fused: bool):
        super().__init__()
        from fcn_fast.nn import SoftmaxCrossEntropyLoss, UpsampleCrossEntropyLoss

        self.model, self.fused = model, fused
        self.loss = (UpsampleCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum") if fused
                     else SoftmaxCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum"))

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.loss(self.model.coarse(x), target)
        return self.loss(self.model(x), target)


# ---- distributed ---------------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # whether this module initialised the process group (and so tears it down)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device_name: str) -> Tuple[Dist, torch.device]:
    """Under torchrun (WORLD_SIZE > 1): one process per GPU (NCCL), or CPU processes (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, owned), device


def _rng_state(device: torch.device) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---- the run -------------------------------------------------------------------------------------------------------

def _model_options(cfg: TrainConfig) -> Dict[str, Any]:
    """The build options that define the architecture (stored in checkpoints; weights and freezing are not)."""
    return {"fused": cfg.path == "fused", "width": cfg.width, "geometry": cfg.geometry,
            "learnable_upsample": cfg.learnable_upsample, "dropout": cfg.dropout}


def _param_groups(model: nn.Module, cfg: TrainConfig, lr: float) -> List[Dict[str, Any]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise UserError(f"{cfg.model} has no trainable parameters")
    if not cfg.caffe_bias:
        return [{"params": [p for _, p in params], "lr": lr, "initial_lr": lr, "weight_decay": cfg.weight_decay}]
    weights = [p for n, p in params if not n.endswith("bias")]
    biases = [p for n, p in params if n.endswith("bias")]
    return [{"params": weights, "lr": lr, "initial_lr": lr, "weight_decay": cfg.weight_decay},
            {"params": biases, "lr": 2 * lr, "initial_lr": 2 * lr, "weight_decay": 0.0}]


def _optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg, lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def _wrap_error(what: str, fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        raise UserError(f"{what}: {exc}") from None


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def train(cfg: TrainConfig, *, hooks: Optional[Dict[str, Callable]] = None) -> Dict[str, Any]:
    """Run (or resume) a training run in ``cfg.out``; returns its summary (also written to summary.json).

    ``hooks["after_step"](step)`` is called after every optimiser step (and any checkpoint taken at it)."""
    hooks = hooks or {}
    ddp, device = setup_distributed(cfg.device)
    try:
        return _train(cfg, hooks, ddp, device)
    finally:
        if ddp.owned and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, hooks, ddp: Dist, device: torch.device) -> Dict[str, Any]:
    from fcn_fast import models

    last = os.path.join(cfg.out, "checkpoints", "last.pt")
    resumed = None
    if cfg.resume:
        if not os.path.isfile(last):
            raise UserError(f"nothing to resume: {last} does not exist")
        resumed = load_checkpoint(last)
        saved = TrainConfig(**resumed["train"]["config"])
        cfg = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in RUNTIME_FIELDS})
    elif os.path.exists(os.path.join(cfg.out, "config.json")):
        raise UserError(f"{cfg.out} already holds a run (config.json); pass --resume to continue it or choose "
                        f"another --out")
    check_config(cfg)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a GPU (use bf16 on the CPU)")
    ddp.barrier()  # every process has checked the folder before the main one writes into it
    run = RunFolder(cfg.out, active=ddp.main)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    data = cfg.data or os.path.join(cfg.out, "data")
    if cfg.data is None and not os.path.isdir(data):
        if ddp.main:
            run.log(f"no --data: making the synthetic data set in {data}")
            make_synthetic(data, seed=cfg.seed)
        ddp.barrier()
    class_names = class_names_of(data)
    num_classes = cfg.num_classes or len(class_names)
    if num_classes < len(class_names):
        raise UserError(f"--num-classes {num_classes} is fewer than the {len(class_names)} classes of {data}")

    torch.manual_seed(cfg.seed)
    model = _wrap_error(f"--model {cfg.model}", models.build, cfg.model, num_classes=num_classes,
                        backbone_weights=None if resumed else cfg.backbone_weights,
                        freeze_backbone=cfg.freeze_backbone, **_model_options(cfg))
    if resumed is not None:
        model.input_transform = resumed["input_transform"]
        _wrap_error(f"checkpoint {last}", model.load_state_dict, resumed["state_dict"])
    elif cfg.init_from:
        source, source_ckpt = model_from_checkpoint(cfg.init_from)
        if source.num_classes != num_classes:
            raise UserError(f"--init-from {cfg.init_from} has {source.num_classes} classes, this run {num_classes}")
        _wrap_error(f"--init-from {cfg.init_from} ({source_ckpt['model']['name']})", models.init_from, model, source)
        model.input_transform = source.input_transform  # the weights expect the input they were trained on
    model.to(device).train()

    augment = Augment(scale=cfg.scale, crop=cfg.crop, flip=cfg.flip)
    train_set = open_dataset(data, cfg.split, input_transform=model.input_transform, augment=augment,
                             seed=cfg.seed, class_names=class_names)
    val_set = (open_dataset(data, cfg.val_split, input_transform=model.input_transform, class_names=class_names)
               if cfg.val_split else None)
    sampler = ResumableSampler(train_set, shuffle=True, seed=cfg.seed, rank=ddp.rank, world=ddp.world)
    loader = make_loader(train_set, batch_size=cfg.batch_size, sampler=sampler, workers=cfg.workers,
                         pin_memory=device.type == "cuda")
    per_epoch = math.ceil(len(sampler.inner) / cfg.batch_size)
    total = cfg.steps or cfg.epochs * per_epoch
    epochs = math.ceil(total / per_epoch)

    objective: nn.Module = Objective(model, fused=cfg.path == "fused")
    if ddp.world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        objective = torch.compile(objective)
    lr = resolved_lr(cfg)
    optimizer = _optimizer(model, cfg, lr)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None

    step, history, trace, elapsed, best = 0, [], [], 0.0, -1.0
    # Loss and labelled-pixel sums, kept on the device (no per-step sync): this epoch's, and the logging window's.
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    if resumed is not None:
        st = resumed["train"]
        optimizer.load_state_dict(st["optimizer"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        step, history, trace, elapsed, best = st["step"], st["history"], st["trace"], st["elapsed"], st["best"]
        sums.copy_(torch.tensor(st["sums"], dtype=torch.float64))
        rng = st["rng"]
        if len(rng) != ddp.world:
            raise UserError(f"{last} was written by {len(rng)} processes; resume it with as many (now {ddp.world})")
        _set_rng_state(rng[ddp.rank], device)
        run.log(f"resuming {cfg.out} at step {step}/{total}")
    else:
        # Each process its own stream for dropout and loss sampling (the model init above is common to all).
        torch.manual_seed(cfg.seed + 1 + ddp.rank)
        if ddp.main:
            write_json(run.config, {**dataclasses.asdict(cfg), "data": data, "lr": lr, "num_classes": num_classes,
                                    "world_size": ddp.world, "input_transform": model.input_transform})
        run.log(f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
                f"{num_classes} classes, {len(train_set)} training images, {total} steps "
                f"({epochs} epochs of {per_epoch}), {ddp.world} process(es) on {device}, lr {lr:g}")

    def checkpoint(path: str) -> None:
        rng = [_rng_state(device)]
        if ddp.world > 1:
            rng = [None] * ddp.world
            dist.all_gather_object(rng, _rng_state(device))
        if not ddp.main:
            return
        save_atomic({
            "format": FORMAT, "model": model_spec(cfg.model, num_classes, _model_options(cfg)),
            "class_names": list(class_names), "input_transform": model.input_transform,
            "state_dict": model.state_dict(),
            "train": {"config": dataclasses.asdict(cfg), "optimizer": optimizer.state_dict(),
                      "scaler": scaler.state_dict() if scaler is not None else None, "step": step,
                      "history": history, "trace": trace, "elapsed": elapsed, "best": best,
                      "sums": sums.tolist(), "rng": rng},
        }, path)

    start_epoch, skip = divmod(step, per_epoch)
    for epoch in range(start_epoch, epochs):
        if step >= total:
            break
        sampler.set_epoch(epoch, skip=skip * cfg.batch_size)
        train_set.set_epoch(epoch)
        steps_here = min(per_epoch, total - epoch * per_epoch)
        bar = tqdm(total=steps_here, initial=skip, desc=f"{cfg.model} epoch {epoch + 1}/{epochs}", unit="step",
                   disable=not (cfg.progress and ddp.main), dynamic_ncols=True, leave=False)
        t0, images = time.perf_counter(), 0
        for x, y, _ in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(cfg.schedule, step, total, cfg.warmup)
            if cfg.loss_sampling > 0:
                # Patchwise training as loss sampling: each pixel leaves the loss with probability p.
                y = y.masked_fill(torch.rand(y.shape, device=device) < cfg.loss_sampling, IGNORE_INDEX)
            pixels = (y != IGNORE_INDEX).sum()
            with autocast(device, cfg.amp):
                loss_sum = objective(x, y).float()
            loss = loss_sum if cfg.loss_reduction == "sum" else loss_sum / pixels.clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1
            images += x.shape[0]
            sums += torch.stack([loss_sum.detach().double(), pixels.double()]).repeat(2)
            bar.update(1)
            if step % cfg.log_every == 0:
                window = sums[2:].tolist()
                sums[2:] = 0
                trace.append([step, window[0] / max(window[1], 1)])
                bar.set_postfix(loss=f"{trace[-1][1]:.4f}",
                                img_s=f"{images * ddp.world / (time.perf_counter() - t0):.1f}")
            end_of_epoch = step % per_epoch == 0 or step >= total
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not end_of_epoch:
                elapsed += time.perf_counter() - t0
                t0 = time.perf_counter()
                checkpoint(last)
            if "after_step" in hooks:
                hooks["after_step"](step)
            if end_of_epoch:
                break
        bar.close()
        skip = 0
        epoch_sums = sums[:2].clone()
        if ddp.world > 1:
            dist.all_reduce(epoch_sums)
        sums[:2] = 0
        loss_sum, pixels = epoch_sums.tolist()
        row: Dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(pixels, 1),
                               "lr": optimizer.param_groups[0]["lr"]}
        if val_set is not None and ((epoch + 1) % max(cfg.eval_every, 1) == 0 or step >= total) and cfg.eval_every:
            scores = evaluate(model, val_set, device=device, batch_size=cfg.batch_size, rank=ddp.rank,
                              world=ddp.world, amp=cfg.amp, progress=cfg.progress and ddp.main)
            row.update({k: scores[k] for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")}, iou=scores["iou"])
        elapsed += time.perf_counter() - t0
        row["time_s"] = round(elapsed, 3)
        history.append(row)
        run.log(f"{cfg.model} epoch {epoch + 1}/{epochs}  step {step}  loss {row['train_loss']:.4f}  "
                f"pixel acc {_fmt(row.get('pixel_acc'))}  mean IU {_fmt(row.get('mean_iu'))}  "
                f"({elapsed:.1f} s)", echo=tqdm.write if cfg.progress else print)
        improved = row.get("mean_iu") is not None and row["mean_iu"] > best
        if improved:
            best = row["mean_iu"]
        checkpoint(last)
        if improved:
            checkpoint(run.best)
        run.write_metrics(history)
        run.plot(history, trace, title=cfg.model)

    final = history[-1] if history else {}
    summary = {"run": cfg.out, "model": cfg.model, "steps": step, "epochs": len(history), "time_s": elapsed,
               "final": {k: final.get(k) for k in ("train_loss", "pixel_acc", "mean_acc", "mean_iu", "fw_iu")},
               "best_mean_iu": best if best >= 0 else None, "checkpoint": run.last,
               "best_checkpoint": run.best if best >= 0 else None}
    if ddp.main:
        write_json(run.summary, summary)
    return summary


# ---- command line --------------------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    from fcn_fast.models import available

    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run folder (config, logs, metrics, plots, checkpoints)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms only (slower on GPU)")
    g.add_argument("--amp", choices=tuple(AMP_DTYPES), default=None, help="autocast dtype (GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the forward and loss (GPU)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--log-every", type=int, default=10, help="steps between loss log points (default: 10)")
    g.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations; 0: never (default: 1)")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="also checkpoint every N steps (default: 0, at the end of each epoch only)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="data set folder (VOC layout, SBD, or image/label pairs); "
                                                "default: the synthetic set, made in OUT/data")
    g.add_argument("--split", default="train", help="training split (default: train)")
    g.add_argument("--val-split", default="val", help="validation split; 'none' for no evaluation (default: val)")
    g.add_argument("--batch-size", type=int, default=1, help="images per batch, padded (default: 1, the paper's)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    g.add_argument("--scale", type=float, nargs=2, metavar=("MIN", "MAX"), default=None, help="random rescaling")
    g.add_argument("--crop", type=int, default=None, help="random square crop (padded with ignore)")
    g.add_argument("--flip", action="store_true", help="random horizontal flips")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="fcn32s", choices=available(), help="(default: fcn32s)")
    g.add_argument("--num-classes", type=int, default=None, help="default: the data set's")
    g.add_argument("--width", type=float, default=1.0, help="channel multiplier, e.g. 0.125 (default: 1)")
    g.add_argument("--geometry", choices=("caffe", "same"), default=None,
                   help="VGG: the reference nets' padding and crops (caffe, default) or padded convolutions (same)")
    g.add_argument("--learnable-upsample", action="store_true", help="learn the deconvolutions (caffe geometry)")
    g.add_argument("--dropout", type=float, default=0.5)
    g.add_argument("--path", choices=("fused", "reference"), default="fused",
                   help="fused head and loss, or plain PyTorch layers and F.cross_entropy (default: fused)")
    g.add_argument("--backbone-weights", default=None, metavar="FILE",
                   help="torchvision-format ImageNet state dict (vgg16 / resnet50)")
    g.add_argument("--freeze-backbone", action="store_true", help="train the classifier layers only")
    g.add_argument("--init-from", default=None, metavar="CKPT", help="previous stage (e.g. FCN-32s for FCN-16s)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="(default: sgd, the paper's)")
    g.add_argument("--lr", type=float, default=None,
                   help="default: the paper's for SGD and the summed loss (1e-10 FCN-32s, 1e-12 FCN-16s, 1e-14 "
                        "FCN-8s), else 1e-4")
    g.add_argument("--momentum", type=float, default=0.99, help="SGD momentum (default: 0.99)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="(default: 5e-4)")
    g.add_argument("--caffe-bias", action="store_true", help="biases at 2x LR and no weight decay (reference nets)")
    g.add_argument("--loss-reduction", choices=("sum", "mean"), default="sum",
                   help="sum over pixels (the paper's unnormalised loss, default) or mean")
    g.add_argument("--loss-sampling", type=float, default=0.0, metavar="P",
                   help="drop each pixel from the loss with probability P (default: 0)")
    g.add_argument("--schedule", choices=SCHEDULES, default="fixed", help="LR schedule (default: fixed)")
    g.add_argument("--warmup", type=int, default=0, help="linear LR warm-up steps")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--steps", type=int, default=None, help="total steps (overrides --epochs)")


def config_from_args(args) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if isinstance(values.get("val_split"), str) and values["val_split"].lower() in ("", "none"):
        values["val_split"] = None
    if values.get("scale") is not None:
        values["scale"] = tuple(values["scale"])
    return TrainConfig(**values)


def main(args) -> Dict[str, Any]:
    return train(config_from_args(args))

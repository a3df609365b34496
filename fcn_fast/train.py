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

from fcn_fast.checkpoint import (FORMAT, load_checkpoint, model_from_checkpoint, model_spec, remove_stale_temporaries,
                                 save_atomic)
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
    # The run length, intervals and --skip-nonfinite: None means not given, which resumes with the checkpoint's value
    # and starts a new run with the default in RESUMED_UNLESS_GIVEN.
    epochs: Optional[int] = None
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
    skip_nonfinite: Optional[bool] = None  # skip steps whose loss is NaN/inf (a sync per step), not stop the run
    workers: int = 0
    threads: Optional[int] = None
    eval_every: Optional[int] = None
    checkpoint_every: Optional[int] = None
    log_every: Optional[int] = None
    progress: bool = True
    resume: bool = False


# What --resume may change: how the run executes and how long it goes on, not what it computes.
RUNTIME_FIELDS = ("device", "workers", "threads", "progress", "epochs", "steps", "eval_every", "checkpoint_every",
                  "log_every", "resume", "skip_nonfinite")
# Of those, the ones a resumed run keeps from its checkpoint unless given (not None), with a new run's defaults.
# The run length counts as one: given --epochs or --steps, a resumed run takes both from the command line.
RESUMED_UNLESS_GIVEN = {"epochs": 1, "steps": None, "eval_every": 1, "checkpoint_every": 0, "log_every": 10,
                        "skip_nonfinite": False}


def _fill_runtime(cfg: TrainConfig, saved: Optional[TrainConfig]) -> TrainConfig:
    """``cfg`` with the fields of RESUMED_UNLESS_GIVEN that it leaves None taken from ``saved`` (the resumed run's
    configuration) or, for a new run, the defaults."""
    length_given = cfg.epochs is not None or cfg.steps is not None
    fill = {}
    for name, default in RESUMED_UNLESS_GIVEN.items():
        keep = saved is not None and not (name in ("epochs", "steps") and length_given)
        if getattr(cfg, name) is None:
            value = getattr(saved, name) if keep else None
            fill[name] = default if value is None else value  # (checkpoints older than a field lack it)
    return dataclasses.replace(cfg, **fill)


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
    if cfg.log_every < 1:
        bad(f"--log-every must be at least 1, got {cfg.log_every}")
    for name in ("eval_every", "checkpoint_every"):
        if getattr(cfg, name) < 0:
            bad(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
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


class NonFiniteLoss(UserError):
    """Training met a non-finite loss (or weights) and stopped; the message names the step and how to go on."""


@dataclass
class TrainState:
    """Where a run is and what it has measured: what a checkpoint holds besides the model, optimiser and RNGs."""
    step: int = 0
    history: List[Dict[str, Any]] = dataclasses.field(default_factory=list)  # one row per epoch
    trace: List[List[float]] = dataclasses.field(default_factory=list)  # [step, mean loss of the logging window]
    elapsed: float = 0.0  # training and evaluation seconds, over every process lifetime of the run
    best: float = -1.0  # best validation mean IU so far
    skipped: int = 0  # steps skipped for a non-finite loss (--skip-nonfinite)
    # Loss and labelled-pixel sums kept on the device (no per-step sync): this epoch's, then the logging window's.
    sums: Optional[torch.Tensor] = None
    # Not saved: the losses of the steps since the last finiteness check, the step of the last checkpoint written
    # (or resumed from), and the time up to which ``elapsed`` counts.
    unchecked: List[Tuple[int, torch.Tensor]] = dataclasses.field(default_factory=list)
    saved_step: Optional[int] = None
    clock: float = 0.0

    def tick(self) -> None:
        now = time.perf_counter()
        self.elapsed += now - self.clock
        self.clock = now


@dataclass
class Trainer:
    """Everything a run builds once (``_setup``) and then uses at each step, evaluation and checkpoint."""
    cfg: TrainConfig
    ddp: Dist
    device: torch.device
    folder: RunFolder
    data: str  # the data set's folder
    model: nn.Module
    objective: nn.Module  # the model and its loss, wrapped by DDP and torch.compile when asked
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    train_set: Any
    val_set: Any
    sampler: ResumableSampler
    loader: Any
    class_names: List[str]
    num_classes: int
    lr: float
    per_epoch: int  # steps per epoch
    total: int  # steps of the whole run
    epochs: int


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
    """The run: set up, then epochs of steps, each epoch ending with its evaluation and checkpoints."""
    cfg, resumed = _open_run(cfg, ddp, device)
    t = _setup(cfg, ddp, device, resumed)
    state = _start(t, resumed)
    start_epoch, steps_done = divmod(state.step, t.per_epoch)  # a resumed run may start part-way through an epoch
    for epoch in range(start_epoch, t.epochs):
        if state.step >= t.total:
            break
        _train_epoch(t, state, epoch, steps_done, hooks)
        steps_done = 0
        _end_epoch(t, state, epoch)
    return _finish(t, state)


# ---- setup ---------------------------------------------------------------------------------------------------------

def _open_run(cfg: TrainConfig, ddp: Dist, device: torch.device) -> Tuple[TrainConfig, Optional[Dict[str, Any]]]:
    """The run's configuration (a resumed run's own, with this invocation's runtime fields) and the checkpoint it
    resumes from, after checking that ``cfg.out`` is a run to resume or a new folder."""
    last = os.path.join(cfg.out, "checkpoints", "last.pt")
    resumed = None
    if cfg.resume:
        if not os.path.isfile(last):
            raise UserError(f"nothing to resume: {last} does not exist")
        resumed = load_checkpoint(last)
        saved = TrainConfig(**resumed["train"]["config"])
        given = _fill_runtime(cfg, saved)
        cfg = dataclasses.replace(saved, **{k: getattr(given, k) for k in RUNTIME_FIELDS})
    elif os.path.exists(os.path.join(cfg.out, "config.json")):
        raise UserError(f"{cfg.out} already holds a run (config.json); pass --resume to continue it or choose "
                        f"another --out")
    else:
        cfg = _fill_runtime(cfg, None)
    check_config(cfg)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a GPU (use bf16 on the CPU)")
    ddp.barrier()  # every process has checked the folder before the main one writes into it
    return cfg, resumed


def _setup(cfg: TrainConfig, ddp: Dist, device: torch.device, resumed: Optional[Dict[str, Any]]) -> Trainer:
    """The data, the model (initialised from ``--seed``, the checkpoint resumed or ``--init-from``), the loss,
    the optimiser."""
    from fcn_fast import models

    folder = RunFolder(cfg.out, active=ddp.main)
    if ddp.main:
        remove_stale_temporaries(folder.checkpoints)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    data = _data_folder(cfg, ddp, folder)
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
        _wrap_error(f"checkpoint {folder.last}", model.load_state_dict, resumed["state_dict"])
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

    objective: nn.Module = Objective(model, fused=cfg.path == "fused")
    if ddp.world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        objective = torch.compile(objective)
    lr = resolved_lr(cfg)
    return Trainer(cfg=cfg, ddp=ddp, device=device, folder=folder, data=data, model=model, objective=objective,
                   optimizer=_optimizer(model, cfg, lr),
                   scaler=torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None,
                   train_set=train_set, val_set=val_set, sampler=sampler, loader=loader,
                   class_names=list(class_names), num_classes=num_classes, lr=lr, per_epoch=per_epoch,
                   total=total, epochs=math.ceil(total / per_epoch))


def _data_folder(cfg: TrainConfig, ddp: Dist, folder: RunFolder) -> str:
    """``--data``, or the synthetic set in ``<out>/data`` (made by the main process on the first run)."""
    data = cfg.data or os.path.join(cfg.out, "data")
    if cfg.data is None and not os.path.isdir(data):
        if ddp.main:
            folder.log(f"no --data: making the synthetic data set in {data}")
            make_synthetic(data, seed=cfg.seed)
        ddp.barrier()
    return data


def _start(t: Trainer, resumed: Optional[Dict[str, Any]]) -> TrainState:
    """The state at the first step of this process: the checkpoint's (optimiser, scaler, RNGs restored), or a new
    run's (its RNG seeded, config.json written)."""
    cfg, ddp = t.cfg, t.ddp
    state = TrainState(sums=torch.zeros(4, dtype=torch.float64, device=t.device))
    if resumed is not None:
        st = resumed["train"]
        t.optimizer.load_state_dict(st["optimizer"])
        if t.scaler is not None and st.get("scaler"):
            t.scaler.load_state_dict(st["scaler"])
        state.step, state.history, state.trace = st["step"], st["history"], st["trace"]
        state.elapsed, state.best, state.skipped = st["elapsed"], st["best"], st.get("skipped", 0)
        state.sums.copy_(torch.tensor(st["sums"], dtype=torch.float64))
        state.saved_step = state.step
        rng = st["rng"]
        if len(rng) != ddp.world:
            raise UserError(f"{t.folder.last} was written by {len(rng)} processes; resume it with as many "
                            f"(now {ddp.world})")
        _set_rng_state(rng[ddp.rank], t.device)
        t.folder.log(f"resuming {cfg.out} at step {state.step}/{t.total}")
    else:
        # Each process its own stream for dropout and loss sampling (the model init above is common to all).
        torch.manual_seed(cfg.seed + 1 + ddp.rank)
        if ddp.main:
            write_json(t.folder.config, {**dataclasses.asdict(cfg), "data": t.data, "lr": t.lr,
                                         "num_classes": t.num_classes, "world_size": ddp.world,
                                         "input_transform": t.model.input_transform})
        t.folder.log(f"{cfg.model}: {sum(p.numel() for p in t.model.parameters()):,} parameters, "
                     f"{t.num_classes} classes, {len(t.train_set)} training images, {t.total} steps "
                     f"({t.epochs} epochs of {t.per_epoch}), {ddp.world} process(es) on {t.device}, lr {t.lr:g}")
    return state


# ---- training steps ------------------------------------------------------------------------------------------------

def _train_epoch(t: Trainer, state: TrainState, epoch: int, steps_done: int, hooks) -> None:
    """Steps through ``epoch`` from the batch after its first ``steps_done`` to its end (or the run's), with the
    logging window's loss, mid-epoch checkpoints and the hooks."""
    cfg = t.cfg
    t.sampler.set_epoch(epoch, skip=steps_done * cfg.batch_size)
    t.train_set.set_epoch(epoch)
    steps_here = min(t.per_epoch, t.total - epoch * t.per_epoch)
    bar = tqdm(total=steps_here, initial=steps_done, desc=f"{cfg.model} epoch {epoch + 1}/{t.epochs}", unit="step",
               disable=not (cfg.progress and t.ddp.main), dynamic_ncols=True, leave=False)
    t0, images = time.perf_counter(), 0
    state.clock = t0  # the time between epochs (checkpoints, metrics, plots) is not the run's
    for x, y, _ in t.loader:
        _train_step(t, state, x, y)
        images += x.shape[0]
        bar.update(1)
        if state.step % cfg.log_every == 0:
            _check_losses(t, state)
            window = state.sums[2:].tolist()
            state.sums[2:] = 0
            state.trace.append([state.step, window[0] / max(window[1], 1)])
            bar.set_postfix(loss=f"{state.trace[-1][1]:.4f}",
                            img_s=f"{images * t.ddp.world / (time.perf_counter() - t0):.1f}")
        end_of_epoch = state.step % t.per_epoch == 0 or state.step >= t.total
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and not end_of_epoch:
            state.tick()
            _save_checkpoint(t, state, t.folder.last)
        if "after_step" in hooks:
            hooks["after_step"](state.step)
        if end_of_epoch:
            break
    bar.close()


def _train_step(t: Trainer, state: TrainState, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimiser step on the batch (x, y); its summed loss and labelled pixels go into ``state.sums`` on the
    device. A non-finite loss is found at the next check (``_check_losses``), or here with --skip-nonfinite, which
    skips the update (a device sync per step)."""
    cfg, device, optimizer, scaler = t.cfg, t.device, t.optimizer, t.scaler
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_factor(cfg.schedule, state.step, t.total, cfg.warmup)
    if cfg.loss_sampling > 0:
        # Patchwise training as loss sampling: each pixel leaves the loss with probability p.
        y = y.masked_fill(torch.rand(y.shape, device=device) < cfg.loss_sampling, IGNORE_INDEX)
    pixels = (y != IGNORE_INDEX).sum()
    with autocast(device, cfg.amp):
        loss_sum = t.objective(x, y).float()
    loss = loss_sum if cfg.loss_reduction == "sum" else loss_sum / pixels.clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    # Every process runs backward, even for a step it skips: DDP's gradient all-reduce needs them all.
    skipping = cfg.skip_nonfinite and not _all_finite(t, loss_sum)
    if scaler is not None:
        scaler.scale(loss).backward()
        if not skipping:
            scaler.step(optimizer)
            scaler.update()
    else:
        loss.backward()
        if not skipping:
            optimizer.step()
    state.step += 1
    if skipping:
        state.skipped += 1
        t.folder.log(f"step {state.step}: non-finite loss ({loss_sum.item()}), step skipped (--skip-nonfinite)",
                     echo=tqdm.write if cfg.progress else print)
        return
    if not cfg.skip_nonfinite:
        state.unchecked.append((state.step, loss_sum.detach()))
    state.sums += torch.stack([loss_sum.detach().double(), pixels.double()]).repeat(2)


def _all_finite(t: Trainer, loss: torch.Tensor) -> bool:
    """Whether every process's ``loss`` is finite (so that they all skip a step together)."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if t.ddp.world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


# ---- the non-finite check ------------------------------------------------------------------------------------------

def _check_losses(t: Trainer, state: TrainState) -> None:
    """Stops the run (NonFiniteLoss) if a loss since the last check was not finite on any process. Called where the
    trainer synchronises anyway (log points, epoch ends) and before every checkpoint, never per step."""
    unchecked, state.unchecked = state.unchecked, []
    if not unchecked:
        return
    bad = (~torch.isfinite(torch.stack([loss for _, loss in unchecked]))).to(torch.int32)
    if t.ddp.world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    flags = bad.tolist()
    if any(flags):
        first = flags.index(1)
        step, loss = unchecked[first]
        value = loss.item()
        what = f"non-finite loss ({value})" if not math.isfinite(value) else "non-finite loss (on another process)"
        _stop(t, state, f"{what} at step {step} of {t.total}")


def _check_weights(t: Trainer, state: TrainState) -> None:
    """Stops the run if a weight or buffer is not finite (a finite loss whose gradient overflowed): no checkpoint
    ever holds them."""
    tensors = [v for v in t.model.state_dict().values() if v.is_floating_point()]
    if tensors and not bool(torch.stack([torch.isfinite(v).all() for v in tensors]).all()):
        _stop(t, state, f"non-finite weights after step {state.step} of {t.total} (the losses were finite: an "
                        f"update overflowed)")


def _stop(t: Trainer, state: TrainState, what: str) -> None:
    last, best, out = t.folder.last, t.folder.best, t.cfg.out
    if state.saved_step is None:
        kept = "No checkpoint had been written yet: start again with a lower --lr, or with --skip-nonfinite."
    else:
        also = f" (and the best so far in {best})" if os.path.isfile(best) else ""
        kept = (f"Nothing after step {state.saved_step} was saved: the last good weights are in {last} (step "
                f"{state.saved_step}){also}. `fcn-fast train --out {out} --resume` continues from there and meets the "
                f"same loss again unless you add --skip-nonfinite (skip such steps); or start a new run from those "
                f"weights with a lower --lr (--init-from {last}).")
    message = f"{what}: training stopped. {kept}"
    t.folder.log(message, echo=None)
    raise NonFiniteLoss(message)


# ---- evaluation and checkpoints ------------------------------------------------------------------------------------

def _end_epoch(t: Trainer, state: TrainState, epoch: int) -> None:
    """The epoch's row of the history (train loss, LR, validation scores when due), its log line, the checkpoints
    (last.pt; best.pt when the mean IU improved), metrics and plots."""
    cfg, ddp = t.cfg, t.ddp
    _check_losses(t, state)
    epoch_sums = state.sums[:2].clone()
    if ddp.world > 1:
        dist.all_reduce(epoch_sums)
    state.sums[:2] = 0
    loss_sum, pixels = epoch_sums.tolist()
    row: Dict[str, Any] = {"epoch": epoch + 1, "step": state.step, "train_loss": loss_sum / max(pixels, 1),
                           "lr": t.optimizer.param_groups[0]["lr"]}
    if t.val_set is not None and (state.step >= t.total or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
        row.update(_evaluate(t))
    state.tick()
    row["time_s"] = round(state.elapsed, 3)
    if state.skipped:
        row["skipped_steps"] = state.skipped
    state.history.append(row)
    skipped = f"  ({state.skipped} steps skipped so far)" if state.skipped else ""
    t.folder.log(f"{cfg.model} epoch {epoch + 1}/{t.epochs}  step {state.step}  loss {row['train_loss']:.4f}  "
                 f"pixel acc {_fmt(row.get('pixel_acc'))}  mean IU {_fmt(row.get('mean_iu'))}  "
                 f"({state.elapsed:.1f} s){skipped}", echo=tqdm.write if cfg.progress else print)
    improved = row.get("mean_iu") is not None and row["mean_iu"] > state.best
    if improved:
        state.best = row["mean_iu"]
    _save_checkpoint(t, state, t.folder.last)
    if improved:
        _save_checkpoint(t, state, t.folder.best)
    t.folder.write_metrics(state.history)
    t.folder.plot(state.history, state.trace, title=cfg.model)


def _evaluate(t: Trainer) -> Dict[str, Any]:
    """Validation scores of the model, every val image once over all processes."""
    scores = evaluate(t.model, t.val_set, device=t.device, batch_size=t.cfg.batch_size, rank=t.ddp.rank,
                      world=t.ddp.world, amp=t.cfg.amp, progress=t.cfg.progress and t.ddp.main)
    return {**{k: scores[k] for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")}, "iou": scores["iou"]}


def _save_checkpoint(t: Trainer, state: TrainState, path: str) -> None:
    """Writes (main process) the model, optimiser, scaler, state and every process's RNG states to ``path``,
    atomically, after checking that the losses since the last check and the weights are finite."""
    _check_losses(t, state)
    _check_weights(t, state)
    rng = [_rng_state(t.device)]
    if t.ddp.world > 1:
        rng = [None] * t.ddp.world
        dist.all_gather_object(rng, _rng_state(t.device))
    state.saved_step = state.step
    if not t.ddp.main:
        return
    cfg = t.cfg
    save_atomic({
        "format": FORMAT, "model": model_spec(cfg.model, t.num_classes, _model_options(cfg)),
        "class_names": t.class_names, "input_transform": t.model.input_transform,
        "state_dict": t.model.state_dict(),
        "train": {"config": dataclasses.asdict(cfg), "optimizer": t.optimizer.state_dict(),
                  "scaler": t.scaler.state_dict() if t.scaler is not None else None, "step": state.step,
                  "history": state.history, "trace": state.trace, "elapsed": state.elapsed, "best": state.best,
                  "skipped": state.skipped, "sums": state.sums.tolist(), "rng": rng},
    }, path)


def _finish(t: Trainer, state: TrainState) -> Dict[str, Any]:
    """The run's summary, written to summary.json (by the main process) only now that it completed."""
    final = state.history[-1] if state.history else {}
    best = state.best
    summary = {"run": t.cfg.out, "model": t.cfg.model, "steps": state.step, "epochs": len(state.history),
               "time_s": state.elapsed,
               "final": {k: final.get(k) for k in ("train_loss", "pixel_acc", "mean_acc", "mean_iu", "fw_iu")},
               "best_mean_iu": best if best >= 0 else None, "checkpoint": t.folder.last,
               "best_checkpoint": t.folder.best if best >= 0 else None, "skipped_steps": state.skipped}
    if t.ddp.main:
        write_json(t.folder.summary, summary)
    return summary


# ---- command line --------------------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    from fcn_fast.models import available

    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run folder (config, logs, metrics, plots, checkpoints)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (its configuration; options of how long "
                        "and how it runs that you give here replace the run's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms only (slower on GPU)")
    g.add_argument("--skip-nonfinite", action="store_true", default=None,
                   help="skip the steps whose loss is NaN or inf (a device sync per step) instead of stopping the run "
                        "at the first one (default)")
    g.add_argument("--amp", choices=tuple(AMP_DTYPES), default=None, help="autocast dtype (GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the forward and loss (GPU)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    # The run length, intervals and --skip-nonfinite default to None: --resume then keeps the run's own.
    g.add_argument("--log-every", type=int, default=None, help="steps between loss log points (default: 10)")
    g.add_argument("--eval-every", type=int, default=None,
                   help="epochs between evaluations; 0: at the end only (default: 1)")
    g.add_argument("--checkpoint-every", type=int, default=None,
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
    g.add_argument("--epochs", type=int, default=None, help="(default: 1)")
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

"""What the suite measures: one declaration per case (op, shapes, dtype, mode) and, per op, how each provider runs it.

A provider is a way to compute an op: ``fcn_fast:<backend>`` (each fcn_fast backend usable on the device),
``eager`` (the plain-PyTorch composition a user would write: F.conv_transpose2d / F.interpolate + slicing + add,
F.cross_entropy, ``.argmax(1)``), ``compile`` (``torch.compile`` of ``eager``) and, on the GPU,
``compile-max-autotune``. Every op declares the fewest bytes it must move per mode (each input read once, each
output written once): achieved GB/s is that over the measured median time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from fcn_fast.ops._resample import bilinear_kernel

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("forward", "backward", "full", "inference")
IGNORE_INDEX = 255
TARGET_BYTES = 8  # int64 labels, what F.cross_entropy takes


@dataclass(frozen=True)
class Shape:
    """The geometry of one case. ``coarse_hw`` is the input of the upsampling, ``out_hw`` the full-resolution output
    (cropped at ``offset`` out of the deconvolution); ``skip_hw``/``skip_offset`` the skip map and its crop."""

    label: str
    n: int
    c: int
    out_hw: Tuple[int, int]
    coarse_hw: Tuple[int, int] = (0, 0)
    factor: int = 1
    offset: Tuple[int, int] = (0, 0)
    skip_hw: Optional[Tuple[int, int]] = None
    skip_offset: Tuple[int, int] = (0, 0)
    mode: str = "deconv"
    width: float = 1.0  # the model's channel multiplier (fcn8s cases)
    note: str = ""  # e.g. how the batch was scaled down for the CPU

    def params(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("label", "note")}


@dataclass(frozen=True)
class Case:
    op: str
    shape: Shape
    dtype: str
    modes: Tuple[str, ...]

    @property
    def key(self) -> Tuple[str, str, str]:
        return self.op, self.shape.label, self.dtype


@dataclass
class Provider:
    """``fn(inputs) -> Tensor``: the training-path output (what backward differentiates) or, when
    ``infer_fn`` is set, the inference output; ``params``: extra tensors gradients are taken for (model weights)."""

    name: str
    fn: Callable[[dict], torch.Tensor]
    infer_fn: Optional[Callable[[dict], torch.Tensor]] = None
    params: List[torch.Tensor] = field(default_factory=list)
    compile_s: Optional[float] = None
    backward_fn: Optional[Callable[[dict], torch.Tensor]] = None  # fn for the backward-only mode, if it differs


def _numel(*dims: int) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


def _size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def _targets(n: int, hw: Tuple[int, int], c: int, device, gen: torch.Generator) -> torch.Tensor:
    """Random labels with about 5% ignored pixels, as VOC's object borders are."""
    t = torch.randint(0, c, (n, *hw), generator=gen)
    t[torch.rand((n, *hw), generator=gen) < 0.05] = IGNORE_INDEX
    return t.to(device)


def _randn(shape, dtype, device, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


class _Upsampler:
    """The eager bilinear upsampling + crop of a Shape, with its fixed deconvolution weight made once (as a model
    holds it in a buffer), so that eager and compile do not rebuild it per call."""

    def __init__(self, s: Shape, device, dtype):
        self.s = s
        self.weight = bilinear_kernel(s.c, s.factor, dtype=dtype).to(device) if s.mode == "deconv" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.s
        if s.mode == "interp":
            return F.interpolate(x, size=s.out_hw, mode="bilinear", align_corners=False)
        full = F.conv_transpose2d(x, self.weight.to(x.dtype), stride=s.factor, groups=s.c)
        (oy, ox), (h, w) = s.offset, s.out_hw
        return full[:, :, oy:oy + h, ox:ox + w]


class OpBench:
    """One op: its inputs, eager composition, fcn_fast call, differentiable inputs and byte counts per mode."""

    name = ""
    modes: Tuple[str, ...] = ()
    grad_keys: Tuple[str, ...] = ()
    bytes_formula: Dict[str, str] = {}
    compile_on_cpu = True
    model = False  # a whole network: fp32 only, checked against eager in fp32, images/s reported

    def inputs(self, s: Shape, dtype: torch.dtype, device, gen) -> dict:
        raise NotImplementedError

    def eager(self, s: Shape, device, dtype) -> Provider:
        raise NotImplementedError

    def fused(self, s: Shape, device, dtype, backend: str) -> Provider:
        raise NotImplementedError

    def bytes(self, s: Shape, dtype: str, mode: str) -> Optional[int]:
        raise NotImplementedError

    def available(self) -> Optional[str]:
        """None, or why this op cannot be benchmarked here."""
        return None


class UpsampleAddBench(OpBench):
    name = "upsample_add"
    modes = ("forward", "backward", "full")
    grad_keys = ("x", "skip")
    bytes_formula = {
        "forward": "e*(N*C*h*w + N*C*H*W*[skip] + N*C*H*W)",
        "backward": "e*(N*C*H*W + N*C*h*w + N*C*Hs*Ws*[skip cropped])",
        "full": "forward + backward",
    }

    def inputs(self, s, dtype, device, gen):
        inp = {"x": _randn((s.n, s.c, *s.coarse_hw), dtype, device, gen)}
        if s.skip_hw:
            inp["skip"] = _randn((s.n, s.c, *s.skip_hw), dtype, device, gen)
        return inp

    def eager(self, s, device, dtype):
        up = _Upsampler(s, device, dtype)
        (sy, sx), (h, w) = s.skip_offset, s.out_hw

        def fn(inp):
            out = up(inp["x"])
            if "skip" in inp:
                out = out + inp["skip"][:, :, sy:sy + h, sx:sx + w]
            return out

        return Provider("eager", fn)

    def fused(self, s, device, dtype, backend):
        import fcn_fast

        def fn(inp):
            return fcn_fast.upsample_add(inp["x"], inp.get("skip"), factor=s.factor, mode=s.mode, out_size=s.out_hw,
                                         offset=s.offset, skip_offset=s.skip_offset, backend=backend)

        return Provider(f"fcn_fast:{backend}", fn)

    def bytes(self, s, dtype, mode):
        e, small, big = _size(dtype), _numel(s.n, s.c, *s.coarse_hw), _numel(s.n, s.c, *s.out_hw)
        # A skip added whole takes the output's gradient as its own (no bytes); a cropped one needs its own tensor.
        cropped = s.skip_hw and (tuple(s.skip_hw) != tuple(s.out_hw) or tuple(s.skip_offset) != (0, 0))
        skip = _numel(s.n, s.c, *s.skip_hw) if cropped else 0
        fwd = e * (small + (big if s.skip_hw else 0) + big)
        bwd = e * (big + small + skip)
        return {"forward": fwd, "inference": fwd, "backward": bwd, "full": fwd + bwd}[mode]


class _LossBench(OpBench):
    """A per-pixel loss whose logits input (``key``, at ``read_hw`` of the shape) is read once forward; backward
    reads it again and writes its gradient, fwd+bwd at best reads it once and writes the gradient once."""

    modes = ("forward", "backward", "full")
    key, read_hw = "", ""

    def __init__(self):
        self.grad_keys = (self.key,)
        x = "N*C*H*W" if self.read_hw == "out_hw" else "N*C*h*w"
        self.bytes_formula = {"forward": f"e*{x} + t*N*H*W",
                              "backward": f"2*e*{x} + t*N*H*W ({self.key} re-read, its gradient written)",
                              "full": f"2*e*{x} + t*N*H*W ({self.key} read once, its gradient written once)"}

    def inputs(self, s, dtype, device, gen):
        # Logits of a few units' spread, as a trained net's are; softmax stays far from one-hot.
        return {self.key: 3 * _randn((s.n, s.c, *getattr(s, self.read_hw)), dtype, device, gen),
                "target": _targets(s.n, s.out_hw, s.c, device, gen)}

    def bytes(self, s, dtype, mode):
        e, read, pixels = _size(dtype), _numel(s.n, s.c, *getattr(s, self.read_hw)), _numel(s.n, *s.out_hw)
        one = e * read + TARGET_BYTES * pixels
        return one if mode in ("forward", "inference") else one + e * read


class CrossEntropyBench(_LossBench):
    name, key, read_hw = "softmax_cross_entropy", "logits", "out_hw"

    def eager(self, s, device, dtype):
        return Provider("eager", lambda inp: F.cross_entropy(inp["logits"], inp["target"], ignore_index=IGNORE_INDEX))

    def fused(self, s, device, dtype, backend):
        import fcn_fast

        return Provider(f"fcn_fast:{backend}", lambda inp: fcn_fast.softmax_cross_entropy(
            inp["logits"], inp["target"], ignore_index=IGNORE_INDEX, backend=backend))


class UpsampleCrossEntropyBench(_LossBench):
    name, key, read_hw = "upsample_cross_entropy", "coarse", "coarse_hw"

    def eager(self, s, device, dtype):
        up = _Upsampler(s, device, dtype)
        return Provider("eager", lambda inp: F.cross_entropy(up(inp["coarse"]), inp["target"], ignore_index=IGNORE_INDEX))

    def fused(self, s, device, dtype, backend):
        import fcn_fast

        return Provider(f"fcn_fast:{backend}", lambda inp: fcn_fast.upsample_cross_entropy(
            inp["coarse"], inp["target"], factor=s.factor, mode=s.mode, offset=s.offset, ignore_index=IGNORE_INDEX,
            backend=backend))


class UpsampleArgmaxBench(OpBench):
    name = "upsample_argmax"
    modes = ("inference",)
    bytes_formula = {"inference": "e*N*C*h*w + 8*N*H*W (int64 labels written)"}

    def inputs(self, s, dtype, device, gen):
        return {"coarse": 3 * _randn((s.n, s.c, *s.coarse_hw), dtype, device, gen)}

    def eager(self, s, device, dtype):
        up = _Upsampler(s, device, dtype)
        return Provider("eager", lambda inp: up(inp["coarse"]).argmax(1))

    def fused(self, s, device, dtype, backend):
        import fcn_fast

        return Provider(f"fcn_fast:{backend}", lambda inp: fcn_fast.upsample_argmax(
            inp["coarse"], factor=s.factor, mode=s.mode, out_size=s.out_hw, offset=s.offset, backend=backend))

    def bytes(self, s, dtype, mode):
        return _size(dtype) * _numel(s.n, s.c, *s.coarse_hw) + 8 * _numel(s.n, *s.out_hw)


class ModelBench(OpBench):
    """FCN-8s: a training step (forward + loss + backward; mode "full") and inference (labels). fcn_fast providers
    run ``fused=True`` (upsample_add skips, upsample_cross_entropy loss, upsample_argmax prediction), eager runs the
    same weights with ``fused=False`` and F.cross_entropy / argmax. Eval mode (dropout off) so every provider computes
    the same function; the images/s and peak memory of the step are what is compared."""

    name = "fcn8s"
    modes = ("full", "inference")
    grad_keys = ()
    bytes_formula = {}
    compile_on_cpu = False  # compiling VGG16 forward + backward on a few CPU cores takes minutes
    model = True

    def available(self):
        try:
            from fcn_fast import models  # noqa: F401
        except ImportError as exc:
            return f"fcn_fast.models is not importable ({exc}); it lands from branch 'models'"
        return None

    def _build(self, s, device, fused: bool):
        from fcn_fast import models

        torch.manual_seed(0)  # one set of weights for every provider
        model = models.build("fcn8s", num_classes=s.c, fused=fused, width=s.width)
        # The scorers start at zero (as in the paper): logits, gradients and labels would all be trivial; small
        # random scorers make every provider compute, and the check compare, real numbers.
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1 and not bool(p.any()):
                    p.copy_(0.01 * torch.randn(p.shape, generator=gen))
        return model.to(device).eval()

    def inputs(self, s, dtype, device, gen):
        return {"image": _randn((s.n, 3, *s.out_hw), dtype, device, gen),
                "target": _targets(s.n, s.out_hw, s.c, device, gen)}

    def eager(self, s, device, dtype):
        model = self._build(s, device, fused=False)
        return Provider("eager", lambda inp: F.cross_entropy(model(inp["image"]), inp["target"], ignore_index=IGNORE_INDEX),
                        infer_fn=lambda inp: model(inp["image"]).argmax(1), params=list(model.parameters()))

    def fused(self, s, device, dtype, backend):
        from fcn_fast.nn import UpsampleCrossEntropyLoss
        from fcn_fast import use_backend

        model = self._build(s, device, fused=True)
        loss = UpsampleCrossEntropyLoss(ignore_index=IGNORE_INDEX, backend=backend)

        def step(inp):
            with use_backend(backend):
                return loss(model.coarse(inp["image"]), inp["target"])

        def predict(inp):
            with use_backend(backend):
                return model.predict(inp["image"])

        return Provider(f"fcn_fast:{backend}", step, infer_fn=predict, params=list(model.parameters()))

    def bytes(self, s, dtype, mode):
        return None  # the convolutions bound it: images/s is the figure


class TorchvisionStepBench(OpBench):
    """A training step (forward, loss, backward; mode "full") of a torchvision segmentation model with its aux head
    (``aux_loss=True``, as torchvision's reference recipe trains FCN and DeepLabV3): eager is the original model and
    the reference script's criterion (``F.interpolate`` to the input in the model, ``F.cross_entropy`` per head, aux
    weighted 0.5); fcn_fast runs the same weights through ``fcn_fast.integrations.fuse`` (coarse logits into
    ``SegmentationLoss``: upsampling and loss fused per head). Eval mode (dropout off, batch-norm running statistics)
    so both compute the same function; time and peak memory of the step are what is compared."""

    modes = ("full",)
    grad_keys = ()
    bytes_formula = {}
    compile_on_cpu = False
    model = True

    def __init__(self, builder: str):
        self.name = builder

    def available(self):
        try:
            from torchvision.models import segmentation  # noqa: F401
        except ImportError as exc:
            return f"torchvision is not installed ({exc})"
        return None

    def _build(self, s, device):
        from torchvision.models import segmentation

        torch.manual_seed(0)  # one set of weights for both providers
        model = getattr(segmentation, self.name)(weights=None, weights_backbone=None, num_classes=s.c, aux_loss=True)
        return model.to(device).eval()

    def inputs(self, s, dtype, device, gen):
        return {"image": _randn((s.n, 3, *s.out_hw), dtype, device, gen),
                "target": _targets(s.n, s.out_hw, s.c, device, gen)}

    def eager(self, s, device, dtype):
        model = self._build(s, device)

        def step(inp):
            out = model(inp["image"])
            return (F.cross_entropy(out["out"], inp["target"], ignore_index=IGNORE_INDEX)
                    + 0.5 * F.cross_entropy(out["aux"], inp["target"], ignore_index=IGNORE_INDEX))

        return Provider("eager", step, params=list(model.parameters()))

    def fused(self, s, device, dtype, backend):
        from fcn_fast.integrations import SegmentationLoss, fuse

        model = fuse(self._build(s, device), backend=backend)
        loss = SegmentationLoss(ignore_index=IGNORE_INDEX, aux_weight=0.5, backend=backend)
        return Provider(f"fcn_fast:{backend}", lambda inp: loss(model.coarse(inp["image"]), inp["target"]),
                        params=list(model.parameters()))

    def bytes(self, s, dtype, mode):
        return None  # the convolutions bound it: time and peak memory are the figures


TORCHVISION_STEPS = ("deeplabv3_resnet50", "fcn_resnet50")


def is_model(op: str) -> bool:
    """Whether an op name is a whole-network case (see OpBench.model)."""
    return op in OPS and OPS[op].model


OPS: Dict[str, OpBench] = {op.name: op for op in (UpsampleAddBench(), CrossEntropyBench(), UpsampleCrossEntropyBench(),
                                                   UpsampleArgmaxBench(), ModelBench(),
                                                   *(TorchvisionStepBench(b) for b in TORCHVISION_STEPS))}


# ---- the shapes -----------------------------------------------------------------------------------------------------
# Caffe FCN-8s at 500x500 (conv1_1 pad 100, ceil-mode pools): score_fr 16x16, score_pool4 44x44, score_pool3 88x88;
# upscore2 16 -> 34 (+ pool4 cropped at 5), upscore_pool4 34 -> 70 (+ pool3 at 9), upscore8 70 -> 568 cropped at 31.
# Other scenes use centred crops: a deconvolution by f of h is (h + 1) * f long, so out h * f sits at offset f // 2.

def _scene_shapes(tag: str, n: int, c: int, out_hw: Tuple[int, int], note: str, f2: bool = True,
                  interp: bool = False) -> Dict[str, List[Shape]]:
    H, W = out_hw
    coarse8 = (H // 8, W // 8)
    up8 = Shape(f"{tag} x8", n, c, out_hw, coarse8, 8, (4, 4), note=note)
    adds = [up8]
    if f2:
        adds.insert(0, Shape(f"{tag} x2+skip", n, c, out_hw, (H // 2, W // 2), 2, (1, 1), out_hw, note=note))
    if interp:
        adds.append(Shape(f"{tag} x2+skip interp", n, c, out_hw, (H // 2, W // 2), 2, (0, 0), out_hw, mode="interp",
                          note=note))
    ce = Shape(tag, n, c, out_hw, note=note)
    return {"upsample_add": adds, "softmax_cross_entropy": [ce], "upsample_cross_entropy": [up8],
            "upsample_argmax": [up8]}


def _caffe500(n: int = 1, c: int = 21, note: str = "", model: bool = True) -> Dict[str, List[Shape]]:
    up8 = Shape("caffe500 upscore8", n, c, (500, 500), (70, 70), 8, (31, 31), note=note)
    return {
        "upsample_add": [
            Shape("caffe500 upscore2+pool4", n, c, (34, 34), (16, 16), 2, (0, 0), (44, 44), (5, 5), note=note),
            Shape("caffe500 upscore_pool4+pool3", n, c, (70, 70), (34, 34), 2, (0, 0), (88, 88), (9, 9), note=note),
            up8,
        ],
        "softmax_cross_entropy": [Shape("caffe500", n, c, (500, 500), note=note)],
        "upsample_cross_entropy": [up8],
        "upsample_argmax": [up8],
        "fcn8s": [Shape("caffe500", n, c, (500, 500), note=note)] if model else [],
    }


def _merge(*scenes: Dict[str, List[Shape]]) -> Dict[str, List[Shape]]:
    out: Dict[str, List[Shape]] = {}
    for scene in scenes:
        for op, shapes in scene.items():
            out.setdefault(op, []).extend(shapes)
    return out


def scenes(device_type: str, quick: bool) -> Dict[str, List[Shape]]:
    """Shapes per op. The GPU runs the batch sizes of the workloads named (VOC training batches, Cityscapes, ADE20K);
    the CPU runs smaller ones (said in each row's note)."""
    if quick:
        tiny = _scene_shapes("quick128", 1, 21, (128, 128), "quick: tiny shapes")
        tiny["fcn8s"] = [Shape("quick64", 1, 21, (64, 64), width=0.125, note="quick: width 1/8")]
        for builder in TORCHVISION_STEPS:
            tiny[builder] = [Shape("quick64", 1, 21, (64, 64), note="quick: tiny shapes")]
        return tiny
    if device_type == "cuda":
        return _merge(
            _caffe500(),
            _scene_shapes("voc512", 16, 21, (512, 512), "", interp=True),
            _scene_shapes("cityscapes", 2, 19, (1024, 2048), ""),
            _scene_shapes("ade512", 8, 150, (512, 512), "", f2=False),
            {"fcn8s": [Shape("voc512", 8, 21, (512, 512))]},
            {builder: [Shape(f"voc512 n{n}", n, 21, (512, 512)) for n in (4, 8)] for builder in TORCHVISION_STEPS},
        )
    cpu = "batch scaled down for the CPU: N={} (GPU N={})"
    return _merge(
        _caffe500(model=False),  # a full-width VGG16 step at 500x500 takes tens of seconds on a few cores
        _scene_shapes("voc512", 2, 21, (512, 512), cpu.format(2, 16), interp=True),
        _scene_shapes("cityscapes", 1, 19, (1024, 2048), cpu.format(1, 2)),
        _scene_shapes("ade512", 1, 150, (512, 512), cpu.format(1, 8), f2=False),
        {"fcn8s": [Shape("cpu256", 1, 21, (256, 256), width=0.25, note="CPU case: width 1/4 of every channel count")]},
        {builder: [Shape(f"voc512 n{n}", n, 21, (512, 512), note=cpu.format(n, "4, 8")) for n in (1, 2)]
         for builder in TORCHVISION_STEPS},
    )


def dtypes_for(device_type: str, quick: bool) -> Tuple[str, ...]:
    if quick:
        return ("fp32",)
    # fp16 arithmetic on the CPU is emulated, slow in every provider and used by nobody: GPU only.
    return ("fp32", "bf16", "fp16") if device_type == "cuda" else ("fp32", "bf16")


def build_cases(device_type: str, quick: bool, ops: Optional[Sequence[str]] = None,
                dtypes: Optional[Sequence[str]] = None, modes: Optional[Sequence[str]] = None,
                match: Optional[str] = None) -> List[Case]:
    """Every case of the run (all modes of one (op, shape, dtype) form one case, measured together)."""
    unknown = [o for o in (ops or ()) if o not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; choose from {list(OPS)}")
    cases = []
    for op, shapes in scenes(device_type, quick).items():
        if ops and op not in ops:
            continue
        for shape in shapes:
            if match and match not in shape.label:
                continue
            for dtype in dtypes or dtypes_for(device_type, quick):
                if OPS[op].model and dtype != "fp32":
                    continue  # models train in fp32 here; mixed precision is not part of this suite
                want = tuple(m for m in OPS[op].modes if not modes or m in modes)
                if quick:
                    want = tuple(m for m in want if m != "backward") or want
                if want:
                    cases.append(Case(op, shape, dtype, want))
    # dtype first, then scene, then op: a run cut short by --time-budget still covers every op in fp32.
    dtype_rank = {d: i for i, d in enumerate(DTYPES)}
    scene_rank = {scene: i for i, scene in enumerate(dict.fromkeys(c.shape.label.split()[0] for c in cases))}
    return sorted(cases, key=lambda c: (dtype_rank[c.dtype], scene_rank[c.shape.label.split()[0]]))

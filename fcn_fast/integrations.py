"""One call that puts the fused head under a torchvision or segmentation_models_pytorch (smp) segmentation model.

    fused = fcn_fast.integrations.fuse(model)          # shares model's parameters; model keeps working as before
    criterion = fcn_fast.integrations.SegmentationLoss(ignore_index=255)   # aux head weighted 0.5
    loss = criterion(fused(images), target)            # train mode: coarse logits + geometry, never full resolution
    logits = fused.eval()(images)                      # eval mode: what the original returns
    labels = fused.predict(images)                     # (N, H, W) through upsample_argmax

Both libraries end their models in a bilinear upsampling of coarse class scores to the input size: torchvision with
``F.interpolate(..., size=input, align_corners=False)`` after ``classifier(backbone(x)["out"])``, smp with a
``SegmentationHead`` whose ``nn.Upsample(scale_factor=s, mode="bilinear", align_corners=True)`` follows a
convolution. :func:`fuse` recognises those models by their class and their head, stops before that upsampling and
hands it, with its exact geometry, to the fused ops (docs/integrations.md).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Mapping, Optional, Tuple

import torch
from torch import nn

from fcn_fast.models._base import CoarseOutput
from fcn_fast.ops import _ce_common
from fcn_fast.ops.cross_entropy import softmax_cross_entropy
from fcn_fast.ops.upsample_cross_entropy import upsample_cross_entropy

EVAL_OUTPUTS = ("logits", "labels")
AUX_WEIGHT = 0.5  # torchvision's references/segmentation/train.py: losses["out"] + 0.5 * losses["aux"]


def _nominal_factor(out: Tuple[Any, Any], coarse: Tuple[Any, Any]) -> int:
    """The output stride of an ``interp`` upsampling to an explicit size (the larger ratio of sizes, rounded up).
    Informational only: with ``out_size`` given the ops read no factor, so it stays 1 where the sizes are symbolic
    (torch.export) rather than guard on them."""
    if all(type(v) is int for v in (*out, *coarse)):
        return max(1, math.ceil(max(out[0] / coarse[0], out[1] / coarse[1])))
    return 1


# ---- what each supported family looks like ---------------------------------------------------------------------

class _Family:
    """How one library's models compute their coarse scores. ``coarse(model, x, aux)`` returns the original's output
    structure with a CoarseOutput in place of each upsampled score map."""

    name = ""

    def coarse(self, model: nn.Module, x: torch.Tensor, aux: bool):
        raise NotImplementedError

    @staticmethod
    def main(output) -> CoarseOutput:
        """The CoarseOutput of the main head in an output structure."""
        raise NotImplementedError


class _Torchvision(_Family):
    """torchvision.models.segmentation: FCN and DeepLabV3 (``_SimpleSegmentationModel``: backbone -> dict of
    features, classifier on "out", optional aux_classifier on "aux") and LRASPP (classifier on the feature dict).
    Each score map is resized to the input by ``F.interpolate(size=input, mode="bilinear", align_corners=False)``;
    the output is an OrderedDict "out" (and "aux")."""

    def __init__(self, name: str, lraspp: bool):
        self.name, self.lraspp = name, lraspp

    def coarse(self, model, x, aux):
        out_size = (x.shape[-2], x.shape[-1])
        features = model.backbone(x)
        scores = OrderedDict()
        if self.lraspp:
            scores["out"] = model.classifier(features)
        else:
            scores["out"] = model.classifier(features["out"])
            if aux and model.aux_classifier is not None:
                scores["aux"] = model.aux_classifier(features["aux"])
        return OrderedDict(
            (key, CoarseOutput(s, _nominal_factor(out_size, (s.shape[-2], s.shape[-1])), (0, 0), out_size, "interp",
                               False))
            for key, s in scores.items())

    @staticmethod
    def main(output):
        return output["out"]


class _SMP(_Family):
    """segmentation_models_pytorch: encoder -> decoder -> SegmentationHead(conv, nn.Upsample(scale_factor=s,
    bilinear, align_corners), activation), plus an optional classification head on the deepest features (the
    output is then a tuple (masks, labels))."""

    def __init__(self, name: str, factor: int, align_corners: bool):
        self.name, self.factor, self.align_corners = name, factor, align_corners

    def coarse(self, model, x, aux):
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            model.check_input_shape(x)  # as the original's forward does
        features = model.encoder(x)
        scores = model.segmentation_head[0](model.decoder(features))
        h, w = scores.shape[-2], scores.shape[-1]
        masks = CoarseOutput(scores, self.factor, (0, 0), (h * self.factor, w * self.factor), "interp",
                             self.align_corners)
        if aux and model.classification_head is not None:
            return masks, model.classification_head(features[-1])
        return masks

    @staticmethod
    def main(output):
        return output[0] if isinstance(output, tuple) else output


def _torchvision_family(model: nn.Module) -> Optional[_Family]:
    try:
        from torchvision.models.segmentation import _utils, lraspp
    except ImportError:
        return None
    if isinstance(model, lraspp.LRASPP) and type(model).forward is lraspp.LRASPP.forward:
        return _Torchvision(f"torchvision {type(model).__name__}", lraspp=True)
    if isinstance(model, _utils._SimpleSegmentationModel) and \
            type(model).forward is _utils._SimpleSegmentationModel.forward:
        return _Torchvision(f"torchvision {type(model).__name__}", lraspp=False)
    return None


def _smp_family(model: nn.Module) -> Optional[_Family]:
    try:
        from segmentation_models_pytorch.base import SegmentationModel
        from segmentation_models_pytorch.base.heads import SegmentationHead
        from segmentation_models_pytorch.base.modules import Activation
    except ImportError:
        return None
    if not isinstance(model, SegmentationModel):
        return None
    arch = f"smp {type(model).__name__}"
    head = getattr(model, "segmentation_head", None)
    if type(model).forward is not SegmentationModel.forward or type(head) is not SegmentationHead:
        raise TypeError(f"fcn_fast.integrations.fuse: {arch} computes its output in its own forward or head "
                        f"({type(head).__name__}), not smp's encoder -> decoder -> SegmentationHead(conv, upsample, "
                        f"activation): not supported")
    conv, upsample, activation = head
    if isinstance(upsample, nn.Identity):
        raise ValueError(f"fcn_fast.integrations.fuse: not applicable to {arch}: its segmentation head has no final "
                         f"upsampling (the decoder already works at the input's resolution), so there are no coarse "
                         f"logits to fuse with the loss or the argmax")
    if not isinstance(upsample, nn.Upsample) or upsample.mode != "bilinear" or upsample.size is not None:
        raise TypeError(f"fcn_fast.integrations.fuse: {arch}'s head upsamples with {upsample!r}; only a bilinear "
                        f"nn.Upsample(scale_factor=...) is supported")
    scales = upsample.scale_factor if isinstance(upsample.scale_factor, tuple) else (upsample.scale_factor,) * 2
    if len(set(scales)) != 1 or float(scales[0]) != int(scales[0]) or int(scales[0]) < 1:
        raise ValueError(f"fcn_fast.integrations.fuse: {arch}'s head upsamples by scale_factor="
                         f"{upsample.scale_factor}; only one integer factor for both axes is supported")
    if not (isinstance(activation, Activation) and isinstance(activation.activation, nn.Identity)):
        raise ValueError(f"fcn_fast.integrations.fuse: {arch}'s head ends in the activation "
                         f"{getattr(activation, 'activation', activation)!r}: the fused loss and argmax take logits; "
                         f"build the model with activation=None")
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"fcn_fast.integrations.fuse: {arch}'s head starts with {type(conv).__name__}, not a "
                        f"Conv2d: not supported")
    return _SMP(arch, int(scales[0]), bool(upsample.align_corners))


_FAMILIES: Tuple[Callable[[nn.Module], Optional[_Family]], ...] = (_torchvision_family, _smp_family)


# ---- the fused model ---------------------------------------------------------------------------------------------

def _apply(output, fn):
    """fn applied to every CoarseOutput of an output structure (dict, tuple or a single one)."""
    if isinstance(output, CoarseOutput):
        return fn(output)
    if isinstance(output, Mapping):
        return OrderedDict((k, _apply(v, fn)) for k, v in output.items())
    if isinstance(output, tuple):
        return tuple(_apply(v, fn) for v in output)
    return output


class FusedSegmentationModel(nn.Module):
    """A torchvision or smp segmentation model running the fused head (built by :func:`fuse`).

    Its submodules are the original's own (same names, same parameter and buffer objects), so its ``state_dict``
    is the original's and loads into it and back; the original keeps working unchanged.

    * training mode: ``forward`` returns the original's output structure with a :class:`CoarseOutput` (the score
      map before the final bilinear upsampling, and that upsampling's exact geometry) in place of each full-resolution
      logits tensor, for :class:`SegmentationLoss` or ``fcn_fast.nn.UpsampleCrossEntropyLoss``.
    * eval mode: what the original returns (full-resolution logits, through ``fcn_fast.upsample_add``), or with
      ``eval_output="labels"`` the main head's labels (N, H, W) through ``fcn_fast.upsample_argmax``.
    """

    def __init__(self, original: nn.Module, family: _Family, eval_output: str = "logits",
                 backend: Optional[str] = None) -> None:
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        # Kept outside the module tree: its parameters are this module's already. train()/eval() go through it so
        # that the original's own train() (smp keeps a frozen encoder's norm layers in eval) decides.
        object.__setattr__(self, "_original", original)
        self.family, self.eval_output, self.backend = family, eval_output, backend
        self.training = original.training

    @property
    def original(self) -> nn.Module:
        return self._original

    def train(self, mode: bool = True) -> "FusedSegmentationModel":
        self._original.train(mode)
        self.training = mode
        return self

    def coarse(self, x: torch.Tensor, *, aux: bool = True):
        """The original's output structure with a CoarseOutput per score map, in any mode. ``aux=False`` skips the
        auxiliary heads (torchvision's aux classifier, smp's classification head)."""
        # The original's submodules are this module's (shared objects); heads it set to None are only there.
        return self.family.coarse(self._original, x, aux)

    def forward(self, x: torch.Tensor):
        if self.training:
            return self.coarse(x)
        if self.eval_output == "labels":
            return self.predict(x)
        return _apply(self.coarse(x), lambda c: c.upsample(backend=self.backend))

    def predict(self, x: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Labels of the main head, (N, H, W) of ``dtype`` (int64 or uint8), without full-resolution logits."""
        with torch.no_grad():
            return self.family.main(self.coarse(x, aux=False)).argmax(dtype=dtype, backend=self.backend)

    def extra_repr(self) -> str:
        parts = [f"family={self.family.name!r}"]
        if self.eval_output != "logits":
            parts.append(f"eval_output={self.eval_output!r}")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


def fuse(model: nn.Module, *, eval_output: str = "logits", backend: Optional[str] = None) -> FusedSegmentationModel:
    """The model, running the fused head: one call for torchvision and smp segmentation models.

    Args:
        model: ``torchvision.models.segmentation`` ``fcn_resnet50/101``, ``deeplabv3_resnet50/101/mobilenet_v3_large``,
            ``lraspp_mobilenet_v3_large`` (with or without ``aux_loss``), or a segmentation_models_pytorch model whose
            ``SegmentationHead`` ends in bilinear upsampling (DeepLabV3, DeepLabV3Plus, FPN, PSPNet, PAN, UPerNet,
            Segformer; ``activation=None``).
        eval_output: what ``forward`` returns in eval mode: ``"logits"`` (what the original returns) or ``"labels"``
            (the main head's (N, H, W) int64 labels, as :meth:`FusedSegmentationModel.predict`).
        backend: the fused ops' backend (None: ``fcn_fast.use_backend`` / the device's default).

    Returns:
        A :class:`FusedSegmentationModel` sharing the model's parameters.

    Raises:
        ValueError: a model it recognises but cannot fuse (Unet-style heads with no final upsampling, an activation
            after the head, a non-integer scale factor) or a bad ``eval_output``.
        TypeError: a model it does not recognise.
    """
    if eval_output not in EVAL_OUTPUTS:
        raise ValueError(f"fcn_fast.integrations.fuse: eval_output must be one of {EVAL_OUTPUTS}, got {eval_output!r}")
    if isinstance(model, FusedSegmentationModel):
        raise TypeError("fcn_fast.integrations.fuse: the model is fused already")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fcn_fast.integrations.fuse: model must be a torch.nn.Module, got {type(model).__name__}")
    from fcn_fast.models import FCN

    if isinstance(model, FCN):
        raise TypeError("fcn_fast.integrations.fuse: fcn_fast.models run the fused head already (fused=True): use "
                        "model.coarse(x) with fcn_fast.nn.UpsampleCrossEntropyLoss, and model.predict(x)")
    own = [n for n, _ in model.named_parameters(recurse=False)] + [n for n, _ in model.named_buffers(recurse=False)]
    for detect in _FAMILIES:
        family = detect(model)
        if family is not None:
            if own:
                raise TypeError(f"fcn_fast.integrations.fuse: {family.name} holds tensors of its own ({own}), which "
                                f"the library's models do not: not supported")
            return FusedSegmentationModel(model, family, eval_output, backend)
    raise TypeError(
        f"fcn_fast.integrations.fuse: {type(model).__module__}.{type(model).__name__} is not a model it knows. "
        f"Supported: torchvision.models.segmentation FCN, DeepLabV3 and LRASPP, and segmentation_models_pytorch "
        f"models whose SegmentationHead ends in bilinear upsampling (DeepLabV3, DeepLabV3Plus, FPN, PSPNet, PAN, "
        f"UPerNet, Segformer). Any other model can call fcn_fast.upsample_cross_entropy / upsample_argmax on its "
        f"coarse scores itself")


# ---- the loss --------------------------------------------------------------------------------------------------

class SegmentationLoss(nn.Module):
    """Softmax cross-entropy of a segmentation model's output, the auxiliary head weighted as torchvision's reference
    training script weights it: ``loss(out) + aux_weight * loss(aux)``.

    ``forward(output, target)`` takes what a model returns: a :class:`CoarseOutput` (fused: upsampling and loss in
    one op, ``fcn_fast.upsample_cross_entropy``), a full-resolution logits tensor (``fcn_fast.softmax_cross_entropy``,
    ``F.cross_entropy``'s semantics), or a mapping of either with the key ``"out"`` and optionally ``"aux"``
    (torchvision's dicts). Arguments as ``torch.nn.CrossEntropyLoss``, but ``ignore_index`` defaults to 255 (VOC's
    border label, torchvision's reference script's value).
    """

    def __init__(self, weight: Optional[torch.Tensor] = None, ignore_index: int = 255, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, aux_weight: float = AUX_WEIGHT, check_targets: bool = True,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.aux_weight, self.check_targets, self.backend = aux_weight, check_targets, backend

    def _one(self, output, target: torch.Tensor) -> torch.Tensor:
        options = dict(weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                       label_smoothing=self.label_smoothing, check_targets=self.check_targets, backend=self.backend)
        if isinstance(output, CoarseOutput):
            return upsample_cross_entropy(output.logits, target, factor=output.factor, mode=output.mode,
                                          offset=output.offset, align_corners=output.align_corners, **options)
        if isinstance(output, torch.Tensor):
            return softmax_cross_entropy(output, target, **options)
        if isinstance(output, tuple):
            raise TypeError("SegmentationLoss: output is a tuple (an smp model with a classification head returns "
                            "(masks, labels)): pass output[0], and give the labels a loss of their own")
        raise TypeError(f"SegmentationLoss: output must be a CoarseOutput, a Tensor or a mapping of them, got "
                        f"{type(output).__name__}")

    def forward(self, output, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, Mapping):
            return self._one(output, target)
        unknown = [k for k in output if k not in ("out", "aux")]
        if "out" not in output or unknown:
            raise ValueError(f"SegmentationLoss: a mapping output needs the key 'out' and at most 'aux' besides it, "
                             f"got keys {list(output)}")
        loss = self._one(output["out"], target)
        if "aux" in output:
            loss = loss + self.aux_weight * self._one(output["aux"], target)
        return loss

    def extra_repr(self) -> str:
        return _ce_common.loss_repr(self, shown=[f"aux_weight={self.aux_weight}"])


__all__ = ["AUX_WEIGHT", "EVAL_OUTPUTS", "FusedSegmentationModel", "SegmentationLoss", "fuse"]

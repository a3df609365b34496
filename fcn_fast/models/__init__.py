"""The FCN family (Long, Shelhamer & Darrell): VGG16 FCN-32s/16s/8s/8s at-once with the reference Caffe geometry or
``geometry="same"``, and ResNet-50 FCN-8s; fused head (fcn_fast.upsample_add) or plain PyTorch layers.

    model = fcn_fast.models.build("fcn8s", num_classes=21, width=1/8)
    out = model.coarse(x)                                      # CoarseOutput: coarse logits + geometry
    loss = fcn_fast.nn.UpsampleCrossEntropyLoss()(out, target)  # final x8 + crop fused into the loss
    logits = model(x); labels = model.predict(x)

See the README, "Models: the FCN family".
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

from torch import nn

from fcn_fast.models._base import FCN, INPUT_TRANSFORMS, BilinearDeconv, CoarseOutput
from fcn_fast.models._complexity import complexity
from fcn_fast.models._weights import init_from, load_backbone_weights
from fcn_fast.models.resnet import ResNetFCN8s
from fcn_fast.models.vgg import VGGFCN, caffe_crops

GEOMETRIES = ("caffe", "same")


def _vgg(stride: int, atonce: bool = False) -> Callable[..., FCN]:
    def make(arch, num_classes, fused, width, geometry, learnable_upsample, dropout):
        geometry = "caffe" if geometry is None else geometry
        if geometry not in GEOMETRIES:
            raise ValueError(f"build({arch!r}): geometry must be one of {GEOMETRIES}, got {geometry!r}")
        if learnable_upsample and geometry != "caffe":
            raise ValueError(f"build({arch!r}): learnable_upsample needs geometry='caffe' (the 'same' geometry "
                             f"upsamples by bilinear interpolation, which has no weights)")
        return VGGFCN(arch, num_classes, stride, atonce=atonce, fused=fused, width=width, geometry=geometry,
                      learnable_upsample=learnable_upsample, dropout=dropout)
    return make


def _resnet(arch, num_classes, fused, width, geometry, learnable_upsample, dropout):
    if geometry not in (None, "same"):
        raise ValueError(f"build({arch!r}): ResNet-50 has one geometry ('same': padded convolutions, bilinear "
                         f"interpolation to each skip), got geometry={geometry!r}")
    if learnable_upsample:
        raise ValueError(f"build({arch!r}): learnable_upsample applies to the VGG models' Caffe deconvolutions; "
                         f"the ResNet-50 head upsamples by bilinear interpolation")
    # dropout: the VGG nets' drop6/drop7 follow fc6/fc7, which ResNet-50 does not have.
    return ResNetFCN8s(arch, num_classes, fused=fused, width=width)


_MODELS: Dict[str, Callable[..., FCN]] = {
    "fcn32s": _vgg(32),
    "fcn16s": _vgg(16),
    "fcn8s": _vgg(8),
    "fcn8s_atonce": _vgg(8, atonce=True),
    "fcn8s_resnet50": _resnet,
}


def available() -> List[str]:
    """The names :func:`build` accepts."""
    return list(_MODELS)


def _check_number(arch: str, name: str, value, low: float, high: Optional[float] = None, *, open_low: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"build({arch!r}): {name} must be a number, got {value!r}")
    if (value <= low if open_low else value < low) or (high is not None and value >= high):
        bound = f"{'>' if open_low else '>='} {low}" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"build({arch!r}): {name} must be {bound}, got {value!r}")
    return float(value)


def build(name: str, num_classes: int = 21, *, fused: bool = True, width: float = 1.0, geometry: Optional[str] = None,
          learnable_upsample: bool = False, backbone_weights: Optional[os.PathLike] = None,
          freeze_backbone: bool = False, dropout: float = 0.5, input_transform: Optional[str] = None) -> FCN:
    """Build an FCN.

    Args:
        name: one of :func:`available`: ``fcn32s``, ``fcn16s``, ``fcn8s``, ``fcn8s_atonce``, ``fcn8s_resnet50``.
        num_classes: output classes (21 for PASCAL VOC).
        fused: run the skip fusions as ``fcn_fast.upsample_add`` (True) or plain PyTorch layers (False).
        width: channel multiplier of every layer, fc6/fc7 included (e.g. 1/8 for a CPU demo); at least 1 channel.
        geometry: VGG: ``"caffe"`` (default; the reference nets: conv1_1 pad 100, valid fc6, crops) or ``"same"``
            (conv1_1 pad 1, fc6 pad 3, bilinear interpolation to the skip sizes, no crops). ResNet-50: ``"same"``.
        learnable_upsample: Caffe geometry only: the deconvolutions become learnable C x C transposed convolutions
            (bilinear on the diagonal at init); the fused path then runs them as plain layers (one warning).
        backbone_weights: path to a torchvision-format ImageNet state dict (``vgg16`` / ``resnet50``); never
            downloads. Torchvision's VGG16 was trained on RGB ImageNet-normalised input, so a VGG model given these
            weights takes ``input_transform="imagenet"`` unless told otherwise.
        freeze_backbone: classifier-only fine-tuning: the ImageNet layers (VGG convs + fc6/fc7, ResNet body) get
            ``requires_grad=False`` and frozen batch norms stay in eval mode.
        dropout: probability of the VGG nets' drop6/drop7 (unused by ResNet-50, which has no fc layers).
        input_transform: ``"caffe_bgr"`` (BGR 0-255 minus the Caffe mean) or ``"imagenet"`` (RGB 0-1, ImageNet
            mean/std); default: the one the weights expect (VGG: caffe_bgr, ResNet-50 and torchvision VGG16:
            imagenet). Read by the data pipeline.

    Returns:
        an :class:`FCN` module: ``model(x)`` logits (N, C, H, W), ``model.coarse(x)`` a :class:`CoarseOutput`,
        ``model.predict(x)`` int64 labels (N, H, W); attributes ``arch``, ``num_classes``, ``input_transform``.
    """
    if name not in _MODELS:
        raise ValueError(f"build: unknown model {name!r}; choose from {', '.join(_MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"build({name!r}): num_classes must be an int >= 1, got {num_classes!r}")
    width = _check_number(name, "width", width, 0.0, open_low=True)
    dropout = _check_number(name, "dropout", dropout, 0.0, 1.0, open_low=False)
    if input_transform is not None and input_transform not in INPUT_TRANSFORMS:
        raise ValueError(f"build({name!r}): input_transform must be one of {INPUT_TRANSFORMS}, got {input_transform!r}")
    model = _MODELS[name](name, num_classes, bool(fused), width, geometry, bool(learnable_upsample), dropout)
    if backbone_weights is not None:
        load_backbone_weights(model, backbone_weights)
        model.input_transform = "imagenet"
    if input_transform is not None:
        model.input_transform = input_transform
    if freeze_backbone:
        model.freeze_backbone()
    return model


__all__ = [
    "FCN", "GEOMETRIES", "INPUT_TRANSFORMS", "BilinearDeconv", "CoarseOutput", "ResNetFCN8s", "VGGFCN", "available",
    "build", "caffe_crops", "complexity", "init_from", "load_backbone_weights",
]

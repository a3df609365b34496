"""Weight loading: ImageNet backbones from torchvision-format state-dict files (never a download) and the paper's
staged initialisation (FCN-16s from FCN-32s, FCN-8s from FCN-16s)."""

from __future__ import annotations

import os
from typing import Dict, List, Mapping, Union

import torch
from torch import nn

from fcn_fast.models._base import FCN
from fcn_fast.models.resnet import ResNetFCN8s, torchvision_resnet50_keys
from fcn_fast.models.vgg import VGGFCN, torchvision_vgg16_keys

Source = Union[str, os.PathLike, Mapping[str, torch.Tensor], nn.Module]


def _state_dict(source: Source, what: str) -> Dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{what}: no such file {os.fspath(source)!r}")
        source = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(source, Mapping) or not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise TypeError(f"{what}: expected a state dict (a mapping of names to tensors), a path to one, or a model; "
                        f"got {type(source).__name__}")
    return dict(source)


def _short(keys: List[str], most: int = 8) -> str:
    shown = ", ".join(keys[:most])
    return f"[{shown}{f', ... ({len(keys) - most} more)' if len(keys) > most else ''}]"


def _raise_keys(what: str, missing: List[str], unexpected: List[str]) -> None:
    if missing or unexpected:
        raise ValueError(f"{what}: the state dict does not fit: missing keys {_short(missing)}, "
                         f"unexpected keys {_short(unexpected)}")


def _copy(what: str, model: FCN, pairs: Dict[str, torch.Tensor]) -> None:
    """Copy tensors into the model's state by key, reshaping only where the element count and layout agree
    (a Linear weight into a convolution's)."""
    target = model.state_dict()
    bad = [f"{k}: expected {tuple(target[k].shape)}, got {tuple(v.shape)}" for k, v in pairs.items()
           if v.numel() != target[k].numel() or (v.dim() == target[k].dim() and v.shape != target[k].shape)]
    if bad:
        raise ValueError(f"{what}: shapes do not fit (a different width or number of classes?): {'; '.join(bad[:8])}")
    with torch.no_grad():
        for k, v in pairs.items():
            target[k].copy_(v.reshape(target[k].shape))


def load_backbone_weights(model: FCN, source: Source) -> FCN:
    """Load ImageNet weights from a torchvision-format state dict (file path or mapping): ``vgg16`` for the VGG
    FCNs (``classifier.0``/``classifier.3`` Linear layers reshaped into the fc6 7x7 / fc7 1x1 convolutions),
    ``resnet50`` for fcn8s_resnet50. The ImageNet scorer (``classifier.6`` / ``fc``) is dropped. Returns the model."""
    what = f"{model.arch}: backbone_weights"
    state = _state_dict(source, what)
    if isinstance(model, VGGFCN):
        keys, dropped = torchvision_vgg16_keys(), ("classifier.6.",)
    elif isinstance(model, ResNetFCN8s):
        keys, dropped = torchvision_resnet50_keys(model), ("fc.",)
    else:
        raise TypeError(f"{what}: no torchvision backbone for {type(model).__name__}")
    missing = [k for k in keys if k not in state]
    unexpected = [k for k in state if k not in keys and not k.startswith(dropped)]
    _raise_keys(what, missing, unexpected)
    _copy(what, model, {keys[k]: state[k] for k in keys})
    return model


def _is_new_layer(key: str) -> bool:
    """Layers a finer stage adds: skip scorers, at-once scales and upsampling."""
    layer = key.split(".")[0]
    return layer.startswith(("score_", "scale_", "upscore"))


def init_from(model: FCN, source: Source) -> FCN:
    """The paper's staged initialisation: ``model`` (e.g. FCN-16s) from the previous stage ``source`` (a trained
    FCN-32s model, its state dict or a path to it). Shared layers are copied; scorers the source lacks are zeroed;
    every upsampling layer is reset to bilinear (as the reference solve.py's ``surgery.interp``). Returns ``model``.

    Raises ValueError naming the missing/unexpected keys when the source is not an earlier stage of the same
    network, or the mismatching shapes (another width or number of classes)."""
    what = f"init_from({model.arch})"
    if not isinstance(model, FCN):
        raise TypeError(f"init_from: model must be an fcn_fast model, got {type(model).__name__}")
    state = _state_dict(source, what)
    target = model.state_dict()
    missing = [k for k in target if k not in state and not _is_new_layer(k)]
    # Upsampling layers of the source that the finer model lacks (FCN-32s's upscore, FCN-16s's upscore16) go away.
    unexpected = [k for k in state if k not in target and not k.split(".")[0].startswith("upscore")]
    _raise_keys(what, missing, unexpected)
    shared = {k: state[k] for k in target if k in state and not k.split(".")[0].startswith("upscore")}
    _copy(what, model, shared)
    with torch.no_grad():
        for k in target:
            if k not in state and k.split(".")[0].startswith("score_"):
                target[k].zero_()
    for layer in model.upsampling_layers().values():
        layer.reset_bilinear()
    return model

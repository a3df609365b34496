"""Checkpoints: written atomically (temporary file + rename, so a killed run never leaves a corrupt one), read back
with every mistake reported as a UserError naming the file.

A checkpoint is a dict: ``format``, ``model`` (name, num_classes, build options), ``class_names``, ``input_transform``,
``state_dict``, and for training checkpoints ``train`` (optimizer, scaler, step, epoch, history, RNG states, config).
"""

from __future__ import annotations

import os
import pickle
import re
import time
import zipfile
from typing import Any, Dict, Optional

import torch

from fcn_fast.errors import UserError

FORMAT = "fcn_fast.checkpoint/1"


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to ``path`` through a temporary file in the same folder, flushed to disk, then renamed over it:
    readers see the old file or the new one, never a partial one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, _paused_if_asked(f))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(folder: str) -> None:
    """Removes the temporary files of writes that a killed process left in ``folder``: partial checkpoints that
    nothing reads, each as large as a whole one."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if _TEMPORARY.fullmatch(name):
                os.remove(os.path.join(folder, name))


_TEMPORARY = re.compile(r"\..+\.tmp\d+")

# Tests kill a process while it writes a checkpoint. With FCN_FAST_TEST_PAUSE_SAVE=N:FILE, the N-th checkpoint this
# process writes stops after its first bytes are on disk, creates FILE and waits to be killed.
_PAUSE_ENV = "FCN_FAST_TEST_PAUSE_SAVE"
_saves = 0


def _paused_if_asked(f):
    global _saves
    _saves += 1
    setting = os.environ.get(_PAUSE_ENV)
    if not setting:
        return f
    count, marker = setting.split(":", 1)
    return _PausingWriter(f, marker) if int(count) == _saves else f


class _PausingWriter:
    def __init__(self, f, marker: str):
        self.f, self.marker = f, marker

    def write(self, data) -> int:
        written = self.f.write(data)
        self.f.flush()
        os.fsync(self.f.fileno())
        with open(self.marker, "w"):
            pass
        while True:
            time.sleep(1)
        return written  # never reached: the test kills the process

    def flush(self) -> None:
        self.f.flush()


def model_spec(name: str, num_classes: int, options: Dict[str, Any]) -> Dict[str, Any]:
    return {"name": name, "num_classes": int(num_classes), "options": dict(options)}


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    # torch.save writes a zip archive whose directory comes last (a truncated file has none) and a CRC-32 of every
    # record, which torch.load does not check: damaged tensor data would load silently.
    if not zipfile.is_zipfile(path):
        raise UserError(f"cannot read checkpoint {path}: it is not a whole torch.save archive (truncated, damaged or "
                        f"another kind of file; {os.path.getsize(path)} bytes)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:  # zipfile raises several types for a damaged archive
        raise UserError(f"cannot read checkpoint {path}: it is damaged ({type(exc).__name__}: {exc})") from None
    if bad is not None:
        raise UserError(f"cannot read checkpoint {path}: it is damaged (its record {bad} fails its checksum)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object
        raise UserError(f"cannot read checkpoint {path}: it holds Python objects other than tensors and plain data "
                        f"(an fcn_fast checkpoint holds none); it was not loaded, since unpickling them can run "
                        f"arbitrary code") from None
    except Exception as exc:  # torch.load raises many types for a damaged archive
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot read checkpoint {path}: it is damaged ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not an fcn_fast checkpoint (written by fcn-fast train)")
    return ckpt


def build_model(spec: Dict[str, Any], *, override: Optional[Dict[str, Any]] = None, path: str = ""):
    """The model a spec describes (untrained), with ``override`` build options (e.g. ``fused``)."""
    from fcn_fast import models

    options = dict(spec["options"])
    options.update(override or {})
    try:
        return models.build(spec["name"], num_classes=spec["num_classes"], **options)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path or 'model'}: {exc}") from None


def model_from_checkpoint(path: str, *, device="cpu", override: Optional[Dict[str, Any]] = None,
                          expect: Optional[str] = None):
    """(model with the checkpoint's weights, in eval mode, on ``device``; the checkpoint dict). ``expect``: the model
    name the caller needs, to refuse a checkpoint of another model with a clear message."""
    ckpt = load_checkpoint(path)
    spec = ckpt["model"]
    if expect is not None and spec["name"] != expect:
        raise UserError(f"checkpoint {path} holds a {spec['name']} model, not {expect}")
    model = build_model(spec, override=override, path=path)
    model.input_transform = ckpt.get("input_transform", model.input_transform)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path} does not fit a {spec['name']} model: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), ckpt

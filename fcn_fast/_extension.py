"""Loads the native kernels (fcn_fast._C) if they were built, and says why not otherwise; the same for the emulated
CUDA kernels (fcn_fast._C_emu, docs/emulator.md), on first use."""

from __future__ import annotations

import importlib.util
import json
from typing import Dict, Optional

import torch

_load_error: Optional[str] = None
_build_info: dict = {}

try:
    from fcn_fast import _C  # noqa: F401  (importing registers the kernel ops with torch)

    _build_info = json.loads(torch.ops.fcn_fast._build_info())
except Exception as exc:  # pragma: no cover - exercised only on a broken or missing build
    _load_error = f"the native extension fcn_fast._C could not be loaded ({type(exc).__name__}: {exc})"


def load_error() -> Optional[str]:
    """Why fcn_fast._C is unusable, or None when it loaded."""
    return _load_error


def has_cpu_kernels() -> bool:
    return _load_error is None


def has_cuda_kernels() -> bool:
    return _load_error is None and bool(_build_info.get("cuda"))


def build_info() -> dict:
    """What fcn_fast._C was compiled with ({} when it did not load)."""
    return dict(_build_info)


def emulated_built() -> bool:
    """Whether fcn_fast._C_emu exists (it may still fail to load: emulated_load_error says)."""
    return importlib.util.find_spec("fcn_fast._C_emu") is not None


_emulated: Dict[str, Optional[str]] = {}  # memo, not functools.lru_cache: Dynamo warns when tracing one


def emulated_load_error() -> Optional[str]:
    """Why fcn_fast._C_emu (the CUDA kernels compiled against the emulated CUDA execution model) is unusable, or None
    when it loaded (on the first call). Built only on request: FCN_FAST_BUILD_EMULATED=1 at install time."""
    if "error" not in _emulated:
        if not emulated_built():
            _emulated["error"] = "fcn_fast._C_emu is not built: install with FCN_FAST_BUILD_EMULATED=1 (docs/emulator.md)"
        else:
            try:
                from fcn_fast import _C_emu  # noqa: F401  (importing registers the fcn_fast_emu ops with torch)
            except Exception as exc:  # pragma: no cover - a broken build
                _emulated["error"] = f"fcn_fast._C_emu could not be loaded ({type(exc).__name__}: {exc})"
            else:
                _emulated["error"] = None
    return _emulated["error"]

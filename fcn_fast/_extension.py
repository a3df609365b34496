"""Loads the native kernels (fcn_fast._C) if they were built, and says why not otherwise."""

from __future__ import annotations

import json
from typing import Optional

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

"""Backend registry and selection.

Every op runs on one of these backends:
  reference      plain PyTorch, the ground truth; runs anywhere
  cpu            the C++/OpenMP kernels of fcn_fast._C; CPU tensors
  cuda           the CUDA kernels of fcn_fast._C; CUDA tensors
  triton         Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (slow: for tests)
  cuda_emulated  the CUDA kernels' own source run on CPU tensors by an emulated CUDA execution model
                 (fcn_fast._C_emu, built with FCN_FAST_BUILD_EMULATED=1; slow: for tests, docs/emulator.md). Never
                 chosen automatically.

The backend for a call is, in order: the op's ``backend=`` argument, the innermost ``use_backend(...)`` block, the
``FCN_FAST_BACKEND`` environment variable, then the default for the tensor's device (the first available of
``DEFAULT_ORDER[device]``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch

from fcn_fast import _extension

BACKENDS: Tuple[str, ...] = ("reference", "cpu", "cuda", "triton", "cuda_emulated")

# Fastest first, per device type; measured in benchmarks/results (see the README's tables).
DEFAULT_ORDER: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

_selected: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fcn_fast_backend", default=None)


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it runs on

    def __bool__(self) -> bool:
        return self.available


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    return None


def _status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(name, True, "plain PyTorch, any device")
    if name == "cpu":
        err = _extension.load_error()
        return BackendStatus(name, err is None, err or "C++/OpenMP kernels, CPU tensors")
    if name == "cuda":
        err = _extension.load_error()
        if err:
            return BackendStatus(name, False, err)
        if not _extension.has_cuda_kernels():
            return BackendStatus(name, False, "fcn_fast._C was built without CUDA (torch without CUDA or no nvcc at build time)")
        if not torch.cuda.is_available():
            return BackendStatus(name, False, "CUDA kernels are built but no CUDA device is available")
        return BackendStatus(name, True, "CUDA kernels, CUDA tensors")
    if name == "triton":
        err = _triton_import_error()
        if err:
            return BackendStatus(name, False, err)
        if torch.cuda.is_available():
            return BackendStatus(name, True, "Triton kernels, CUDA tensors")
        if triton_interpreted():
            return BackendStatus(name, True, "Triton interpreter (TRITON_INTERPRET=1), CPU tensors; slow")
        return BackendStatus(name, False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU)")
    if name == "cuda_emulated":
        err = _extension.emulated_load_error()
        return BackendStatus(name, err is None, err or "CUDA kernels on an emulated CUDA execution model, CPU tensors; slow")
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


def available_backends() -> Dict[str, BackendStatus]:
    """Every backend with whether it works here and why (or why not)."""
    return {name: _status(name) for name in BACKENDS}


def _runs_on(name: str, device_type: str) -> bool:
    if name == "reference":
        return True
    if name in ("cpu", "cuda_emulated"):
        return device_type == "cpu"
    if name == "cuda":
        return device_type == "cuda"
    if name == "triton":
        return device_type == "cuda" or (device_type == "cpu" and triton_interpreted())
    return False


def usable_backends(device: torch.device) -> Tuple[str, ...]:
    """The available backends that can run on tensors of ``device``."""
    return tuple(n for n in BACKENDS if _runs_on(n, device.type) and _status(n).available)


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Run the fcn_fast ops in this block on backend ``name`` (None: back to the automatic choice)."""
    token = _selected.set(None if name is None else _check_name(name))
    try:
        yield
    finally:
        _selected.reset(token)


def resolve_backend(requested: Optional[str], device: torch.device, op: str) -> str:
    """The backend that runs ``op`` on tensors of ``device``, or a ValueError naming the usable ones."""
    name = requested or _selected.get() or os.environ.get("FCN_FAST_BACKEND") or None
    if name is None:
        for candidate in DEFAULT_ORDER.get(device.type, ("reference",)):
            if _runs_on(candidate, device.type) and _status(candidate).available:
                return candidate
        return "reference"
    _check_name(name)
    status = _status(name)
    if not status.available or not _runs_on(name, device.type):
        why = status.reason if not status.available else f"it does not run on {device.type} tensors"
        usable = ", ".join(usable_backends(device))
        raise ValueError(f"{op}: backend {name!r} is unavailable here: {why}. Usable on {device.type}: {usable}")
    return name

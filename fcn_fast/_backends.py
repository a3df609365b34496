"""Backend registry and selection.

Every op runs on one of these backends:
  reference      plain PyTorch, the ground truth; runs anywhere
  cpu            the C++/OpenMP kernels of fcn_fast._C; CPU tensors
  cuda           the CUDA kernels of fcn_fast._C; CUDA tensors
  triton         Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (slow: for tests)
  cuda_emulated  the CUDA kernels' own source on an emulated CUDA execution model (fcn_fast._C_emu, built with
                 FCN_FAST_BUILD_EMULATED=1; docs/emulator.md); CPU tensors (slow: for tests, never chosen by default)

A backend is one ``Backend`` entry in ``REGISTRY``: which implementation of every op it runs (``kernels``, the name of
an op module's entry, see fcn_fast/ops/_dispatch.py), the torch.ops namespace holding its native kernels, the
tensors it takes and why it is unavailable, if it is. docs/backends.md says how to add one.

The backend for a call is, in order: the op's ``backend=`` argument, the innermost ``use_backend(...)`` block, the
``FCN_FAST_BACKEND`` environment variable, then the default for the tensor's device (the first available of
``DEFAULT_ORDER[device]``).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from fcn_fast import _emulator, _extension, _requirements


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


_triton_error: Dict[str, Optional[str]] = {}  # memo, not functools.lru_cache: Dynamo warns when tracing one


def _triton_import_error() -> Optional[str]:
    if "error" not in _triton_error:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:
            _triton_error["error"] = f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
        else:
            _triton_error["error"] = None
    return _triton_error["error"]


def _no_error() -> Optional[str]:
    return None


def _cuda_error() -> Optional[str]:
    if _extension.load_error():
        return _extension.load_error()
    if not _extension.has_cuda_kernels():
        return "fcn_fast._C was built without CUDA (torch without CUDA or no nvcc at build time)"
    if not torch.cuda.is_available():
        return "CUDA kernels are built but no CUDA device is available"
    return None


def _triton_error_here() -> Optional[str]:
    if _triton_import_error():
        return _triton_import_error()
    if triton_interpreted():
        if "interpreter" not in _triton_error:
            import numpy
            import triton
            _triton_error["interpreter"] = _requirements.triton_interpreter_error(triton.__version__,
                                                                                  numpy.__version__)
        return _triton_error["interpreter"]
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU)"
    return None


@dataclass(frozen=True)
class Backend:
    """One backend: what it runs and where.

    kernels: which implementation of every op it runs: the op modules' entry of that name ("reference", "cpu",
        "cuda" or "triton"); two backends may run the same one (with different native kernels).
    devices: device types of the tensors it takes (None: any); ``interpreted_devices`` too, under TRITON_INTERPRET=1.
    namespace: native backends: the ``torch.ops`` namespace whose ``_<op>_fwd``/``_<op>_bwd`` kernels it calls.
    wrap_ops: what the kernels call instead of that namespace, made from it (cuda_emulated checks every call under
        two thread schedules).
    error: why it is unavailable here, or None.
    runs: what it runs on, shown when it is available.
    """

    name: str
    kernels: str
    devices: Optional[Tuple[str, ...]]
    error: Callable[[], Optional[str]]
    runs: str
    namespace: Optional[str] = None
    interpreted_devices: Tuple[str, ...] = ()
    wrap_ops: Optional[Callable] = None

    def runs_on(self, device_type: str) -> bool:
        if self.devices is None or device_type in self.devices:
            return True
        return device_type in self.interpreted_devices and triton_interpreted()

    def status(self) -> BackendStatus:
        error = self.error()
        return BackendStatus(self.name, error is None, error or self.runs)

    def ops(self):
        """The torch.ops namespace of its native kernels (None for the others)."""
        if not self.namespace:
            return None
        namespace = getattr(torch.ops, self.namespace)
        return self.wrap_ops(namespace) if self.wrap_ops else namespace


REGISTRY: Dict[str, Backend] = {b.name: b for b in (
    Backend("reference", kernels="reference", devices=None, error=_no_error,
            runs="plain PyTorch, any device"),
    Backend("cpu", kernels="cpu", namespace="fcn_fast", devices=("cpu",), error=_extension.load_error,
            runs="C++/OpenMP kernels, CPU tensors"),
    Backend("cuda", kernels="cuda", namespace="fcn_fast", devices=("cuda",), error=_cuda_error,
            runs="CUDA kernels, CUDA tensors"),
    Backend("triton", kernels="triton", devices=("cuda",), interpreted_devices=("cpu",), error=_triton_error_here,
            runs="Triton kernels, CUDA tensors (CPU tensors under TRITON_INTERPRET=1; slow)"),
    Backend("cuda_emulated", kernels="cuda", namespace="fcn_fast_emu", devices=("cpu",),
            error=_extension.emulated_load_error, wrap_ops=_emulator.CheckedOps,
            runs="CUDA kernels on an emulated CUDA execution model, CPU tensors (slow: for tests)"),
)}

BACKENDS: Tuple[str, ...] = tuple(REGISTRY)

# Fastest first, per device type; measured in benchmarks/results (see the README's tables). A backend missing here
# runs only when asked for by name.
DEFAULT_ORDER: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

# The innermost use_backend block: per thread and asyncio task for eager code, and a process-wide copy for code
# being traced, since Dynamo cannot trace ContextVar.get on every torch (before 2.14); it guards on the plain global,
# so a compiled function recompiles when the block around its call changes.
_selected: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fcn_fast_backend", default=None)
_selected_for_tracing: Optional[str] = None


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return name


def backend(name: str) -> Backend:
    """The registry entry of backend ``name`` (ValueError naming the known ones otherwise)."""
    return REGISTRY[_check_name(name)]


def available_backends() -> Dict[str, BackendStatus]:
    """Every backend with whether it works here and why (or why not)."""
    return {name: b.status() for name, b in REGISTRY.items()}


def _usable(name: str, device_type: str) -> bool:
    entry = REGISTRY[name]
    return entry.runs_on(device_type) and entry.error() is None


def usable_backends(device: torch.device) -> Tuple[str, ...]:
    """The available backends that can run on tensors of ``device``."""
    return tuple(n for n in BACKENDS if _usable(n, device.type))


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Run the fcn_fast ops in this block on backend ``name`` (None: back to the automatic choice).

    Nested blocks and threads/asyncio tasks each see their own innermost block. Code compiled with torch.compile or
    exported sees the block around the compiled call (process-wide: concurrent threads that choose different
    backends for compiled code should pass ``backend=`` instead)."""
    global _selected_for_tracing
    token = _selected.set(None if name is None else _check_name(name))
    _selected_for_tracing = _selected.get()
    try:
        yield
    finally:
        _selected.reset(token)
        _selected_for_tracing = _selected.get()


def _selection() -> Optional[str]:
    if torch.compiler.is_compiling():
        return _selected_for_tracing
    return _selected.get()


def resolve_backend(requested: Optional[str], device: torch.device, op: str) -> str:
    """The backend that runs ``op`` on tensors of ``device``, or a ValueError naming the usable ones."""
    name = requested or _selection() or os.environ.get("FCN_FAST_BACKEND") or None
    if name is None:
        for candidate in DEFAULT_ORDER.get(device.type, ("reference",)):
            if _usable(candidate, device.type):
                return candidate
        return "reference"
    entry = backend(name)
    error = entry.error()
    if error is None and entry.runs_on(device.type):
        return name
    why = error or f"it does not run on {device.type} tensors"
    usable = ", ".join(usable_backends(device))
    raise ValueError(f"{op}: backend {name!r} is unavailable here: {why}. Usable on {device.type}: {usable}")

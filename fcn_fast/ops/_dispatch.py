"""How a call of an op reaches a backend's kernels, and what every backend's kernels share.

Each op module declares its implementations once: one ``Kernels`` subclass per kind of kernels ("reference", "cpu",
"cuda", "triton"), whose methods are the op's functions (``forward``, ``backward``, ...; the op module documents their
signatures) and whose class attributes are its capabilities (e.g. softmax_cross_entropy's ``gradient_in_forward``),
gathered in one ``OpKernels`` table. ``OpKernels[backend]`` is the implementation that backend runs: the entry named by
the backend's ``kernels`` in fcn_fast/_backends.py, made on first use with the torch.ops namespace of the backend's
native kernels (``self.ops``). So a backend that runs the same kernels built into another namespace (the CUDA
kernels compiled for the host, say) is one registry entry, and no op module changes.

An implementation in a module that must not be imported with fcn_fast (Triton: importing fcn_fast must not import
triton) names it in ``module``: its functions are that module's, imported on their first call.
"""

from __future__ import annotations

import importlib
from typing import Optional, Type

import torch

from fcn_fast import _backends


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend accumulates ``dtype`` inputs in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Kernels:
    """One backend's implementation of one op (see the module docstring)."""

    module: Optional[str] = None  # a module defining the op's functions, imported on first use

    def __init__(self, ops=None) -> None:
        self.ops = ops  # the torch.ops namespace holding the backend's native kernels (None for the others)

    def __getattr__(self, name: str):
        # Called only for names the class does not define: the functions of a lazily imported module.
        if self.module is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        value = getattr(importlib.import_module(self.module), name)
        setattr(self, name, value)  # later calls read it from the instance
        return value


class OpKernels(dict):
    """An op's implementations, keyed by backend name: ``OpKernels(op, reference=..., cpu=..., ...)`` declares one
    ``Kernels`` subclass per kind of kernels; ``table[backend]`` is the instance that backend runs (a plain dict read
    after its first use)."""

    def __init__(self, op: str, **implementations: Type[Kernels]) -> None:
        super().__init__()
        self.op = op
        self.implementations = implementations

    def __missing__(self, backend: str) -> Kernels:
        entry = _backends.backend(backend)
        if entry.kernels not in self.implementations:
            raise ValueError(f"{self.op}: no implementation for backend {backend!r} (its kernels: {entry.kernels!r}); "
                             f"{self.op} has {', '.join(self.implementations)}")
        kernels = self[backend] = self.implementations[entry.kernels](entry.ops())
        return kernels

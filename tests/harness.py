"""Shared test parametrization: backends with the device each runs on, dtypes and their tolerances, and the
backends a run requires (FCN_FAST_REQUIRE_BACKENDS: CI lists the ones it must test, so that a broken build fails
instead of skipping)."""

from __future__ import annotations

import importlib
import os
from typing import List

import pytest
import torch

from fcn_fast import _extension
from fcn_fast._backends import BACKENDS, available_backends

HAS_CUDA = torch.cuda.is_available()

# fp32 ~1e-5, fp16 ~4e-3, bf16 ~2e-2 relative (torchvision's op tests use similar).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
DTYPES = list(TOLERANCES)


def device_for(backend: str) -> torch.device:
    """The device a backend is tested on: cuda and triton on the GPU when there is one; triton on the CPU through
    its interpreter otherwise; cuda_emulated (the CUDA kernels on an emulated execution model) on the CPU."""
    if backend == "cuda" or (backend == "triton" and HAS_CUDA):
        return torch.device("cuda")
    return torch.device("cpu")


def required_backends() -> List[str]:
    """The backends named in FCN_FAST_REQUIRE_BACKENDS (comma-separated), which must be available."""
    return [name.strip() for name in os.environ.get("FCN_FAST_REQUIRE_BACKENDS", "").split(",") if name.strip()]


def missing_required_backends() -> List[str]:
    """Why each required backend cannot be tested here (empty when all of them can)."""
    status = available_backends()
    problems = []
    for name in required_backends():
        if name not in status:
            problems.append(f"{name}: unknown backend (fcn_fast knows {', '.join(status)})")
        elif not status[name].available:
            problems.append(f"{name}: {status[name].reason}")
    return problems


def requires_backend(name: str):
    """Mark for a test of one backend's own kernels: skipped with the reason where that backend is unavailable
    (which a run that requires the backend refuses to start with)."""
    status = available_backends()[name]
    return pytest.mark.skipif(not status.available, reason=status.reason)


def backend_params(include_reference: bool = True) -> List:
    """pytest params for every registered backend, each skipped with the reason it is unavailable here."""
    status = available_backends()
    params = []
    for name in BACKENDS:
        if name == "reference" and not include_reference:
            continue
        # The emulated CUDA kernels are skipped only when they were not built (FCN_FAST_BUILD_EMULATED=1): a build that
        # does not load fails its tests instead.
        skip = not status[name].available and not (name == "cuda_emulated" and _extension.emulated_built())
        marks = [pytest.mark.skipif(skip, reason=status[name].reason)]
        if name == "triton":
            marks.append(pytest.mark.triton)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, **override) -> None:
    """``actual`` against ``expected`` (cast to its dtype) with ``dtype``'s tolerance, on the CPU, or on the GPU when
    both are there (tests/test_gpu.py compares slices of 10^8 elements)."""
    tol = dict(TOLERANCES[dtype or expected.dtype])
    tol.update(override)
    if actual.device != expected.device:
        actual, expected = actual.cpu(), expected.cpu()
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tol)


# Peer libraries the test extra installs (torchvision, segmentation_models_pytorch, onnx, onnxscript, onnxruntime).
# Required: a missing one fails the run, unless this variable names it (comma-separated top-level names, or "all"),
# for an environment that legitimately cannot install it (e.g. a CI leg on a torch that no torchvision matches).
OPTIONAL_PEERS_ENV = "FCN_FAST_OPTIONAL_PEERS"


def peer(module: str):
    """Import a peer library for a test module: an ImportError fails the run, or skips the module when
    FCN_FAST_OPTIONAL_PEERS lists the library."""
    optional = {name.strip() for name in os.environ.get(OPTIONAL_PEERS_ENV, "").split(",") if name.strip()}
    top = module.split(".")[0]
    if top in optional or "all" in optional:
        return pytest.importorskip(module, reason=f"{top} is not installed ({OPTIONAL_PEERS_ENV} allows that here)")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{exc}: the test extra installs it (pip install -e '.[test]'); set {OPTIONAL_PEERS_ENV}="
                          f"{top} where it cannot be installed") from exc

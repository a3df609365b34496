"""Backend selection (fcn_fast/_backends.py): what is available and why, the order a call's backend is chosen in
(argument, use_backend block, FCN_FAST_BACKEND, the device's default), and the errors for unavailable or unknown
backends."""

from __future__ import annotations

import importlib

import pytest
import torch

import fcn_fast
from fcn_fast import _backends
from harness import HAS_CUDA

# The module, not the function fcn_fast.ops re-exports under the same name.
upsample_add_module = importlib.import_module("fcn_fast.ops.upsample_add")


def test_available_backends():
    status = fcn_fast.available_backends()
    assert list(status) == ["reference", "cpu", "cuda", "triton"]
    assert status["reference"].available
    for name, s in status.items():
        assert s.name == name and isinstance(s.reason, str) and s.reason
    if not HAS_CUDA:
        assert not status["cuda"] and "CUDA" in status["cuda"].reason


@pytest.fixture
def record_backend(monkeypatch):
    """Records the backend each forward call runs on (the real implementation still runs)."""
    calls = []
    for name, impl in list(upsample_add_module._FORWARD.items()):
        def spy(*args, _name=name, _impl=impl):
            calls.append(_name)
            return _impl(*args)
        monkeypatch.setitem(upsample_add_module._FORWARD, name, spy)
    return calls


def test_backend_selection(record_backend, monkeypatch):
    x = torch.randn(1, 2, 3, 3)
    monkeypatch.delenv("FCN_FAST_BACKEND", raising=False)
    fcn_fast.upsample_add(x, factor=2)
    default = _backends.usable_backends(x.device)
    assert record_backend[-1] == ("cpu" if "cpu" in default else "reference")
    with fcn_fast.use_backend("reference"):
        fcn_fast.upsample_add(x, factor=2)
        assert record_backend[-1] == "reference"
        if "cpu" in default:
            fcn_fast.upsample_add(x, factor=2, backend="cpu")  # the argument wins over the block
            assert record_backend[-1] == "cpu"
    monkeypatch.setenv("FCN_FAST_BACKEND", "reference")
    fcn_fast.upsample_add(x, factor=2)
    assert record_backend[-1] == "reference"
    if "cpu" in default:
        with fcn_fast.use_backend("cpu"):  # the block wins over the environment
            fcn_fast.upsample_add(x, factor=2)
            assert record_backend[-1] == "cpu"


def test_unavailable_or_unknown_backend():
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"backend 'cuda' is unavailable here.*Usable on cpu: reference"):
        fcn_fast.upsample_add(x, factor=2, backend="cuda")
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'.*reference, cpu, cuda, triton"):
        fcn_fast.upsample_add(x, factor=2, backend="tpu")
    with pytest.raises(ValueError, match="unknown backend"):
        with fcn_fast.use_backend("fast"):
            pass

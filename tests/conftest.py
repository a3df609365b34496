"""Test setup: without a GPU, Triton kernels run under Triton's CPU interpreter, which must be switched on before
triton is first imported; a run that requires backends (FCN_FAST_REQUIRE_BACKENDS, set by .ci/run) stops before
collecting anything when one of them is unavailable, with the reason."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)


def pytest_configure(config):
    from harness import missing_required_backends

    missing = missing_required_backends()
    if missing:
        raise pytest.UsageError("FCN_FAST_REQUIRE_BACKENDS names backends that cannot run here:\n  "
                                + "\n  ".join(missing))

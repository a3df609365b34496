"""The oldest torch fcn_fast supports, checked when it is imported: the custom ops, their fake kernels and the
compiled extension are tested against torch from this release on (docs/training.md says which releases CI runs)."""

from __future__ import annotations

import re
from typing import Optional, Tuple

import torch

TORCH_FLOOR = (2, 11)


def release(version: str) -> Optional[Tuple[int, int]]:
    """(major, minor) of a version string such as "2.11.0+cu130"; None where it starts with no such pair."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return None if found is None else (int(found.group(1)), int(found.group(2)))


def triton_interpreter_error(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why Triton's interpreter (TRITON_INTERPRET=1) cannot run fcn_fast's kernels with these versions, or None.

    Triton's interpreter before 3.7 hands a kernel's scalar arguments over as one-element arrays and reads a loop
    bound through int(), which numpy refuses from 2.4 on; compiled kernels never meet it."""
    triton_release, numpy_release = release(triton_version), release(numpy_version)
    if triton_release is None or numpy_release is None or triton_release >= (3, 7) or numpy_release < (2, 4):
        return None
    return (f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run with numpy {numpy_version}: "
            "before Triton 3.7 it converts loop bounds with int() on one-element arrays, which numpy >= 2.4 refuses; "
            "pip install 'numpy<2.4' or 'triton>=3.7'")


def check_torch(version: Optional[str] = None) -> None:
    """ImportError naming the torch found and the one needed, if ``version`` (default: the imported torch's) is
    older than ``TORCH_FLOOR``."""
    version = torch.__version__ if version is None else version
    found = release(version)
    if found is None or found < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise ImportError(f"fcn_fast needs torch >= {floor}, but found torch {version} (at {torch.__file__}); "
                          f"install a newer one, e.g. pip install 'torch>={floor}', then rebuild fcn_fast")

"""The oldest torch fcn_fast supports, checked when it is imported: the custom ops, their fake kernels and the
compiled extension are tested against torch from this release on (docs/training.md says which releases CI runs)."""

from __future__ import annotations

import re
from typing import Optional

import torch

TORCH_FLOOR = (2, 11)


def check_torch(version: Optional[str] = None) -> None:
    """ImportError naming the torch found and the one needed, if ``version`` (default: the imported torch's) is
    older than ``TORCH_FLOOR``."""
    version = torch.__version__ if version is None else version
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or tuple(int(part) for part in found.groups()) < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise ImportError(f"fcn_fast needs torch >= {floor}, but found torch {version} (at {torch.__file__}); "
                          f"install a newer one, e.g. pip install 'torch>={floor}', then rebuild fcn_fast")

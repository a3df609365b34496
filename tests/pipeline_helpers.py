"""Shared by the pipeline tests: where the real VOC sample lives, and a small synthetic data set."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent


def voc_mini() -> Optional[Path]:
    """``shared/data/voc-mini`` in the repository's folder or any folder above it (CI clones the repository beside
    shared/), or ``$FCN_FAST_VOC_MINI``; None when absent."""
    env = os.environ.get("FCN_FAST_VOC_MINI")
    if env:
        return Path(env) if Path(env).is_dir() else None
    for folder in [REPO, *REPO.parents]:
        candidate = folder / "shared" / "data" / "voc-mini"
        if candidate.is_dir():
            return candidate
    return None

"""Argument checks shared by the public ops: each raises a ValueError/TypeError naming the argument and what was
seen, in Python, before any kernel runs."""

from __future__ import annotations

import operator
from typing import Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(op: str, name: str, t, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got {describe(t)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dimensions, got {describe(t)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {describe(t)}")
    return t


def check_same(op: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor, *, dtype: bool = True) -> None:
    if a.device != b.device:
        raise ValueError(f"{op}: {a_name} and {b_name} must be on one device, got {a_name}: {describe(a)}; {b_name}: {describe(b)}")
    if dtype and a.dtype != b.dtype:
        raise TypeError(f"{op}: {a_name} and {b_name} must have one dtype, got {a_name}: {describe(a)}; {b_name}: {describe(b)}")


def check_int(op: str, name: str, value, *, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not (isinstance(value, (int, torch.SymInt)) or hasattr(value, "__index__")):
        raise TypeError(f"{op}: {name} must be an int, got {value!r} ({type(value).__name__})")
    if not isinstance(value, torch.SymInt):
        value = operator.index(value)  # numpy integers
    if minimum is not None and value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return value


def check_pair(op: str, name: str, value, *, minimum: Optional[int] = None) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    return (check_int(op, f"{name}[0]", value[0], minimum=minimum), check_int(op, f"{name}[1]", value[1], minimum=minimum))

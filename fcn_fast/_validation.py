"""Argument checks shared by the public ops: each raises a ValueError/TypeError naming the argument and what was
seen, in Python, before any kernel runs."""

from __future__ import annotations

import numbers
import operator
from typing import Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


INT64_RANGE = (-(2 ** 63), 2 ** 63 - 1)


def check_tensor(op: str, name: str, t, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        kind = "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got {kind} of shape {tuple(t.shape)}; "
                        f"call .to_dense() first")
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
        raise ValueError(f"{op}: {a_name} and {b_name} must be on one device, got {a_name}: {describe(a)}; "
                         f"{b_name}: {describe(b)}")
    if dtype and a.dtype != b.dtype:
        raise TypeError(f"{op}: {a_name} and {b_name} must have one dtype, got {a_name}: {describe(a)}; "
                        f"{b_name}: {describe(b)}")


def _is_int(value) -> bool:
    # Python and NumPy integers, not bools, floats, arrays or tensors (reading a tensor is a host sync, and
    # data-dependent under torch.compile).
    return isinstance(value, torch.SymInt) or (isinstance(value, numbers.Integral) and not isinstance(value, bool))


def check_int(op: str, name: str, value, *, minimum: Optional[int] = None) -> int:
    """An int (Python, NumPy, SymInt) that fits the kernels' int64, and is >= ``minimum``."""
    if type(value) is not int:  # a plain int skips the ABC checks: they cost a microsecond per public call
        if not _is_int(value):
            raise TypeError(f"{op}: {name} must be an int, got {value!r} ({type(value).__name__})")
        if not isinstance(value, torch.SymInt):
            value = operator.index(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    if type(value) is int and not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
        raise ValueError(f"{op}: {name} must fit in int64 [{INT64_RANGE[0]}, {INT64_RANGE[1]}], got {value}")
    return value


def check_pair(op: str, name: str, value, *, minimum: Optional[int] = None) -> Tuple[int, int]:
    if type(value) is not tuple:
        if isinstance(value, torch.Size):
            value = tuple(value)
        elif _is_int(value):
            value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    return (check_int(op, f"{name}[0]", value[0], minimum=minimum),
            check_int(op, f"{name}[1]", value[1], minimum=minimum))


def check_float(op: str, name: str, value, *, minimum: Optional[float] = None,
                maximum: Optional[float] = None) -> float:
    """A real number (Python or NumPy int/float; not a bool or a tensor) as a float, in [minimum, maximum] if given
    (NaN is outside any range)."""
    if type(value) is not float:
        if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
            raise TypeError(f"{op}: {name} must be a float (a Python or NumPy number), got {value!r} "
                            f"({type(value).__name__})")
        value = float(value)
    if (minimum is not None and not value >= minimum) or (maximum is not None and not value <= maximum):
        low = "-inf" if minimum is None else minimum
        high = "inf" if maximum is None else maximum
        raise ValueError(f"{op}: {name} must be a float in [{low}, {high}], got {value!r}")
    return value


def check_bool(op: str, name: str, value) -> bool:
    """A bool, as PyTorch's own ops require (0/1, strings and None are mistakes here)."""
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool (True or False), got {value!r} ({type(value).__name__})")
    return value

"""The Python side of backend "cuda_emulated": the CUDA kernels' own source compiled against an emulated CUDA
execution model (fcn_fast._C_emu, ops in torch.ops.fcn_fast_emu; docs/emulator.md).

Every native call of the backend goes through :func:`checked`: it runs under each thread schedule listed in
``FCN_FAST_EMU_SCHEDULES`` (default ``forward,reverse``: the threads of a block, and the blocks, in order and in
reverse between barriers) and raises if their results differ in any bit, so a race shows in every test that uses the
backend. Each run also fills memory the kernels allocate with NaN (or the largest integer) before they write it,
PyTorch's ``fill_uninitialized_memory``, so an element a kernel forgets to write cannot pass for a result.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional, Tuple

import torch

from fcn_fast import _extension

SCHEDULES = ("forward", "reverse")

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def ops():
    """torch.ops.fcn_fast_emu, or a RuntimeError saying why fcn_fast._C_emu is unusable."""
    err = _extension.emulated_load_error()
    if err:
        raise RuntimeError(err)
    return torch.ops.fcn_fast_emu


@contextlib.contextmanager
def options(*, schedule: Optional[str] = None, max_blocks: Optional[int] = None,
            int64_indices: Optional[bool] = None) -> Iterator[None]:
    """Set the emulator's knobs for a block (None keeps one as it is):
      schedule       "forward" or "reverse": the order in which the threads of a block run between barriers (and
                     the blocks of a grid run)
      max_blocks     cap on the blocks of a launch (0: the launch policy's own cap, cuda_launch.h); a small cap
                     makes every grid-stride loop wrap
      int64_indices  take the int64 index path that only tensors of 2^31 elements take on a GPU
    Their defaults come from FCN_FAST_EMU_MAX_BLOCKS and FCN_FAST_EMU_INT64 (0/1) when the library loads."""
    namespace = ops()
    current = namespace._emulator_get_options()
    wanted = (current[0] if schedule is None else schedule, current[1] if max_blocks is None else int(max_blocks),
              current[2] if int64_indices is None else bool(int64_indices))
    previous = namespace._emulator_options(*wanted)
    try:
        yield
    finally:
        namespace._emulator_options(*previous)


def stats() -> dict:
    """Counters since fcn_fast._C_emu loaded: kernel launches, blocks, threads, barriers passed, and the index-width
    choices (one per kernel, or per group of kernels launched together) that took int32 and int64."""
    keys = ("launches", "blocks", "threads", "barriers", "int32_choices", "int64_choices")
    return dict(zip(keys, ops()._emulator_stats()))


def schedules() -> Tuple[str, ...]:
    names = tuple(s.strip() for s in os.environ.get("FCN_FAST_EMU_SCHEDULES", ",".join(SCHEDULES)).split(",") if s.strip())
    unknown = [s for s in names if s not in SCHEDULES]
    if not names or unknown:
        raise ValueError(f"FCN_FAST_EMU_SCHEDULES must list schedules from {SCHEDULES}, got {names}")
    return names


@contextlib.contextmanager
def _uninitialized_memory_filled() -> Iterator[None]:
    # torch fills what torch.empty returns only in deterministic mode; warn_only keeps every op allowed. The torch._C
    # switches, not torch.use_deterministic_algorithms, which also sets an inductor option (importing torch._dynamo,
    # seconds) that nothing here compiles.
    enabled, warn_only = torch._C._get_deterministic_algorithms(), torch._C._get_deterministic_algorithms_warn_only()
    fill = torch._C._get_deterministic_fill_uninitialized_memory()
    torch._C._set_deterministic_algorithms(True, warn_only=True)
    torch._C._set_deterministic_fill_uninitialized_memory(True)
    try:
        yield
    finally:
        torch._C._set_deterministic_fill_uninitialized_memory(fill)
        torch._C._set_deterministic_algorithms(enabled, warn_only=warn_only)


def _bits(value):
    """The results of a native call with every tensor as its bits (NaN payloads included) and its strides."""
    if isinstance(value, torch.Tensor):
        bits = value.view(_INT_VIEW[value.element_size()]) if value.is_floating_point() else value
        return ("tensor", value.dtype, tuple(value.shape), value.stride(), bits)
    if isinstance(value, (tuple, list)):
        return tuple(_bits(v) for v in value)
    return value


def _same_bits(a, b) -> bool:
    if isinstance(a, tuple) and a and a[0] == "tensor":
        return isinstance(b, tuple) and a[:4] == b[:4] and torch.equal(a[4], b[4])
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same_bits(x, y) for x, y in zip(a, b))
    return a == b


def checked(fn: Callable) -> Callable:
    """``fn`` (a native call into torch.ops.fcn_fast_emu) run under every schedule of :func:`schedules`, raising a
    RuntimeError when the results differ in any bit; returns the first schedule's result."""

    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "a native call")

    def run(*args, **kwargs):
        results = []
        for schedule in schedules():
            with options(schedule=schedule), _uninitialized_memory_filled():
                results.append((schedule, fn(*args, **kwargs)))
        first_schedule, first = results[0]
        first_bits = _bits(first)
        for schedule, result in results[1:]:
            if not _same_bits(first_bits, _bits(result)):
                raise RuntimeError(
                    f"emulated CUDA: {name} gives different bits under the {first_schedule!r} "
                    f"and {schedule!r} thread schedules: a race between threads or blocks (docs/emulator.md)")
        return first

    run.__name__ = name
    return run


class CheckedOps:
    """torch.ops.fcn_fast_emu with every op :func:`checked`: the namespace the cuda_emulated backend's kernels call
    (fcn_fast/_backends.py)."""

    def __init__(self, namespace) -> None:
        self._namespace = namespace

    def __getattr__(self, name: str):
        op = checked(getattr(self._namespace, name))
        setattr(self, name, op)  # later calls read it from the instance
        return op

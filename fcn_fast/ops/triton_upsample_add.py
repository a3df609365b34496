"""upsample_add in Triton: the forward pass and the gather backward, reading the tap tables of ``_resample.py``.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (slow; tests only). Inputs are made
contiguous NCHW here (a copy for channels_last or strided views). Data are loaded in their dtype and accumulated in
float32 (float64 for float64 inputs, whose tap weights are float64 too).

Layout of the launches: one program per tile of (rows of the flattened N*C*H axis) x (columns), so loads and stores
run along W and the per-row index math is done once per row, not per element; offsets of planes and rows are
computed in int64 (N*C*H*W can pass 2**31), everything inside a row in int32. The tile's size (``TILE`` elements)
and the warps per program are tuned per width on a GPU (``triton_common.autotune``); its shape follows from the
width (``_columns``). The forward and grad_skip compute every element alike whatever the tile; grad_x's sum over a
readers window may associate differently under another tile, which is why the choice is cached on disk.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fcn_fast.ops._resample import Geometry, axis_taps
from fcn_fast.ops._dispatch import acc_dtype
from fcn_fast.ops.triton_common import (acc_type, adjoint_share, autotune, blend_taps, device_scalar, load_taps,
                                        on_tensor_device, taps_naming, tile_configs)

# Elements per program (tile of rows x columns) by default: enough work per program to hide latency on a GPU, and
# few programs for the interpreter, which runs them one after another. A GPU tunes it among CONFIGS.
TILE_ELEMENTS = 2048
CONFIGS = tile_configs(TILE_ELEMENTS, (1024, 2048, 4096, 8192))


def _columns(width: int) -> int:
    """Columns of a tile for rows ``width`` wide: whole rows up to 128 (a warp's 32 lanes x 4-element vectors)."""
    return min(128, max(16, triton.next_power_of_2(width)))


def _tile_heuristics(width_arg: str, per_element=lambda args: 1):
    """BLOCK_W and BLOCK_R of a kernel from its TILE and the width argument named ``width_arg``; ``per_element``
    (of the kernel's arguments) scales the rows down for a wider inner tile."""
    return triton.heuristics({
        "BLOCK_W": lambda args: _columns(args[width_arg]),
        "BLOCK_R": lambda args: max(1, args["TILE"] // (_columns(args[width_arg]) * per_element(args))),
    })


def _grid(rows_total: int, width: int):
    return lambda meta: (triton.cdiv(rows_total, meta["BLOCK_R"]), triton.cdiv(width, meta["BLOCK_W"]))


@autotune(CONFIGS, key=["out_w"])
@_tile_heuristics("out_w")
@triton.jit
def _forward_kernel(x_ptr, skip_ptr, out_ptr, scale_ptr, row_index, row_weight, col_index, col_weight,
                    rows_total, in_h, in_w, out_h, out_w, skip_h, skip_w, skip_y, skip_x,
                    HAS_SKIP: tl.constexpr, ACC: tl.constexpr, TILE: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_W: tl.constexpr):
    """out[plane, oy, ox] = sum of the 2x2 taps of x[plane] (+ scale * skip[plane, skip_y + oy, skip_x + ox]).

    A tile is BLOCK_R output rows of the flattened (plane, oy) axis by BLOCK_W columns."""
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # plane * out_h + oy
    ox = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    row_ok = row < rows_total
    col_ok = ox < out_w
    mask = row_ok[:, None] & col_ok[None, :]
    plane = row // out_h
    oy = tl.where(row_ok, row - plane * out_h, 0)

    y0, y1, wy0, wy1 = load_taps(row_index, row_weight, oy, row_ok)
    x0, x1, wx0, wx1 = load_taps(col_index, col_weight, ox, col_ok)
    x0, x1 = x0[None, :], x1[None, :]

    x_plane = plane.to(tl.int64) * in_h * in_w
    # Row offsets in int64 too: y0 * in_w in int32 wraps for an input plane of 2**31 elements or more (interp mode
    # may downsample such a plane).
    r0 = (x_plane + y0.to(tl.int64) * in_w)[:, None]
    r1 = (x_plane + y1.to(tl.int64) * in_w)[:, None]
    v00 = tl.load(x_ptr + r0 + x0, mask=mask, other=0.0).to(ACC)
    v01 = tl.load(x_ptr + r0 + x1, mask=mask, other=0.0).to(ACC)
    v10 = tl.load(x_ptr + r1 + x0, mask=mask, other=0.0).to(ACC)
    v11 = tl.load(x_ptr + r1 + x1, mask=mask, other=0.0).to(ACC)
    value = blend_taps(v00, v01, v10, v11, wy0[:, None], wy1[:, None], wx0[None, :], wx1[None, :])
    if HAS_SKIP:
        skip_row = (plane.to(tl.int64) * skip_h + skip_y + oy) * skip_w + skip_x
        skip_value = tl.load(skip_ptr + skip_row[:, None] + ox[None, :], mask=mask, other=0.0).to(ACC)
        value += tl.load(scale_ptr) * skip_value
    out_offset = row.to(tl.int64)[:, None] * out_w + ox[None, :]
    tl.store(out_ptr + out_offset, value.to(out_ptr.dtype.element_ty), mask=mask)


@autotune(CONFIGS, key=["in_w", "COL_READERS"])
@_tile_heuristics("in_w", per_element=lambda args: args["COL_READERS"])
@triton.jit
def _grad_x_kernel(grad_ptr, grad_x_ptr, row_index, row_weight, row_readers, col_index, col_weight, col_readers,
                   rows_total, in_h, in_w, out_h, out_w, max_row_readers,
                   ACC: tl.constexpr, COL_READERS: tl.constexpr, TILE: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_W: tl.constexpr):
    """grad_x[plane, iy, ix] = sum over the outputs (oy, ox) that read (iy, ix) of their tap weights times grad.

    A gather in a fixed order (output rows one by one, a fixed-shape tile of columns), so the result is
    deterministic. A tile is BLOCK_R input rows of the flattened (plane, iy) axis by BLOCK_W input columns by
    COL_READERS (a power of two >= the longest readers range of a column)."""
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # plane * in_h + iy
    ix = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    row_ok = row < rows_total
    col_ok = ix < in_w
    plane = row // in_h
    iy = tl.where(row_ok, row - plane * in_h, 0)

    # Column taps [1, BLOCK_W, COL_READERS] naming each ix, for every ox in its readers range.
    ox_begin = tl.load(col_readers + 2 * ix, mask=col_ok, other=0)
    ox_end = tl.load(col_readers + 2 * ix + 1, mask=col_ok, other=0)
    ox = ox_begin[:, None] + tl.arange(0, COL_READERS)[None, :]
    reads = col_ok[:, None] & (ox < ox_end[:, None])
    cx0, cx1, cw0, cw1 = taps_naming(col_index, col_weight, ox, ix[:, None], reads)
    cx0, cx1, cw0, cw1 = cx0[None, :, :], cx1[None, :, :], cw0[None, :, :], cw1[None, :, :]
    ox = ox[None, :, :]
    reads = reads[None, :, :] & row_ok[:, None, None]

    oy_begin = tl.load(row_readers + 2 * iy)
    oy_end = tl.load(row_readers + 2 * iy + 1)
    g_plane = plane.to(tl.int64) * out_h * out_w
    total = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    for dy in range(0, max_row_readers):
        oy = oy_begin + dy
        live = oy < oy_end
        oy_safe = tl.where(live, oy, 0)
        ry0, ry1, wy0, wy1 = taps_naming(row_index, row_weight, oy_safe, iy, live)
        # int64: oy * out_w in int32 wraps once one output plane holds 2**31 elements (N = C = 1 at 46341^2).
        g_row = (g_plane + oy_safe.to(tl.int64) * out_w)[:, None, None]
        g = tl.load(grad_ptr + g_row + ox, mask=reads & live[:, None, None], other=0.0).to(ACC)
        row_sum = tl.sum(adjoint_share(cx0, cx1, cw0, cw1, g), 2)
        total += adjoint_share(ry0[:, None], ry1[:, None], wy0[:, None], wy1[:, None], row_sum)
    out_offset = row.to(tl.int64)[:, None] * in_w + ix[None, :]
    tl.store(grad_x_ptr + out_offset, total.to(grad_x_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@autotune(CONFIGS, key=["skip_w"])
@_tile_heuristics("skip_w")
@triton.jit
def _grad_skip_kernel(grad_ptr, grad_skip_ptr, scale_ptr, rows_total, out_h, out_w, skip_h, skip_w, skip_y, skip_x,
                      ACC: tl.constexpr, TILE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """grad_skip[plane, sy, sx] = scale * grad[plane, sy - skip_y, sx - skip_x] inside the crop, 0 outside."""
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # plane * skip_h + sy
    sx = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    row_ok = row < rows_total
    plane = row // skip_h
    oy = row - plane * skip_h - skip_y
    ox = sx - skip_x
    mask = row_ok[:, None] & (sx < skip_w)[None, :]
    inside = mask & ((ox >= 0) & (ox < out_w))[None, :] & ((oy >= 0) & (oy < out_h))[:, None]
    g_row = (plane.to(tl.int64) * out_h + oy) * out_w
    g = tl.load(grad_ptr + g_row[:, None] + ox[None, :], mask=inside, other=0.0).to(ACC)
    value = tl.load(scale_ptr) * g
    out_offset = row.to(tl.int64)[:, None] * skip_w + sx[None, :]
    tl.store(grad_skip_ptr + out_offset, value.to(grad_skip_ptr.dtype.element_ty), mask=mask)




@functools.lru_cache(maxsize=512)
def _longest_readers(mode: str, in_size: int, out_size: int, factor: int, offset: int, align_corners: bool,
                     double: bool) -> int:
    """The longest readers range on one axis, read from the CPU copy of the tables (no device sync). ``double``
    picks the float64 tables: interp weights that are exactly 0 in one precision may not be in the other."""
    readers = axis_taps(mode, in_size, out_size, factor, offset, align_corners, torch.device("cpu"), double).readers
    return max(1, int((readers[:, 1] - readers[:, 0]).max()))


@on_tensor_device
def forward(x: torch.Tensor, skip: Optional[torch.Tensor], geometry: Geometry, skip_offset: Tuple[int, int],
            skip_scale: float) -> torch.Tensor:
    x = x.contiguous()
    n, c, in_h, in_w = x.shape
    out_h, out_w = geometry.out_hw
    out = torch.empty((n, c, out_h, out_w), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows, cols = geometry.taps(x.device, x.dtype)
    if skip is not None:
        skip = skip.contiguous()
        skip_h, skip_w = skip.shape[2], skip.shape[3]
    else:
        skip_h = skip_w = 0
    _forward_kernel[_grid(n * c * out_h, out_w)](
        x, skip if skip is not None else x, out, device_scalar(float(skip_scale), rows.weight.dtype, x.device),
        rows.index, rows.weight, cols.index, cols.weight, n * c * out_h, in_h, in_w, out_h, out_w, skip_h, skip_w,
        skip_offset[0], skip_offset[1], HAS_SKIP=skip is not None, ACC=acc_type(x.dtype))
    return out


@on_tensor_device
def backward(grad: torch.Tensor, geometry: Geometry, x_shape, skip_shape, skip_offset: Tuple[int, int],
             skip_scale: float, need_x: bool, need_skip: bool):
    grad = grad.contiguous()
    n, c, out_h, out_w = grad.shape
    acc = acc_type(grad.dtype)
    grad_x = grad_skip = None
    if need_x:
        in_h, in_w = int(x_shape[2]), int(x_shape[3])
        grad_x = torch.empty((n, c, in_h, in_w), dtype=grad.dtype, device=grad.device)
        if grad_x.numel() > 0:
            rows, cols = geometry.taps(grad.device, grad.dtype)
            double = grad.dtype == torch.float64
            max_row = _longest_readers(geometry.mode, in_h, out_h, geometry.factor, geometry.offset[0],
                                       geometry.align_corners, double)
            max_col = _longest_readers(geometry.mode, in_w, out_w, geometry.factor, geometry.offset[1],
                                       geometry.align_corners, double)
            _grad_x_kernel[_grid(n * c * in_h, in_w)](
                grad, grad_x, rows.index, rows.weight, rows.readers, cols.index, cols.weight, cols.readers,
                n * c * in_h, in_h, in_w, out_h, out_w, max_row, ACC=acc, COL_READERS=triton.next_power_of_2(max_col))
    if need_skip:
        skip_h, skip_w = int(skip_shape[2]), int(skip_shape[3])
        grad_skip = torch.empty((n, c, skip_h, skip_w), dtype=grad.dtype, device=grad.device)
        if grad_skip.numel() > 0:
            scale = device_scalar(float(skip_scale), acc_dtype(grad.dtype), grad.device)
            _grad_skip_kernel[_grid(n * c * skip_h, skip_w)](
                grad, grad_skip, scale, n * c * skip_h, out_h, out_w, skip_h, skip_w, skip_offset[0], skip_offset[1],
                ACC=acc)
    return grad_x, grad_skip

"""upsample_add in Triton: the forward pass and the gather backward, reading the tap tables of ``_resample.py``.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (slow; tests only). Inputs are made
contiguous NCHW here (a copy for channels_last or strided views). Data are loaded in their dtype and accumulated in
float32 (float64 for float64 inputs, whose tap weights are float64 too).

Layout of the launches: one program per (output row, block of columns), so loads and stores run along W; the plane
offset is computed in int64 (N*C*H*W can pass 2**31), everything inside a row in int32.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fcn_fast.ops._resample import Geometry, axis_taps

# Columns per program: wide enough for coalesced 128-byte rows, small enough to keep programs many at 512 wide.
BLOCK_W = 128
# Input columns per program in the grad_x gather.
BLOCK_IN_W = 64


@triton.jit
def _forward_kernel(x_ptr, skip_ptr, out_ptr, scale_ptr, row_index, row_weight, col_index, col_weight,
                    in_h, in_w, out_h, out_w, skip_h, skip_w, skip_y, skip_x,
                    HAS_SKIP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """out[plane, oy, ox] = sum of the 2x2 taps of x[plane] (+ scale * skip[plane, skip_y + oy, skip_x + ox])."""
    row = tl.program_id(0)  # plane * out_h + oy
    plane = row // out_h
    oy = row - plane * out_h
    ox = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = ox < out_w

    y0 = tl.load(row_index + 2 * oy)
    y1 = tl.load(row_index + 2 * oy + 1)
    wy0 = tl.load(row_weight + 2 * oy)
    wy1 = tl.load(row_weight + 2 * oy + 1)
    x0 = tl.load(col_index + 2 * ox, mask=in_row, other=0)
    x1 = tl.load(col_index + 2 * ox + 1, mask=in_row, other=0)
    wx0 = tl.load(col_weight + 2 * ox, mask=in_row, other=0.0)
    wx1 = tl.load(col_weight + 2 * ox + 1, mask=in_row, other=0.0)

    x_plane = x_ptr + plane.to(tl.int64) * in_h * in_w
    r0 = x_plane + y0 * in_w
    r1 = x_plane + y1 * in_w
    v00 = tl.load(r0 + x0, mask=in_row, other=0.0).to(ACC)
    v01 = tl.load(r0 + x1, mask=in_row, other=0.0).to(ACC)
    v10 = tl.load(r1 + x0, mask=in_row, other=0.0).to(ACC)
    v11 = tl.load(r1 + x1, mask=in_row, other=0.0).to(ACC)
    # Same association as sample_plane in bilinear.h.
    value = wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11)
    if HAS_SKIP:
        skip_row = skip_ptr + (plane.to(tl.int64) * skip_h + skip_y + oy) * skip_w + skip_x
        value += tl.load(scale_ptr) * tl.load(skip_row + ox, mask=in_row, other=0.0).to(ACC)
    out_row = out_ptr + row.to(tl.int64) * out_w
    tl.store(out_row + ox, value.to(out_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _grad_x_kernel(grad_ptr, grad_x_ptr, row_index, row_weight, row_readers, col_index, col_weight, col_readers,
                   in_h, in_w, out_h, out_w, max_row_readers,
                   ACC: tl.constexpr, BLOCK: tl.constexpr, COL_READERS: tl.constexpr):
    """grad_x[plane, iy, ix] = sum over the outputs (oy, ox) that read (iy, ix) of their two tap weights times grad.

    A gather in a fixed order (rows one by one, a fixed-shape tile of columns), so the result is deterministic.
    COL_READERS >= the longest readers range of a column (a power of two)."""
    row = tl.program_id(0)  # plane * in_h + iy
    plane = row // in_h
    iy = row - plane * in_h
    ix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = ix < in_w

    oy_begin = tl.load(row_readers + 2 * iy)
    oy_end = tl.load(row_readers + 2 * iy + 1)
    ox_begin = tl.load(col_readers + 2 * ix, mask=in_row, other=0)
    ox_end = tl.load(col_readers + 2 * ix + 1, mask=in_row, other=0)
    ox = ox_begin[:, None] + tl.arange(0, COL_READERS)[None, :]
    reads = in_row[:, None] & (ox < ox_end[:, None])
    # tap_weight of bilinear.h: the weight with which output column ox reads input column ix.
    cx0 = tl.load(col_index + 2 * ox, mask=reads, other=-1)
    cx1 = tl.load(col_index + 2 * ox + 1, mask=reads, other=-1)
    cw0 = tl.load(col_weight + 2 * ox, mask=reads, other=0.0)
    cw1 = tl.load(col_weight + 2 * ox + 1, mask=reads, other=0.0)
    wx = tl.where(cx0 == ix[:, None], cw0, 0.0) + tl.where(cx1 == ix[:, None], cw1, 0.0)

    g_plane = grad_ptr + plane.to(tl.int64) * out_h * out_w
    total = tl.zeros([BLOCK], dtype=ACC)
    for dy in range(0, max_row_readers):
        oy = oy_begin + dy
        live = oy < oy_end
        oy_safe = tl.where(live, oy, 0)
        ry0 = tl.load(row_index + 2 * oy_safe)
        ry1 = tl.load(row_index + 2 * oy_safe + 1)
        wy = tl.where(ry0 == iy, tl.load(row_weight + 2 * oy_safe), 0.0) + \
            tl.where(ry1 == iy, tl.load(row_weight + 2 * oy_safe + 1), 0.0)
        wy = tl.where(live, wy, 0.0)
        g = tl.load(g_plane + oy_safe * out_w + ox, mask=reads & live, other=0.0).to(ACC)
        total += wy * tl.sum(wx * g, 1)
    out_row = grad_x_ptr + row.to(tl.int64) * in_w
    tl.store(out_row + ix, total.to(grad_x_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _grad_skip_kernel(grad_ptr, grad_skip_ptr, scale_ptr, out_h, out_w, skip_h, skip_w, skip_y, skip_x,
                      ACC: tl.constexpr, BLOCK: tl.constexpr):
    """grad_skip[plane, sy, sx] = scale * grad[plane, sy - skip_y, sx - skip_x] inside the crop, 0 outside."""
    row = tl.program_id(0)  # plane * skip_h + sy
    plane = row // skip_h
    oy = row - plane * skip_h - skip_y
    sx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ox = sx - skip_x
    in_row = sx < skip_w
    inside = in_row & (ox >= 0) & (ox < out_w) & (oy >= 0) & (oy < out_h)
    g_row = grad_ptr + (plane.to(tl.int64) * out_h + oy) * out_w
    g = tl.load(g_row + ox, mask=inside, other=0.0).to(ACC)
    value = tl.load(scale_ptr) * g
    tl.store(grad_skip_ptr + row.to(tl.int64) * skip_w + sx, value.to(grad_skip_ptr.dtype.element_ty), mask=in_row)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=64)
def _scale_tensor(value: float, device: torch.device, double: bool) -> torch.Tensor:
    """skip_scale as a device scalar: a float argument would reach the kernel as float32, too coarse for float64."""
    return torch.tensor([value], dtype=torch.float64 if double else torch.float32, device=device)


@functools.lru_cache(maxsize=512)
def _longest_readers(mode: str, in_size: int, out_size: int, factor: int, offset: int, align_corners: bool) -> int:
    """The longest readers range on one axis, read from the CPU copy of the tables (no device sync)."""
    readers = axis_taps(mode, in_size, out_size, factor, offset, align_corners, torch.device("cpu"), False).readers
    return max(1, int((readers[:, 1] - readers[:, 0]).max()))


def forward(x: torch.Tensor, skip: Optional[torch.Tensor], geometry: Geometry, skip_offset: Tuple[int, int],
            skip_scale: float) -> torch.Tensor:
    x = x.contiguous()
    n, c, in_h, in_w = x.shape
    out_h, out_w = geometry.out_hw
    out = torch.empty((n, c, out_h, out_w), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows, cols = geometry.taps(x.device, x.dtype)
    double = x.dtype == torch.float64
    if skip is not None:
        skip = skip.contiguous()
        skip_h, skip_w = skip.shape[2], skip.shape[3]
    else:
        skip_h = skip_w = 0
    grid = (n * c * out_h, triton.cdiv(out_w, BLOCK_W))
    _forward_kernel[grid](
        x, skip if skip is not None else x, out, _scale_tensor(float(skip_scale), x.device, double),
        rows.index, rows.weight, cols.index, cols.weight, in_h, in_w, out_h, out_w, skip_h, skip_w,
        skip_offset[0], skip_offset[1], HAS_SKIP=skip is not None, ACC=_acc_dtype(x.dtype), BLOCK=BLOCK_W)
    return out


def backward(grad: torch.Tensor, geometry: Geometry, x_shape, skip_shape, skip_offset: Tuple[int, int],
             skip_scale: float, need_x: bool, need_skip: bool):
    grad = grad.contiguous()
    n, c, out_h, out_w = grad.shape
    acc = _acc_dtype(grad.dtype)
    grad_x = grad_skip = None
    if need_x:
        in_h, in_w = int(x_shape[2]), int(x_shape[3])
        grad_x = torch.empty((n, c, in_h, in_w), dtype=grad.dtype, device=grad.device)
        if grad_x.numel() > 0:
            rows, cols = geometry.taps(grad.device, grad.dtype)
            max_row = _longest_readers(geometry.mode, in_h, out_h, geometry.factor, geometry.offset[0],
                                       geometry.align_corners)
            max_col = _longest_readers(geometry.mode, in_w, out_w, geometry.factor, geometry.offset[1],
                                       geometry.align_corners)
            grid = (n * c * in_h, triton.cdiv(in_w, BLOCK_IN_W))
            _grad_x_kernel[grid](
                grad, grad_x, rows.index, rows.weight, rows.readers, cols.index, cols.weight, cols.readers,
                in_h, in_w, out_h, out_w, max_row, ACC=acc, BLOCK=BLOCK_IN_W,
                COL_READERS=triton.next_power_of_2(max_col))
    if need_skip:
        skip_h, skip_w = int(skip_shape[2]), int(skip_shape[3])
        grad_skip = torch.empty((n, c, skip_h, skip_w), dtype=grad.dtype, device=grad.device)
        if grad_skip.numel() > 0:
            grid = (n * c * skip_h, triton.cdiv(skip_w, BLOCK_W))
            _grad_skip_kernel[grid](
                grad, grad_skip, _scale_tensor(float(skip_scale), grad.device, grad.dtype == torch.float64),
                out_h, out_w, skip_h, skip_w, skip_offset[0], skip_offset[1], ACC=acc, BLOCK=BLOCK_W)
    return grad_x, grad_skip

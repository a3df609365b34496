"""Triton kernels of upsample_cross_entropy and upsample_argmax (plain tl API).

Forward and argmax: one program per (image, block of output pixels) holds a [BLOCK_C, BLOCK_P] tile of logits,
each interpolated from its 2x2 coarse taps (the tap tables of fcn_fast/ops/_resample.py, read with the tap helpers
of triton_common.py), and runs the shared tile math of triton_common.py. Backward: one program per (image, block of
coarse pixels) gathers, for every class at once, the output pixels in each coarse pixel's readers window,
recomputing their logits and softmax from the coarse map and the saved softmax statistics: no atomics,
deterministic.

Offsets of images and class planes are int64 (N*H*W and the virtual N*C*H*W can pass 2**31). Positions inside one
image (an output pixel, a coarse pixel) are int32 unless an image holds 2**31 positions or more (``_index_64``):
then the kernels are compiled with INDEX_64 and count them in int64.

Pixels per program (a ``TILE`` of logits) and warps per program are tuned per BLOCK_C (and readers window, for the
backward) on a GPU (``triton_common.autotune``); a reduced loss's partial sums keep the default tile. The host
decisions that depend on the tile take the extreme over the configurations: int64 positions for the largest block,
the program count for the smallest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fcn_fast.ops.triton_common import (adjoint_share, autotune, blend_taps, ce_tile_forward, ce_tile_grad,
                                        device_scalar, load_taps, on_tensor_device, only_defaults, taps_naming,
                                        tile_configs)

# Positions inside one image, plus one block past the last, must stay at or below this for int32 indexing.
POSITION_LIMIT = 2**31 - 1
# CUDA's limit on the programs of a grid's first axis.
MAX_PROGRAMS = 2**31 - 1
# Logits per program by default (forward and argmax: output pixels x classes; backward: coarse pixels x classes).
TILE_ELEMENTS = 4096
BACKWARD_TILE_ELEMENTS = 2048
CONFIGS = tile_configs(TILE_ELEMENTS, (2048, 4096, 8192, 16384))
BACKWARD_CONFIGS = tile_configs(BACKWARD_TILE_ELEMENTS, (1024, 2048, 4096))


def _block_p(tile: int, block_c: int) -> int:
    return max(16, min(128, tile // block_c))


def _block_q(tile: int, block_c: int) -> int:
    return max(16, min(64, tile // block_c))


_PIXELS = triton.heuristics({"BLOCK_P": lambda args: _block_p(args["TILE"], args["BLOCK_C"])})
_COARSE_PIXELS = triton.heuristics({"BLOCK_Q": lambda args: _block_q(args["TILE"], args["BLOCK_C"])})


def _blocks_over_configs(kernel, block, block_c: int):
    """(smallest, largest) block of ``kernel``'s configurations that can run (Triton's interpreter runs one)."""
    blocks = [block(config.kwargs["TILE"], block_c) for config in kernel.configs]
    return min(blocks), max(blocks)


def _grid(images: int, positions: int, block_name: str):
    return lambda meta: (images * triton.cdiv(positions, meta[block_name]),)


def _index_64(*positions: int, block: int) -> bool:
    """Whether positions counted inside one image (output pixels, coarse pixels: ``positions``) can pass int32,
    counting the block a program rounds them up to: then the kernels take their INDEX_64 path."""
    return max(positions) + block > POSITION_LIMIT


def _check_programs(op: str, programs: int, images: int, per_image: int) -> None:
    if programs > MAX_PROGRAMS:
        raise ValueError(f"{op}: the triton backend would launch {programs} programs ({images} images x {per_image} "
                         f"blocks), more than a CUDA grid holds ({MAX_PROGRAMS}); split the batch or use the cuda "
                         f"backend")


@triton.jit
def _logits_tile(coarse_ptr, plane, row_index_ptr, row_weight_ptr, col_index_ptr, col_weight_ptr, oy, ox, in_w,
                 mask):
    """z[BLOCK_C, BLOCK_P]: the logits upsample_add gives at output pixels (oy, ox) for the class planes starting at
    plane[BLOCK_C] (int64 offsets), rounded to coarse's dtype as upsample_add returns them, in the accumulate dtype."""
    y0, y1, wy0, wy1 = load_taps(row_index_ptr, row_weight_ptr, oy, mask)
    x0, x1, wx0, wx1 = load_taps(col_index_ptr, col_weight_ptr, ox, mask)
    base = plane[:, None]
    m = mask[None, :] & (plane[:, None] >= 0)
    # int64 rows: y * in_w passes 2**31 in a coarse plane that large (interp mode may downsample one).
    r0 = base + (y0.to(tl.int64) * in_w)[None, :]
    r1 = base + (y1.to(tl.int64) * in_w)[None, :]
    a00 = tl.load(coarse_ptr + r0 + x0[None, :], mask=m, other=0.0).to(wy0.dtype)
    a01 = tl.load(coarse_ptr + r0 + x1[None, :], mask=m, other=0.0).to(wy0.dtype)
    a10 = tl.load(coarse_ptr + r1 + x0[None, :], mask=m, other=0.0).to(wy0.dtype)
    a11 = tl.load(coarse_ptr + r1 + x1[None, :], mask=m, other=0.0).to(wy0.dtype)
    z = blend_taps(a00, a01, a10, a11, wy0[None, :], wy1[None, :], wx0[None, :], wx1[None, :])
    return z.to(coarse_ptr.dtype.element_ty).to(wy0.dtype)


@triton.jit
def _planes(n, c_offs, num_classes, plane_size):
    """int64 offsets of image n's class planes; -1 marks padded classes (masked by _logits_tile)."""
    return tl.where(c_offs < num_classes, (n * num_classes + c_offs).to(tl.int64) * plane_size, -1)


@triton.jit
def _class_weights(weight_ptr, c_offs, num_classes, HAS_WEIGHT: tl.constexpr):
    c_mask = c_offs < num_classes
    if HAS_WEIGHT:
        class_w = tl.load(weight_ptr + c_offs, mask=c_mask, other=0.0)
    else:
        class_w = tl.where(c_mask, 1.0, 0.0)
    return class_w, tl.sum(class_w, 0)


@triton.jit
def _image_and_block(positions, BLOCK: tl.constexpr):
    """(image n as int64, block of that image) of this program. The grid is one flat axis of N * blocks_per_image
    programs: a (N, blocks) grid put the blocks on axis 1, which CUDA limits to 65535 programs, so on a GPU the
    forward and argmax failed to launch for an image of more than ~8M output pixels at 21 classes (~1M at 150), and
    the backward for more than ~4M coarse pixels (the interpreter has no such limit)."""
    blocks_per_image = tl.cdiv(positions, BLOCK)
    pid = tl.program_id(0)
    n = pid // blocks_per_image
    return n.to(tl.int64), pid - n * blocks_per_image


@triton.jit
def _positions(block, BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """Positions [BLOCK] of this program inside its image: int32, or int64 for images of 2**31 positions or more."""
    if INDEX_64:
        return block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return block * BLOCK + tl.arange(0, BLOCK)


@autotune(CONFIGS, key=["BLOCK_C", "PER_PIXEL"], prune=only_defaults)
@_PIXELS
@triton.jit
def _forward_kernel(coarse_ptr, target_ptr, weight_ptr, row_index_ptr, row_weight_ptr, col_index_ptr, col_weight_ptr,
                    loss_ptr, denom_ptr, max_ptr, log_sum_ptr, eps_ptr, num_classes, ignore_index, in_w, in_hw,
                    out_w, out_hw, PER_PIXEL: tl.constexpr, HAS_WEIGHT: tl.constexpr, INDEX_64: tl.constexpr,
                    BLOCK_C: tl.constexpr, TILE: tl.constexpr, BLOCK_P: tl.constexpr):
    n, block = _image_and_block(out_hw, BLOCK_P)
    p = _positions(block, BLOCK_P, INDEX_64)
    p_mask = p < out_hw
    oy, ox = p // out_w, p % out_w
    c_offs = tl.arange(0, BLOCK_C)
    z = _logits_tile(coarse_ptr, _planes(n, c_offs, num_classes, in_hw), row_index_ptr, row_weight_ptr,
                     col_index_ptr, col_weight_ptr, oy, ox, in_w, p_mask)
    z = tl.where((c_offs < num_classes)[:, None], z, float("-inf"))
    pixel = n * out_hw + p
    t = tl.load(target_ptr + pixel, mask=p_mask, other=0).to(tl.int64)
    class_w, weight_sum = _class_weights(weight_ptr, c_offs, num_classes, HAS_WEIGHT)
    eps = tl.load(eps_ptr)
    loss, denom, m, log_sum = ce_tile_forward(z, t, class_w.to(z.dtype), c_offs, weight_sum, eps, num_classes,
                                              ignore_index)
    tl.store(max_ptr + pixel, m, mask=p_mask)
    tl.store(log_sum_ptr + pixel, log_sum, mask=p_mask)
    if PER_PIXEL:
        tl.store(loss_ptr + pixel, loss, mask=p_mask)
        tl.store(denom_ptr + pixel, denom, mask=p_mask)
    else:  # one (loss, denom) sum per program, in a fixed order
        tl.store(loss_ptr + tl.program_id(0), tl.sum(tl.where(p_mask, loss, 0.0), 0))
        tl.store(denom_ptr + tl.program_id(0), tl.sum(tl.where(p_mask, denom, 0.0), 0))


@autotune(BACKWARD_CONFIGS, key=["BLOCK_C", "span_y", "span_x"])
@_COARSE_PIXELS
@triton.jit
def _backward_kernel(grad_ptr, coarse_ptr, target_ptr, weight_ptr, max_ptr, log_sum_ptr, row_index_ptr,
                     row_weight_ptr, row_readers_ptr, col_index_ptr, col_weight_ptr, col_readers_ptr, out_ptr, eps_ptr,
                     num_classes, ignore_index, in_w, in_hw, out_w, out_hw, span_y, span_x,
                     PER_PIXEL: tl.constexpr, HAS_WEIGHT: tl.constexpr, INDEX_64: tl.constexpr,
                     BLOCK_C: tl.constexpr, TILE: tl.constexpr, BLOCK_Q: tl.constexpr):
    n, block = _image_and_block(in_hw, BLOCK_Q)
    q = _positions(block, BLOCK_Q, INDEX_64)
    q_mask = q < in_hw
    iy, ix = q // in_w, q % in_w
    c_offs = tl.arange(0, BLOCK_C)
    planes = _planes(n, c_offs, num_classes, in_hw)
    class_w, weight_sum = _class_weights(weight_ptr, c_offs, num_classes, HAS_WEIGHT)
    eps = tl.load(eps_ptr)
    row_start = tl.load(row_readers_ptr + 2 * iy, mask=q_mask, other=0)
    row_stop = tl.load(row_readers_ptr + 2 * iy + 1, mask=q_mask, other=0)
    col_start = tl.load(col_readers_ptr + 2 * ix, mask=q_mask, other=0)
    col_stop = tl.load(col_readers_ptr + 2 * ix + 1, mask=q_mask, other=0)
    total = tl.zeros((BLOCK_C, BLOCK_Q), dtype=row_weight_ptr.dtype.element_ty)
    # Every coarse pixel walks its own readers window in the same (dy, dx) order: a fixed summation order.
    for dy in range(0, span_y):
        oy = row_start + dy
        y_ok = q_mask & (oy < row_stop)
        ry0, ry1, wy0, wy1 = taps_naming(row_index_ptr, row_weight_ptr, oy, iy, y_ok)
        row_sum = tl.zeros((BLOCK_C, BLOCK_Q), dtype=row_weight_ptr.dtype.element_ty)
        for dx in range(0, span_x):
            ox = col_start + dx
            ok = y_ok & (ox < col_stop)
            cx0, cx1, wx0, wx1 = taps_naming(col_index_ptr, col_weight_ptr, ox, ix, ok)
            pixel = n * out_hw + oy.to(tl.int64) * out_w + ox
            t = tl.load(target_ptr + pixel, mask=ok, other=0).to(tl.int64)
            m = tl.load(max_ptr + pixel, mask=ok, other=0.0)
            log_sum = tl.load(log_sum_ptr + pixel, mask=ok, other=0.0)
            if PER_PIXEL:
                g = tl.load(grad_ptr + pixel, mask=ok, other=0.0)
            else:
                g = tl.zeros_like(m) + tl.load(grad_ptr)
            z = _logits_tile(coarse_ptr, planes, row_index_ptr, row_weight_ptr, col_index_ptr, col_weight_ptr, oy,
                             ox, in_w, ok)
            z = tl.where((c_offs < num_classes)[:, None], z, float("-inf"))
            d = ce_tile_grad(z, t, m, log_sum, g, class_w.to(z.dtype), c_offs, weight_sum, eps, num_classes,
                             ignore_index)
            # Every tap multiplied on its own, weight 0 included, as PyTorch's upsample backward does.
            row_sum += adjoint_share(cx0[None, :], cx1[None, :], wx0[None, :], wx1[None, :], d)
        total += adjoint_share(ry0[None, :], ry1[None, :], wy0[None, :], wy1[None, :], row_sum)
    offs = planes[:, None] + q[None, :]
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=(c_offs < num_classes)[:, None] & q_mask[None, :])


@autotune(CONFIGS, key=["BLOCK_C"])
@_PIXELS
@triton.jit
def _argmax_kernel(coarse_ptr, row_index_ptr, row_weight_ptr, col_index_ptr, col_weight_ptr, out_ptr, num_classes,
                   in_w, in_hw, out_w, out_hw, INDEX_64: tl.constexpr, BLOCK_C: tl.constexpr, TILE: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    n, block = _image_and_block(out_hw, BLOCK_P)
    p = _positions(block, BLOCK_P, INDEX_64)
    p_mask = p < out_hw
    oy, ox = p // out_w, p % out_w
    c_offs = tl.arange(0, BLOCK_C)
    z = _logits_tile(coarse_ptr, _planes(n, c_offs, num_classes, in_hw), row_index_ptr, row_weight_ptr,
                     col_index_ptr, col_weight_ptr, oy, ox, in_w, p_mask)
    real = (c_offs < num_classes)[:, None]
    # torch.argmax: the first NaN wins; otherwise the first class holding the maximum.
    first_nan = tl.min(tl.where(real & (z != z), c_offs[:, None], BLOCK_C), 0)
    best = tl.max(tl.where(real, z, float("-inf")), 0)
    first_best = tl.min(tl.where(real & (z == best[None, :]), c_offs[:, None], BLOCK_C), 0)
    first_best = tl.where(first_best == BLOCK_C, 0, first_best)  # every logit -inf: torch gives class 0
    label = tl.where(first_nan < BLOCK_C, first_nan, first_best)
    tl.store(out_ptr + n * out_hw + p, label.to(out_ptr.dtype.element_ty), mask=p_mask)


@on_tensor_device
def forward(coarse, target, weight, geometry, ignore_index, label_smoothing, per_pixel):
    """(loss, "mean" weight, softmax statistics) in the accumulate dtype: lse (2, N, H, W); loss and weight
    (N, H, W) when per_pixel, else one sum per program."""
    rows, cols = geometry.taps(coarse.device, coarse.dtype)
    n, c, h, w = coarse.shape
    out_h, out_w = geometry.out_hw
    acc = rows.weight.dtype
    block_c = triton.next_power_of_2(c)
    smallest, largest = _blocks_over_configs(_forward_kernel, _block_p, block_c)
    blocks = triton.cdiv(out_h * out_w, smallest)
    _check_programs("upsample_cross_entropy", n * blocks, n, blocks)
    # A reduced loss runs the defaults (only_defaults): one sum per program of their tile.
    default_block = _block_p(_forward_kernel.configs[0].kwargs["TILE"], block_c)
    sums_shape = (n, out_h, out_w) if per_pixel else (n * triton.cdiv(out_h * out_w, default_block),)
    loss, denom = (torch.empty(sums_shape, dtype=acc, device=coarse.device) for _ in range(2))
    lse = torch.empty((2, n, out_h, out_w), dtype=acc, device=coarse.device)
    _forward_kernel[_grid(n, out_h * out_w, "BLOCK_P")](
        coarse, target, weight if weight is not None else coarse, rows.index, rows.weight, cols.index, cols.weight,
        loss, denom, lse[0], lse[1], device_scalar(label_smoothing, acc, coarse.device), c, ignore_index, w, h * w,
        out_w, out_h * out_w, PER_PIXEL=per_pixel, HAS_WEIGHT=weight is not None,
        INDEX_64=_index_64(out_h * out_w, h * w, block=largest), BLOCK_C=block_c)
    return loss, denom, lse


@on_tensor_device
def backward(grad_pixel, coarse, target, weight, lse, geometry, ignore_index, label_smoothing):
    """grad_coarse (N, C, h, w) from the gradient of every pixel's loss (a scalar, or (N, H, W))."""
    rows, cols = geometry.taps(coarse.device, coarse.dtype)
    n, c, h, w = coarse.shape
    out_h, out_w = geometry.out_hw
    grad_coarse = torch.empty_like(coarse)
    acc = rows.weight.dtype
    # The widest readers windows bound the gather loops (2 * factor for deconv).
    host_rows, host_cols = geometry.taps(torch.device("cpu"), coarse.dtype)  # cached: no device sync
    span_y = int((host_rows.readers[:, 1] - host_rows.readers[:, 0]).max())
    span_x = int((host_cols.readers[:, 1] - host_cols.readers[:, 0]).max())
    block_c = triton.next_power_of_2(c)
    smallest, largest = _blocks_over_configs(_backward_kernel, _block_q, block_c)
    blocks = triton.cdiv(h * w, smallest)
    _check_programs("upsample_cross_entropy", n * blocks, n, blocks)
    _backward_kernel[_grid(n, h * w, "BLOCK_Q")](
        grad_pixel, coarse, target, weight if weight is not None else coarse, lse[0], lse[1], rows.index,
        rows.weight, rows.readers, cols.index, cols.weight, cols.readers, grad_coarse,
        device_scalar(label_smoothing, acc, coarse.device), c, ignore_index, w, h * w, out_w, out_h * out_w, span_y,
        span_x, PER_PIXEL=grad_pixel.dim() == 3, HAS_WEIGHT=weight is not None,
        INDEX_64=_index_64(out_h * out_w, h * w, block=largest), BLOCK_C=block_c)
    return grad_coarse


@on_tensor_device
def argmax(coarse, geometry, dtype):
    rows, cols = geometry.taps(coarse.device, coarse.dtype)
    n, c, h, w = coarse.shape
    out_h, out_w = geometry.out_hw
    labels = torch.empty((n, out_h, out_w), dtype=dtype, device=coarse.device)
    block_c = triton.next_power_of_2(c)
    smallest, largest = _blocks_over_configs(_argmax_kernel, _block_p, block_c)
    blocks = triton.cdiv(out_h * out_w, smallest)
    _check_programs("upsample_argmax", n * blocks, n, blocks)
    _argmax_kernel[_grid(n, out_h * out_w, "BLOCK_P")](
        coarse, rows.index, rows.weight, cols.index, cols.weight, labels, c, w, h * w, out_w, out_h * out_w,
        INDEX_64=_index_64(out_h * out_w, h * w, block=largest), BLOCK_C=block_c)
    return labels

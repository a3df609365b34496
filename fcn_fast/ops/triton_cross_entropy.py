"""softmax_cross_entropy in Triton: forward (per-pixel loss, denominator weight, softmax statistics) and backward.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (slow; tests only). A program owns BLOCK_P
consecutive pixels of the flattened (N, S) grid and loads their logits as one [BLOCK_C, BLOCK_P] tile straight from
the caller's strides: along NCHW's pixel axis the loads of one class row are contiguous, so they coalesce; the math
on the tile is ``triton_common.ce_tile_forward`` / ``ce_tile_grad``. All C classes sit in one tile (BLOCK_C = C
rounded up to a power of two), which bounds C (MAX_CLASSES). A reduced loss writes one (loss, weight) partial sum
per program instead of per-pixel values. The tile's size and the warps per program are tuned per BLOCK_C on a GPU
(``triton_common.autotune``; a reduced loss's partial sums keep the default tile, so its bits do not depend on it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fcn_fast.ops._dispatch import acc_dtype
from fcn_fast.ops.triton_common import (acc_type, autotune, ce_tile_forward, ce_tile_grad, device_scalar,
                                        on_tensor_device, only_defaults, tile_configs)

# A tile holds about this many logits by default: 128 pixels at 21 classes (padded to 32), one pixel at MAX_CLASSES.
TILE_ELEMENTS = 4096
MAX_CLASSES = 16384
CONFIGS = tile_configs(TILE_ELEMENTS, (2048, 4096, 8192, 16384))


def _block_c(num_classes: int) -> int:
    if num_classes > MAX_CLASSES:
        raise ValueError(f"softmax_cross_entropy: the triton backend keeps all classes of a pixel in one tile and "
                         f"supports at most {MAX_CLASSES} classes, got {num_classes}; use the cuda backend")
    return triton.next_power_of_2(num_classes)


def _block_p(tile: int, block_c: int) -> int:
    """Pixels per program: the rest of the tile once a pixel's BLOCK_C classes are in it."""
    return max(1, min(256, tile // block_c))


_PIXELS = triton.heuristics({"BLOCK_P": lambda args: _block_p(args["TILE"], args["BLOCK_C"])})


def _grid(total: int):
    return lambda meta: (triton.cdiv(total, meta["BLOCK_P"]),)


@triton.jit
def _load_tile(logits_ptr, target_ptr, weight_ptr, pid, total, pixels, num_classes,
               stride_ln, stride_lc, stride_ls, stride_tn, stride_ts,
               HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The tile of BLOCK_P pixels starting at pid * BLOCK_P: (flat pixel index, pixel mask, n, p, class offsets,
    logits [BLOCK_C, BLOCK_P] with -inf padding, targets, class weights, their sum)."""
    i = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # int64: N*C*S can pass 2**31
    p_mask = i < total
    n = i // pixels
    p = i - n * pixels
    c = tl.arange(0, BLOCK_C)
    c_mask = c < num_classes
    offsets = (n * stride_ln + p * stride_ls)[None, :] + c.to(tl.int64)[:, None] * stride_lc
    z = tl.load(logits_ptr + offsets, mask=c_mask[:, None] & p_mask[None, :], other=float("-inf")).to(ACC)
    t = tl.load(target_ptr + n * stride_tn + p * stride_ts, mask=p_mask, other=0).to(tl.int64)
    if HAS_WEIGHT:
        class_w = tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(ACC)
    else:
        class_w = tl.where(c_mask, 1.0, 0.0).to(ACC)
    return i, p_mask, n, p, c, z, t, class_w, tl.sum(class_w, 0)


@autotune(CONFIGS, key=["BLOCK_C", "PER_PIXEL"], prune=only_defaults)
@_PIXELS
@triton.jit
def _forward_kernel(logits_ptr, target_ptr, weight_ptr, loss_ptr, denom_ptr, lse_ptr,
                    total, pixels, num_classes, stride_ln, stride_lc, stride_ls, stride_tn, stride_ts,
                    ignore_index, eps_ptr, PER_PIXEL: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_C: tl.constexpr, TILE: tl.constexpr, BLOCK_P: tl.constexpr):
    """loss, denom: contiguous (N, S) in ACC, or (PER_PIXEL false) one sum per program; lse: the softmax statistics,
    contiguous (2, N, S) in ACC."""
    i, p_mask, n, p, c, z, t, class_w, weight_sum = _load_tile(
        logits_ptr, target_ptr, weight_ptr, tl.program_id(0), total, pixels, num_classes,
        stride_ln, stride_lc, stride_ls, stride_tn, stride_ts, HAS_WEIGHT, ACC, BLOCK_C, BLOCK_P)
    loss, denom, m, log_sum = ce_tile_forward(z, t, class_w, c, weight_sum, tl.load(eps_ptr), num_classes,
                                              ignore_index)
    if PER_PIXEL:
        tl.store(loss_ptr + i, loss, mask=p_mask)
        tl.store(denom_ptr + i, denom, mask=p_mask)
    else:  # one (loss, denom) sum per program, in a fixed order; lanes past the end hold NaN (all -inf logits)
        tl.store(loss_ptr + tl.program_id(0), tl.sum(tl.where(p_mask, loss, 0.0), 0))
        tl.store(denom_ptr + tl.program_id(0), tl.sum(tl.where(p_mask, denom, 0.0), 0))
    tl.store(lse_ptr + i, m, mask=p_mask)
    tl.store(lse_ptr + total + i, log_sum, mask=p_mask)


@autotune(CONFIGS, key=["BLOCK_C"])
@_PIXELS
@triton.jit
def _backward_kernel(logits_ptr, target_ptr, weight_ptr, lse_ptr, grad_loss_ptr, grad_ptr,
                     total, pixels, num_classes, stride_ln, stride_lc, stride_ls, stride_tn, stride_ts,
                     stride_gn, stride_gs, stride_dn, stride_dc, stride_ds, ignore_index, eps_ptr,
                     HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, TILE: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    """grad[n, c, p] = g[n, p] * dloss/dz; grad_loss (N, S) may have zero strides (an expanded scalar)."""
    i, p_mask, n, p, c, z, t, class_w, weight_sum = _load_tile(
        logits_ptr, target_ptr, weight_ptr, tl.program_id(0), total, pixels, num_classes,
        stride_ln, stride_lc, stride_ls, stride_tn, stride_ts, HAS_WEIGHT, ACC, BLOCK_C, BLOCK_P)
    m = tl.load(lse_ptr + i, mask=p_mask, other=0.0)
    log_sum = tl.load(lse_ptr + total + i, mask=p_mask, other=0.0)
    g = tl.load(grad_loss_ptr + n * stride_gn + p * stride_gs, mask=p_mask, other=0.0)
    d = ce_tile_grad(z, t, m, log_sum, g, class_w, c, weight_sum, tl.load(eps_ptr), num_classes, ignore_index)
    offsets = (n * stride_dn + p * stride_ds)[None, :] + c.to(tl.int64)[:, None] * stride_dc
    tl.store(grad_ptr + offsets, d.to(grad_ptr.dtype.element_ty), mask=(c < num_classes)[:, None] & p_mask[None, :])


@on_tensor_device
def forward(logits, target, weight, ignore_index: int, label_smoothing: float, per_pixel: bool = True):
    """logits (N, C, S), target (N, S) -> (loss, denom_weight): per pixel, contiguous (N, S), or (per_pixel False)
    one partial sum of each per program; and lse, the softmax statistics (2, N, S); all in the acc dtype."""
    n, num_classes, pixels = logits.shape
    acc = acc_dtype(logits.dtype)
    total = n * pixels
    block_c = _block_c(num_classes)
    # A reduced loss runs the defaults (only_defaults), so the number of partial sums is known here.
    default_tile = _forward_kernel.configs[0].kwargs["TILE"]
    sums_shape = (n, pixels) if per_pixel else (triton.cdiv(total, _block_p(default_tile, block_c)),)
    loss, denom = (torch.empty(sums_shape, device=logits.device, dtype=acc) for _ in range(2))
    lse = torch.empty((2, n, pixels), device=logits.device, dtype=acc)
    if total == 0:
        return loss, denom, lse
    _forward_kernel[_grid(total)](
        logits, target, weight if weight is not None else lse, loss, denom, lse,
        total, pixels, num_classes, *logits.stride(), *target.stride(), ignore_index,
        device_scalar(label_smoothing, acc, logits.device), PER_PIXEL=per_pixel, HAS_WEIGHT=weight is not None,
        ACC=acc_type(logits.dtype), BLOCK_C=block_c)
    return loss, denom, lse


@on_tensor_device
def backward(grad_pixels, logits, target, lse, weight, ignore_index: int, label_smoothing: float):
    """grad_pixels (N, S) in the acc dtype (strides may be 0) -> grad_logits, shaped and strided like logits."""
    grad = torch.empty_like(logits)
    n, num_classes, pixels = logits.shape
    total = n * pixels
    if grad.numel() == 0:
        return grad
    _backward_kernel[_grid(total)](
        logits, target, weight if weight is not None else lse, lse, grad_pixels, grad,
        total, pixels, num_classes, *logits.stride(), *target.stride(), *grad_pixels.stride(), *grad.stride(),
        ignore_index, device_scalar(label_smoothing, lse.dtype, lse.device),
        HAS_WEIGHT=weight is not None, ACC=acc_type(logits.dtype), BLOCK_C=_block_c(num_classes))
    return grad

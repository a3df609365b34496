"""Triton building blocks shared by the Triton kernels: the per-pixel softmax cross-entropy math on a tile of
logits (the Triton twin of kernels/include/fcn_fast/softmax_ce.h; formulas there), and ``on_tensor_device``, the
device guard every Triton entry point runs under, and ``acc_type``, the accumulate dtype as a Triton type.

A tile is z[BLOCK_C, BLOCK_P]: BLOCK_C >= C classes (padded to a power of two) by BLOCK_P pixels, float32, with
padded classes set to -inf by the caller. class_w[BLOCK_C] holds the class weights (1.0 when none, 0.0 for padded
classes). Pixels whose target is ignore_index or outside [0, C) are ignored: loss and weight 0, gradient p * 0 (0, or
NaN where their logits hold NaN/+inf, as PyTorch's log_softmax backward gives).
"""

import functools

import torch
import triton
import triton.language as tl

from fcn_fast.ops._dispatch import acc_dtype


def acc_type(dtype: torch.dtype):
    """The Triton type the kernels accumulate ``dtype`` inputs in (``fcn_fast.ops._dispatch.acc_dtype``)."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def on_tensor_device(launcher):
    """Runs ``launcher`` with the current CUDA device set to the device of its first tensor argument.

    Triton launches on ``torch.cuda.current_device()`` and that device's current stream, not on the device of the
    tensors it is given (triton.runtime.jit); without this, cuda:1 tensors passed while cuda:0 is current would go to
    a kernel running on cuda:0 (an illegal memory access at best). The CUDA kernels get the same from their
    CUDAGuard. CPU tensors (TRITON_INTERPRET=1) run as they are."""

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)

    return launch


@triton.jit
def ce_tile_forward(z, t, class_w, c_offs, weight_sum, eps, num_classes, ignore_index):
    """Returns (loss[BLOCK_P], denom_weight[BLOCK_P], lse[BLOCK_P]) for a tile of logits."""
    c_mask = c_offs < num_classes
    m = tl.max(z, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # all-padded column: keep exp() finite, the pixel is masked later
    s = tl.sum(tl.exp(z - m_safe[None, :]), 0)
    lse = m_safe + tl.log(s)
    is_t = c_offs[:, None] == t[None, :]
    z_t = tl.sum(tl.where(is_t, z, 0.0), 0)
    w_t = tl.sum(tl.where(is_t, class_w[:, None], 0.0), 0)
    wz = tl.sum(tl.where(c_mask[:, None], class_w[:, None] * z, 0.0), 0)
    valid = (t != ignore_index) & (t >= 0) & (t < num_classes)
    loss = (1.0 - eps) * w_t * (lse - z_t)
    # Added only with smoothing: 0 * inf (a -inf logit in wz) would be NaN where PyTorch gives inf.
    loss += tl.where(eps != 0.0, (eps / num_classes) * (lse * weight_sum - wz), 0.0)
    return tl.where(valid, loss, 0.0), tl.where(valid, w_t, 0.0), lse


@triton.jit
def ce_tile_grad(z, t, lse, g, class_w, c_offs, weight_sum, eps, num_classes, ignore_index):
    """dloss/dz[BLOCK_C, BLOCK_P] for a tile, scaled per pixel by g[BLOCK_P]."""
    p = tl.exp(z - lse[None, :])
    is_t = c_offs[:, None] == t[None, :]
    w_t = tl.sum(tl.where(is_t, class_w[:, None], 0.0), 0)
    coef = (1.0 - eps) * w_t + (eps / num_classes) * weight_sum
    d = p * coef[None, :] - tl.where(is_t, ((1.0 - eps) * w_t)[None, :], 0.0) - (eps / num_classes) * class_w[:, None]
    valid = (t != ignore_index) & (t >= 0) & (t < num_classes)
    return tl.where(valid[None, :], d * g[None, :], p * 0.0)

"""Triton building blocks shared by the Triton kernels: the per-pixel softmax cross-entropy math on a tile of
logits (the Triton twin of kernels/include/fcn_fast/softmax_ce.h; formulas there).

A tile is z[BLOCK_C, BLOCK_P]: BLOCK_C >= C classes (padded to a power of two) by BLOCK_P pixels, float32, with
padded classes set to -inf by the caller. class_w[BLOCK_C] holds the class weights (1.0 when none, 0.0 for padded
classes). Pixels whose target is ignore_index or outside [0, C) are ignored: loss and weight 0, gradient p * 0 (0, or
NaN where their logits hold NaN/+inf, as PyTorch's log_softmax backward gives).
"""

import triton
import triton.language as tl


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
    loss = (1.0 - eps) * w_t * (lse - z_t) + (eps / num_classes) * (lse * weight_sum - wz)
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

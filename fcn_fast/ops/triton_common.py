"""Triton building blocks shared by the Triton kernels: the per-pixel softmax cross-entropy math on a tile of
logits (the Triton twin of kernels/include/fcn_fast/softmax_ce.h; formulas there), the bilinear tap helpers every
Triton kernel reads the tap tables with (the twins of kernels/include/fcn_fast/bilinear.h), ``on_tensor_device``, the
device guard every Triton entry point runs under, ``acc_type``, the accumulate dtype as a Triton type,
``device_scalar``, the sync-free way to hand a kernel a float, and ``autotune``, the tuning policy of every kernel.

A tile is z[BLOCK_C, BLOCK_P]: BLOCK_C >= C classes (padded to a power of two) by BLOCK_P pixels, float32, with
padded classes set to -inf by the caller. class_w[BLOCK_C] holds the class weights (1.0 when none, 0.0 for padded
classes). Pixels whose target is ignore_index or outside [0, C) are ignored: loss and weight 0, gradient p * 0 (0, or
NaN where their logits hold NaN/+inf, as PyTorch's log_softmax backward gives).
"""

import functools
import os

import torch
import triton
import triton.language as tl

from fcn_fast.ops._dispatch import acc_dtype


def acc_type(dtype: torch.dtype):
    """The Triton type the kernels accumulate ``dtype`` inputs in (``fcn_fast.ops._dispatch.acc_dtype``)."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, read as Triton reads it: when the
    kernels are decorated, i.e. when their module is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune(configs, key, prune=None):
    """``triton.autotune`` over ``configs``, keyed on the argument names ``key`` (Triton adds the tensor dtypes): on a
    GPU, the first call of each key times every configuration (after ``prune(configs, named_args, **kwargs)``) and
    keeps the fastest. ``configs[0]`` holds the defaults, the tile the kernels had before they were tuned; under the
    interpreter it is the only one, since timing configurations there would only multiply the tests' run time.

    A reduction inside a tile (over classes, over a readers window) may associate differently under another tile
    shape or warp count, so the choice is kept in Triton's on-disk cache (``cache_results``): while that cache lasts,
    runs on one machine agree bit for bit, not only the calls of one process. Sums across programs must not depend
    on the choice at all: launches that write per-program partial sums prune to the defaults (``only_defaults``,
    with PER_PIXEL in the key, so that a choice made for per-pixel launches is never reused for them)."""
    return triton.autotune(configs=configs[:1] if interpreting() else configs, key=key, cache_results=True,
                           prune_configs_by={"early_config_prune": prune} if prune is not None else None)


def tile_configs(default_tile: int, tiles, warps=(4, 8)):
    """Configurations of a kernel whose tile size is one meta-parameter ``TILE`` (elements per program; the kernel's
    heuristics derive its block shape from it and the sizes): the default first, with Triton's default 4 warps, then
    every other (tile, warps) pair."""
    first = triton.Config({"TILE": default_tile}, num_warps=4)
    return [first] + [triton.Config({"TILE": t}, num_warps=w) for t in tiles for w in warps
                      if (t, w) != (default_tile, 4)]


def only_defaults(configs, named_args, **kwargs):
    """An autotune prune for kernels with a PER_PIXEL flag: a launch that writes per-program partial sums (PER_PIXEL
    false) runs the defaults only, so that the summation order, and with it the last bit of a reduced loss, is the
    same on every run and every machine."""
    return configs if kwargs.get("PER_PIXEL", True) else configs[:1]


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


def device_scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A float as a one-element tensor for a kernel to load: Triton passes Python
    floats as float32, too coarse for float64 data. torch.full launches a fill kernel with the value as its argument,
    where torch.tensor([value], device=...) would copy from host memory and wait for the device (a sync per call,
    which also breaks CUDA graph capture); a cached tensor could be freed under a kernel of another stream."""
    return torch.full((1,), value, dtype=dtype, device=device)


@triton.jit
def ce_tile_forward(z, t, class_w, c_offs, weight_sum, eps, num_classes, ignore_index):
    """Returns (loss[BLOCK_P], denom_weight[BLOCK_P], max[BLOCK_P], log_sum[BLOCK_P]) for a tile of logits: every
    quantity relative to the pixel's max logit m as log_softmax computes it (softmax_ce.h: (m + log sum) - z_t loses
    the log sum for large logits), (m, log sum exp(z - m)) being the softmax statistics backward keeps."""
    c_mask = c_offs < num_classes
    m = tl.max(z, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all -inf (or an all-padded column): keep exp() finite; the loss is
    # NaN all the same (log 0 - (-inf - 0)), as PyTorch gives for an all -inf pixel
    shifted = z - m[None, :]
    log_sum = tl.log(tl.sum(tl.exp(shifted), 0))
    is_t = c_offs[:, None] == t[None, :]
    z_t = tl.sum(tl.where(is_t, shifted, 0.0), 0)
    w_t = tl.sum(tl.where(is_t, class_w[:, None], 0.0), 0)
    valid = (t != ignore_index) & (t >= 0) & (t < num_classes)
    loss = (1.0 - eps) * w_t * (log_sum - z_t)
    wz = tl.sum(tl.where(c_mask[:, None], class_w[:, None] * shifted, 0.0), 0)
    # Added only with smoothing: 0 * inf (a -inf logit in wz) would be NaN where PyTorch gives inf.
    loss += tl.where(eps != 0.0, (eps / num_classes) * (log_sum * weight_sum - wz), 0.0)
    return tl.where(valid, loss, 0.0), tl.where(valid, w_t, 0.0), m, log_sum


@triton.jit
def ce_tile_grad(z, t, m, log_sum, g, class_w, c_offs, weight_sum, eps, num_classes, ignore_index):
    """g * dloss/dz[BLOCK_C, BLOCK_P] for a tile, from the forward's softmax statistics (m, log_sum) of each pixel
    and its incoming gradient g[BLOCK_P]. g scales the coefficients before they meet p, as in softmax_ce.h's
    CeGradCoef: an incoming gradient of 1/0 (a "mean" over zero weight) then gives NaN as in PyTorch, not +-inf."""
    p = tl.exp((z - m[None, :]) - log_sum[None, :])
    is_t = c_offs[:, None] == t[None, :]
    valid = (t != ignore_index) & (t >= 0) & (t < num_classes)
    gk = tl.where(valid, g, 0.0)  # ignored pixels: p * 0 (NaN where their logits hold NaN/+inf, as in PyTorch)
    w_t = tl.sum(tl.where(is_t, class_w[:, None], 0.0), 0)
    prob_scale = gk * ((1.0 - eps) * w_t + (eps / num_classes) * weight_sum)
    target_scale = gk * (1.0 - eps) * w_t
    smooth_scale = gk * (eps / num_classes)
    d = p * prob_scale[None, :] - tl.where(is_t, target_scale[None, :], 0.0)
    return d - class_w[:, None] * smooth_scale[None, :]


# ---- bilinear taps: the tap tables of fcn_fast/ops/_resample.py (format in kernels/include/fcn_fast/bilinear.h) ----

@triton.jit
def load_taps(index_ptr, weight_ptr, o, mask):
    """(i0, i1, w0, w1): the two input positions output positions o read along one axis, and their weights. Lanes
    outside mask read position 0 with weight 0."""
    i0 = tl.load(index_ptr + 2 * o, mask=mask, other=0)
    i1 = tl.load(index_ptr + 2 * o + 1, mask=mask, other=0)
    w0 = tl.load(weight_ptr + 2 * o, mask=mask, other=0.0)
    w1 = tl.load(weight_ptr + 2 * o + 1, mask=mask, other=0.0)
    return i0, i1, w0, w1


@triton.jit
def taps_naming(index_ptr, weight_ptr, o, i, mask):
    """(names0, names1, w0, w1): which of the two taps of output positions o name input positions i (False outside
    mask), and their weights. For an adjoint that multiplies every tap on its own (adjoint_share)."""
    i0, i1, w0, w1 = load_taps(index_ptr, weight_ptr, o, mask)
    return mask & (i0 == i), mask & (i1 == i), w0, w1


@triton.jit
def adjoint_share(names0, names1, w0, w1, v):
    """The share of v that an output sends an input through its taps naming it (taps_naming): each tap multiplied
    on its own, as PyTorch's adjoints do, so a weight-0 tap still gives 0 * v (NaN for an infinite v, as
    F.interpolate's backward gives; bilinear.h's tap_adjoint)."""
    return tl.where(names0, w0 * v, 0.0) + tl.where(names1, w1 * v, 0.0)


@triton.jit
def blend_taps(v00, v01, v10, v11, wy0, wy1, wx0, wx1):
    """The 2x2 taps (row y0/y1, column x0/x1) blended in the association of bilinear.h's sample_plane, so every
    backend rounds alike. Every tap is multiplied, weight 0 or not, as PyTorch's upsample_bilinear2d does (an inf it
    reads with weight 0 gives NaN there too); the deconv tables carry no weight-0 taps (_resample._deconv_taps)."""
    return wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11)

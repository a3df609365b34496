"""Bilinear resampling geometry: the Caffe bilinear filler, output sizes, and the tap tables every native kernel
(cpu, cuda, triton) reads. The reference backend does not use them: it calls F.conv_transpose2d / F.interpolate.

Tables (per axis, see kernels/include/fcn_fast/bilinear.h):
  index   (out, 2) int32   the two input positions output position o reads (always in bounds)
  weight  (out, 2) float   their weights (float64 for float64 inputs, else float32)
  readers (in, 2)  int32   [start, stop) of the output positions that read input position i
"""

from __future__ import annotations

import fractions
import functools
from dataclasses import dataclass
from typing import Tuple

import torch

from fcn_fast._validation import check_bool, check_int, check_pair

MODES = ("deconv", "interp")


def deconv_kernel_size(factor: int) -> int:
    """Kernel size of FCN's bilinear deconvolution for an upsampling factor (4 for x2, 16 for x8, 64 for x32)."""
    return 2 * factor - factor % 2


def deconv_output_size(in_size: int, factor: int) -> int:
    """Size of ``conv_transpose2d(stride=factor, kernel=deconv_kernel_size(factor), padding=0)`` along one axis."""
    return (in_size - 1) * factor + deconv_kernel_size(factor)


def bilinear_filler_1d(kernel_size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The 1D Caffe/FCN bilinear filler ("upsample_filt"): 1 - |k - center| / f, f = ceil(kernel_size / 2)."""
    f = (kernel_size + 1) // 2
    center = f - 1 if kernel_size % 2 == 1 else f - 0.5
    k = torch.arange(kernel_size, dtype=torch.float64)
    return (1 - (k - center).abs() / f).to(dtype)


def bilinear_kernel(channels: int, factor: int, dtype: torch.dtype = torch.float32, *, diagonal: bool = False) -> torch.Tensor:
    """The bilinear deconvolution weight for ``conv_transpose2d``.

    ``diagonal=False``: depthwise, shape (C, 1, K, K), for ``groups=C``.
    ``diagonal=True``: shape (C, C, K, K), bilinear on the diagonal and zero elsewhere (Caffe's learnable form).
    """
    size = deconv_kernel_size(factor)
    filt = bilinear_filler_1d(size)
    kernel2d = (filt[:, None] * filt[None, :]).to(dtype)
    if not diagonal:
        return kernel2d.expand(channels, 1, size, size).contiguous()
    weight = torch.zeros(channels, channels, size, size, dtype=dtype)
    idx = torch.arange(channels)
    weight[idx, idx] = kernel2d
    return weight


@dataclass(frozen=True)
class AxisTaps:
    index: torch.Tensor
    weight: torch.Tensor
    readers: torch.Tensor


def _deconv_taps(in_size: int, out_size: int, factor: int, offset: int):
    """Output o is position p = o + offset of the full transposed convolution, which reads inputs p // f (kernel
    tap p % f) and p // f - 1 (tap p % f + f) when those exist."""
    filt = bilinear_filler_1d(deconv_kernel_size(factor))
    ksize = filt.numel()
    p = torch.arange(out_size, dtype=torch.int64) + offset
    i1 = p // factor
    k1 = p - i1 * factor
    i0 = i1 - 1
    k0 = k1 + factor
    has1 = i1 < in_size
    has0 = (i0 >= 0) & (k0 < ksize)
    w1 = torch.where(has1, filt[k1.clamp(max=ksize - 1)], torch.zeros(()))
    w0 = torch.where(has0, filt[k0.clamp(max=ksize - 1)], torch.zeros(()))
    # A missing tap repeats the other position (every index stays in bounds) and the two share its weight, halved:
    # w/2 * x + w/2 * x is w * x bit for bit (halving is exact) and never multiplies x by 0. A weight-0 repeat would
    # turn an infinite input into NaN (0 * inf), where conv_transpose2d reads only the taps that exist. (Every
    # output has at least one tap.)
    i1 = torch.where(has1, i1, i0)
    i0 = torch.where(has0, i0, i1)
    lone = has0 != has1
    w = torch.where(lone, (w0 + w1) / 2, 0)
    return torch.stack([i0, i1], 1), torch.stack([torch.where(lone, w, w0), torch.where(lone, w, w1)], 1)


def _interp_taps(in_size: int, out_size: int, align_corners: bool, double: bool):
    """PyTorch's upsample_bilinear2d source index (area_pixel_compute_source_index), in its arithmetic: float32
    for float/half/bfloat16 inputs, float64 for float64. The taps are the ones PyTorch reads, weight-0 ones
    included (compute_source_index_and_lambda): the values interpolate the same, and an infinite input turns into
    NaN (0 * inf) at the same outputs. An axis whose size does not change reads its own position twice, weights 1 and
    0, as PyTorch's CPU kernel does (so inf becomes NaN there too; CUDA's upsample_bilinear2d copies such a tensor
    instead, inf included)."""
    dt = torch.float64 if double else torch.float32
    if in_size == out_size:
        o = torch.arange(out_size, dtype=torch.int64)
        return torch.stack([o, o], 1), torch.stack([torch.ones(out_size), torch.zeros(out_size)], 1).double()
    o = torch.arange(out_size, dtype=dt)
    if align_corners:
        scale = torch.tensor((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0, dtype=dt)
        src = scale * o
    else:
        scale = torch.tensor(in_size, dtype=dt) / torch.tensor(out_size, dtype=dt)
        # PyTorch's kernel (compiled with FMA contraction, as nvcc does too) rounds scale * (o + 0.5) - 0.5 once:
        # a weight of 2^-26 is not 0, which decides whether a -inf input stays -inf or becomes NaN.
        if double:
            exact = fractions.Fraction(float(scale))
            src = torch.tensor([float(exact * fractions.Fraction(2 * i + 1, 2) - fractions.Fraction(1, 2))
                                for i in range(out_size)], dtype=dt)
        else:
            # In float64 the product of a float32 scale and o + 0.5 (< 2^29) is exact: one rounding is the FMA's.
            src = (scale.double() * (o.double() + 0.5) - 0.5).float()
        src = src.clamp(min=0)
    # PyTorch floors the index with floorf, also in float64: an index a hair below an integer rounds up to it first.
    i0 = src.float().floor().to(torch.int64).clamp(max=in_size - 1)
    lam = (src - i0.to(dt)).clamp(min=0, max=1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    w = torch.stack([1 - lam, lam], 1).to(torch.float64)
    return torch.stack([i0, i1], 1), w


def _readers(index: torch.Tensor, in_size: int) -> torch.Tensor:
    """[start, stop) of the outputs that read each input. Every tap counts, weight 0 included: the gradient PyTorch's
    upsample_bilinear2d gives adds 0 * grad there too (NaN for an infinite or NaN gradient), and the deconv tables
    have no weight-0 taps (_deconv_taps)."""
    out_size = index.shape[0]
    o = torch.arange(out_size, dtype=torch.int64).repeat_interleave(2)
    flat = index.reshape(-1)
    start = torch.full((in_size,), out_size, dtype=torch.int64).scatter_reduce(0, flat, o, "amin")
    stop = torch.zeros(in_size, dtype=torch.int64).scatter_reduce(0, flat, o + 1, "amax")
    stop = torch.maximum(stop, start)  # inputs nobody reads get an empty range
    # Contiguity (monotone taps) is what lets backward kernels gather over [start, stop); check it once here.
    count = torch.zeros(in_size, dtype=torch.int64).index_add_(0, flat, torch.ones_like(o))
    assert bool((count <= 2 * (stop - start)).all()), "tap tables are not monotone"
    return torch.stack([start, stop], 1)


@functools.lru_cache(maxsize=512)
def axis_taps(mode: str, in_size: int, out_size: int, factor: int, offset: int, align_corners: bool,
              device: torch.device, double: bool, stream: int = 0) -> AxisTaps:
    """Tap tables for one axis, cached per geometry, device and CUDA stream (built on the CPU, copied once).

    Per stream because an evicted table is freed, and the caching allocator may hand its block at once to new work
    on the stream that allocated it: kernels still reading it on another stream would race. Tables used only on the
    stream that allocated them are safe (that stream runs in order)."""
    if mode == "deconv":
        index, weight = _deconv_taps(in_size, out_size, factor, offset)
    elif mode == "interp":
        index, weight = _interp_taps(in_size, out_size, align_corners, double)
    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    readers = _readers(index, in_size)
    wdtype = torch.float64 if double else torch.float32
    return AxisTaps(
        index=_to_device(index.to(torch.int32).contiguous(), device),
        weight=_to_device(weight.to(wdtype).contiguous(), device),
        readers=_to_device(readers.to(torch.int32).contiguous(), device),
    )


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A table built on the host, on ``device``. To a GPU from pinned memory without waiting: a copy from pageable
    memory makes the host wait for the device (a sync on the first call of every geometry, which also breaks CUDA
    graph capture). The caching host allocator keeps the pinned buffer until the copy has run."""
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


@dataclass(frozen=True)
class Geometry:
    """What an upsampling does along both axes: the input size, the output size and how one maps to the other."""

    mode: str
    in_hw: Tuple[int, int]
    out_hw: Tuple[int, int]
    factor: int
    offset: Tuple[int, int]
    align_corners: bool

    @classmethod
    def checked(cls, op: str, x: torch.Tensor, factor, mode, out_size, offset, align_corners) -> "Geometry":
        """The Geometry of upsampling x (..., h, w) as the public ops' arguments say, or a ValueError/TypeError
        naming ``op`` and the argument."""
        factor = check_int(op, "factor", factor, minimum=1)
        if mode not in MODES:
            raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
        # Sizes as they come: int() of a symbolic size would specialise a torch.export to the example's size.
        h, w = x.shape[-2], x.shape[-1]
        offset = check_pair(op, "offset", offset, minimum=0)
        align_corners = check_bool(op, "align_corners", align_corners)
        if mode == "deconv":
            full = (deconv_output_size(h, factor), deconv_output_size(w, factor))
            if out_size is None:
                out = (full[0] - offset[0], full[1] - offset[1])
            else:
                out = check_pair(op, "out_size", out_size, minimum=1)
            if min(out) < 1 or offset[0] + out[0] > full[0] or offset[1] + out[1] > full[1]:
                raise ValueError(
                    f"{op}: out_size {out} at offset {offset} does not fit in the deconvolution output {full} "
                    f"(input {h}x{w}, factor {factor})")
        else:
            if offset != (0, 0):
                raise ValueError(f"{op}: offset applies to mode='deconv' only (interp is F.interpolate), got {offset}")
            out = (h * factor, w * factor) if out_size is None else check_pair(op, "out_size", out_size, minimum=1)
        if mode == "deconv" and align_corners:
            raise ValueError(f"{op}: align_corners applies to mode='interp' only")
        return cls(mode, (h, w), (out[0], out[1]), factor, offset, align_corners)

    def taps(self, device: torch.device, dtype: torch.dtype) -> Tuple[AxisTaps, AxisTaps]:
        double = dtype == torch.float64
        stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
        rows = axis_taps(self.mode, self.in_hw[0], self.out_hw[0], self.factor, self.offset[0], self.align_corners,
                         device, double, stream)
        cols = axis_taps(self.mode, self.in_hw[1], self.out_hw[1], self.factor, self.offset[1], self.align_corners,
                         device, double, stream)
        return rows, cols

    def full_hw(self) -> Tuple[int, int]:
        """The uncropped output size: the whole transposed convolution (deconv) or h*f, w*f (interp)."""
        if self.mode == "deconv":
            return deconv_output_size(self.in_hw[0], self.factor), deconv_output_size(self.in_hw[1], self.factor)
        return self.in_hw[0] * self.factor, self.in_hw[1] * self.factor


def upsample_reference(x: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """The bilinear part of upsample_add in plain PyTorch: the ground truth for every backend."""
    import torch.nn.functional as F

    if geometry.mode == "interp":
        return F.interpolate(x, size=geometry.out_hw, mode="bilinear", align_corners=geometry.align_corners)
    weight = bilinear_kernel(x.shape[1], geometry.factor, dtype=x.dtype).to(x.device)
    full = F.conv_transpose2d(x, weight, stride=geometry.factor, groups=x.shape[1])
    (oy, ox), (h, w) = geometry.offset, geometry.out_hw
    return full[:, :, oy:oy + h, ox:ox + w]


def upsample_reference_backward(grad: torch.Tensor, geometry: Geometry, x_shape) -> torch.Tensor:
    """The adjoint of :func:`upsample_reference` through PyTorch's own ops (autograd is off inside custom ops):
    deconv is conv_transpose2d, whose adjoint is conv2d with the same kernel after undoing the crop; interp is
    upsample_bilinear2d, whose adjoint PyTorch provides."""
    import torch.nn.functional as F

    if geometry.mode == "interp":
        return torch.ops.aten.upsample_bilinear2d_backward(
            grad, list(geometry.out_hw), list(x_shape), geometry.align_corners, None, None)
    full_h, full_w = geometry.full_hw()
    (oy, ox), (h, w) = geometry.offset, geometry.out_hw
    full = F.pad(grad, (ox, full_w - ox - w, oy, full_h - oy - h))
    weight = bilinear_kernel(grad.shape[1], geometry.factor, dtype=grad.dtype).to(grad.device)
    return F.conv2d(full, weight, stride=geometry.factor, groups=grad.shape[1])


__all__ = [
    "AxisTaps", "Geometry", "MODES", "axis_taps", "bilinear_filler_1d", "bilinear_kernel", "deconv_kernel_size",
    "deconv_output_size", "upsample_reference", "upsample_reference_backward",
]

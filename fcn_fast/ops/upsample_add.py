"""upsample_add: bilinear upsampling (FCN's fixed deconvolution, or F.interpolate) + crop + scaled skip add, fused.

Public function, reference, validation, the backends' implementations (``KERNELS``, see _dispatch.py) and the
torch.library registrations (custom op, autograd, fake kernel) of one op live here; its kernels live in kernels/cpu,
kernels/cuda and fcn_fast/ops/triton_upsample_add.py.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from fcn_fast import _backends
from fcn_fast._validation import check_float, check_pair, check_same, check_tensor, describe
from fcn_fast.ops import _eager
from fcn_fast.ops._dispatch import Kernels, OpKernels
from fcn_fast.ops._resample import Geometry, upsample_reference, upsample_reference_backward

OP = "upsample_add"


def _validate(x, skip, geometry_args, skip_offset, skip_scale):
    """(x, skip, geometry, skip_offset, skip_scale) checked; x and skip promoted to one dtype inside autocast."""
    check_tensor(OP, "x", x, ndim=4)
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{OP}: x must have a spatial size of at least 1x1, got {describe(x)}")
    geometry = Geometry.checked(OP, x, *geometry_args)
    skip_offset = check_pair(OP, "skip_offset", skip_offset, minimum=0)
    skip_scale = check_float(OP, "skip_scale", skip_scale)
    if skip is not None:
        check_tensor(OP, "skip", skip, ndim=4)
        x, skip = _eager.autocast_promote(x, skip)
        check_same(OP, "x", x, "skip", skip)
        if skip.shape[0] != x.shape[0] or skip.shape[1] != x.shape[1]:
            raise ValueError(f"{OP}: skip must have the N and C of x, got x: {describe(x)}; skip: {describe(skip)}")
        (sy, sx), (oh, ow) = skip_offset, geometry.out_hw
        if sy + oh > skip.shape[2] or sx + ow > skip.shape[3]:
            raise ValueError(
                f"{OP}: skip of {tuple(skip.shape[2:])} is too small for an {oh}x{ow} crop at skip_offset "
                f"{skip_offset}")
    return x, skip, geometry, skip_offset, skip_scale


def upsample_add_reference(x: torch.Tensor, skip: Optional[torch.Tensor] = None, *, factor: int, mode: str = "interp",
                           out_size: Optional[Sequence[int]] = None, offset=(0, 0), skip_offset=(0, 0),
                           skip_scale: float = 1.0, align_corners: bool = False) -> torch.Tensor:
    """upsample_add in plain, differentiable PyTorch (the ground truth)."""
    x, skip, geometry, skip_offset, skip_scale = _validate(x, skip, (factor, mode, out_size, offset, align_corners),
                                                           skip_offset, skip_scale)
    return _reference_forward(x, skip, geometry, skip_offset, skip_scale)


def _reference_forward(x, skip, geometry: Geometry, skip_offset, skip_scale) -> torch.Tensor:
    out = upsample_reference(x, geometry)
    if skip is not None:
        (sy, sx), (h, w) = skip_offset, geometry.out_hw
        out = out + skip_scale * skip[:, :, sy:sy + h, sx:sx + w]
    return out.contiguous()


def _reference_backward(grad, geometry: Geometry, x_shape, skip_shape, skip_offset, skip_scale, need_x, need_skip):
    grad_x = grad_skip = None
    if need_x:
        grad_x = upsample_reference_backward(grad, geometry, x_shape).contiguous()
    if need_skip:
        (sy, sx), (h, w) = skip_offset, geometry.out_hw
        grad_skip = grad.new_zeros(skip_shape)
        grad_skip[:, :, sy:sy + h, sx:sx + w] = grad * skip_scale
    return grad_x, grad_skip


# ---- backend implementations -------------------------------------------------------------------------------------
# forward(x, skip, geometry, skip_offset, skip_scale) -> out
# backward(grad, geometry, x_shape, skip_shape, skip_offset, skip_scale, need_x, need_skip) -> (grad_x, grad_skip)

class _Reference(Kernels):
    forward = staticmethod(_reference_forward)
    backward = staticmethod(_reference_backward)


class _Native(Kernels):
    def forward(self, x, skip, geometry, skip_offset, skip_scale):
        rows, cols = geometry.taps(x.device, x.dtype)
        return self.ops._upsample_add_fwd(
            x, skip, rows.index, rows.weight, cols.index, cols.weight, skip_offset[0], skip_offset[1], skip_scale)

    def backward(self, grad, geometry, x_shape, skip_shape, skip_offset, skip_scale, need_x, need_skip):
        rows, cols = geometry.taps(grad.device, grad.dtype)
        grad_x, grad_skip = self.ops._upsample_add_bwd(
            grad, rows.index, rows.weight, rows.readers, cols.index, cols.weight, cols.readers,
            x_shape[2], x_shape[3], skip_shape[2], skip_shape[3], skip_offset[0], skip_offset[1], skip_scale,
            need_x, need_skip)
        return (grad_x if need_x else None), (grad_skip if need_skip else None)


class _Triton(Kernels):
    module = "fcn_fast.ops.triton_upsample_add"


KERNELS = OpKernels(OP, reference=_Reference, cpu=_Native, cuda=_Native, triton=_Triton)


# ---- torch.library registration ----------------------------------------------------------------------------------
# The custom ops take only tensors and plain scalars, so torch.compile sees one opaque node per call.

def _unpack(in_h, in_w, out_h, out_w, factor, mode, offset_y, offset_x, align_corners) -> Geometry:
    return Geometry(mode, (in_h, in_w), (out_h, out_w), factor, (offset_y, offset_x), align_corners)


def _upsample_add_impl(x: torch.Tensor, skip: Optional[torch.Tensor], factor: int, mode: str, out_h: int, out_w: int,
                       offset_y: int, offset_x: int, skip_y: int, skip_x: int, skip_scale: float, align_corners: bool,
                       backend: str) -> torch.Tensor:
    geometry = _unpack(x.shape[2], x.shape[3], out_h, out_w, factor, mode, offset_y, offset_x, align_corners)
    if x.numel() == 0:
        return x.new_zeros((x.shape[0], x.shape[1], out_h, out_w))
    return KERNELS[backend].forward(x, skip, geometry, (skip_y, skip_x), skip_scale)


_upsample_add_op = torch.library.custom_op("fcn_fast::upsample_add", mutates_args=())(_upsample_add_impl)


@_upsample_add_op.register_fake
def _(x, skip, factor, mode, out_h, out_w, offset_y, offset_x, skip_y, skip_x, skip_scale, align_corners, backend):
    return x.new_empty((x.shape[0], x.shape[1], out_h, out_w))


_eager.register_per_sample_vmap(_upsample_add_op)


def _upsample_add_backward_impl(grad: torch.Tensor, in_h: int, in_w: int, skip_h: int, skip_w: int, factor: int,
                                mode: str, offset_y: int, offset_x: int, skip_y: int, skip_x: int, skip_scale: float,
                                align_corners: bool, need_x: bool, need_skip: bool,
                                backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    n, c, out_h, out_w = grad.shape
    geometry = _unpack(in_h, in_w, out_h, out_w, factor, mode, offset_y, offset_x, align_corners)
    x_shape, skip_shape = (n, c, in_h, in_w), (n, c, skip_h, skip_w)
    if grad.numel() == 0:
        grad_x, grad_skip = grad.new_zeros(x_shape), grad.new_zeros(skip_shape)
    else:
        grad_x, grad_skip = KERNELS[backend].backward(grad.contiguous(), geometry, x_shape, skip_shape,
                                                      (skip_y, skip_x), skip_scale, need_x, need_skip)
    # Custom ops return tensors only: an output nobody asked for comes back empty.
    return (grad_x if need_x else grad.new_empty(0)), (grad_skip if need_skip else grad.new_empty(0))


_upsample_add_backward_op = torch.library.custom_op("fcn_fast::upsample_add_backward", mutates_args=())(
    _upsample_add_backward_impl)


@_upsample_add_backward_op.register_fake
def _(grad, in_h, in_w, skip_h, skip_w, factor, mode, offset_y, offset_x, skip_y, skip_x, skip_scale, align_corners,
      need_x, need_skip, backend):
    n, c = grad.shape[0], grad.shape[1]
    grad_x = grad.new_empty((n, c, in_h, in_w)) if need_x else grad.new_empty(0)
    grad_skip = grad.new_empty((n, c, skip_h, skip_w)) if need_skip else grad.new_empty(0)
    return grad_x, grad_skip


_eager.register_per_sample_vmap(_upsample_add_backward_op)


def _setup_context(ctx, inputs, output):
    x, skip = inputs[0], inputs[1]
    ctx.args = inputs[2:]
    ctx.in_hw = (x.shape[2], x.shape[3])
    ctx.skip_hw = (skip.shape[2], skip.shape[3]) if skip is not None else (0, 0)


def _make_backward(backward_op):
    """The backward of upsample_add through ``backward_op``: the custom op (registered autograd, what tracing sees)
    or its implementation (the eager Function, see _eager.py)."""

    def backward(ctx, grad):
        factor, mode, out_h, out_w, offset_y, offset_x, skip_y, skip_x, skip_scale, align_corners, backend = ctx.args
        need_x, need_skip = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # A skip added whole and unscaled takes the output's gradient as its own, as autograd passes it through an
        # add: no copy (a full-resolution write, half the backward's bytes). Here, not in the backward op, whose
        # outputs may not alias its inputs.
        skip_takes_grad = need_skip and skip_scale == 1.0 and (skip_y, skip_x) == (0, 0) and ctx.skip_hw == (out_h, out_w)
        grad_x = grad_skip = None
        if need_x or (need_skip and not skip_takes_grad):
            grad_x, grad_skip = backward_op(
                grad, ctx.in_hw[0], ctx.in_hw[1], ctx.skip_hw[0], ctx.skip_hw[1], factor, mode, offset_y, offset_x,
                skip_y, skip_x, skip_scale, align_corners, need_x, need_skip and not skip_takes_grad, backend)
            if torch.is_grad_enabled():  # create_graph=True
                grad_x, grad_skip = _eager.forbid_double_backward(
                    OP, ((grad_x if need_x else None), (grad_skip if need_skip and not skip_takes_grad else None)),
                    (grad,))
        if skip_takes_grad:
            grad_skip = grad  # differentiable as it is: the identity
        return (grad_x if need_x else None), (grad_skip if need_skip else None), *([None] * len(ctx.args))

    return backward


_upsample_add_op.register_autograd(_make_backward(_upsample_add_backward_op), setup_context=_setup_context)
_UpsampleAddFunction = _eager.autograd_function("_UpsampleAddFunction", _upsample_add_impl, _setup_context,
                                                _make_backward(_upsample_add_backward_impl))
_UpsampleAddTransformFunction = _eager.transform_function(
    "_UpsampleAddTransformFunction", OP, _upsample_add_op, _setup_context, _make_backward(_upsample_add_backward_op))


# ---- public API ---------------------------------------------------------------------------------------------------

def upsample_add(x: torch.Tensor, skip: Optional[torch.Tensor] = None, *, factor: int, mode: str = "interp",
                 out_size: Optional[Sequence[int]] = None, offset=(0, 0), skip_offset=(0, 0), skip_scale: float = 1.0,
                 align_corners: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """Bilinear upsampling of ``x`` plus an optional cropped, scaled skip, in one pass (forward and backward).

    Args:
        x: Tensor[N, C, h, w], float32/float64/float16/bfloat16 (accumulates in float32; float64 in float64).
        skip: optional Tensor[N, C, Hs, Ws] of x's dtype (inside autocast: any float dtype, both promoted to the
            wider) and device, added as
            ``skip_scale * skip[:, :, sy:sy+H, sx:sx+W]`` with ``(sy, sx) = skip_offset``.
        factor: integer upsampling factor >= 1.
        mode: ``"deconv"``: FCN's fixed bilinear deconvolution, exactly
            ``F.conv_transpose2d(x, k, stride=factor, groups=C)`` with the Caffe bilinear kernel of size
            ``2*factor - factor % 2``, then cropped to ``out_size`` starting at ``offset`` (default: the rest of the
            full output). ``"interp"``: exactly ``F.interpolate(x, size=out_size or (h*factor, w*factor),
            mode="bilinear", align_corners=align_corners)``; ``offset`` must be (0, 0).
        out_size: (H, W) of the result.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None (see ``fcn_fast.use_backend``).

    Returns:
        Tensor[N, C, H, W], contiguous, of x's dtype. Gradients flow to x and skip (backward is a deterministic
        gather; torch.func.grad and vmap work; not twice differentiable, see docs/backends.md).
    """
    x, skip, geometry, skip_offset, skip_scale = _validate(x, skip, (factor, mode, out_size, offset, align_corners),
                                                           skip_offset, skip_scale)
    name = _backends.resolve_backend(backend, x.device, OP)
    run = _eager.runner(_UpsampleAddFunction.apply, _UpsampleAddTransformFunction.apply, _upsample_add_op, x, skip)
    return run(
        x, skip, geometry.factor, geometry.mode, geometry.out_hw[0], geometry.out_hw[1], geometry.offset[0],
        geometry.offset[1], skip_offset[0], skip_offset[1], skip_scale, geometry.align_corners, name)


class UpsampleAdd(torch.nn.Module):
    """Module form of :func:`upsample_add` with the geometry fixed at construction: ``forward(x, skip=None)``."""

    def __init__(self, factor: int, mode: str = "interp", out_size: Optional[Sequence[int]] = None, offset=(0, 0),
                 skip_offset=(0, 0), skip_scale: float = 1.0, align_corners: bool = False,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        self.factor, self.mode, self.out_size, self.offset = factor, mode, out_size, offset
        self.skip_offset, self.skip_scale, self.align_corners, self.backend = skip_offset, skip_scale, align_corners, backend

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None, out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        return upsample_add(x, skip, factor=self.factor, mode=self.mode, out_size=out_size or self.out_size,
                            offset=self.offset, skip_offset=self.skip_offset, skip_scale=self.skip_scale,
                            align_corners=self.align_corners, backend=self.backend)

    def extra_repr(self) -> str:
        parts = [f"factor={self.factor}", f"mode={self.mode!r}"]
        if self.out_size is not None:
            parts.append(f"out_size={tuple(self.out_size)}")
        if tuple(self.offset) != (0, 0):
            parts.append(f"offset={tuple(self.offset)}")
        if tuple(self.skip_offset) != (0, 0):
            parts.append(f"skip_offset={tuple(self.skip_offset)}")
        if self.skip_scale != 1.0:
            parts.append(f"skip_scale={self.skip_scale}")
        if self.align_corners:
            parts.append("align_corners=True")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)

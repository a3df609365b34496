"""Deployable exports of models that call the fused ops: ``torch.export`` programs with dynamic height and width
(saved as ``.pt2``) and ONNX files that run in onnxruntime.

    program = fcn_fast.export.export_program(model, example)          # torch.export, N/H/W dynamic
    fcn_fast.export.save_pt2(model, example, "model.pt2")              # ... saved; load_pt2 reads it back
    fcn_fast.export.export_onnx(model, example, "model.onnx")          # ONNX, N/H/W dynamic

The fused ops are ``torch.library`` custom ops (``fcn_fast::<op>``), which torch.export keeps as one node each and
a loaded ``.pt2`` runs through fcn_fast's kernels (import fcn_fast before loading it). ONNX has no such ops: each
gets a translation into standard operators here (:func:`onnx_translation_table`), which ``torch.onnx.export``
applies through ``custom_translation_table``:

  upsample_add            interp: Resize (linear, pytorch_half_pixel or align_corners); deconv: ConvTranspose with
                          the Caffe bilinear kernel (channels folded into the batch) + Slice; skip: Slice, Mul, Add
  upsample_argmax         the upsampling above + ArgMax over classes (first maximum, as torch.argmax) + Cast
  softmax_cross_entropy   LogSoftmax-based: ReduceLogSumExp, GatherElements of the target class, class weights
                          (Gather), label smoothing, ignore_index (Where), the "mean" denominator, in float32
  upsample_cross_entropy  the upsampling above, then the same cross-entropy

The ONNX graph computes what the op computes, not how (the full-resolution logits exist there); label range checks
(``check_targets``) are not part of it. See docs/export.md.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from fcn_fast._requirements import release
from fcn_fast.ops._resample import bilinear_filler_1d, deconv_kernel_size
from fcn_fast.ops.cross_entropy import KERNELS as CE_KERNELS

FORMATS = ("pt2", "onnx")


# ---- torch.export ----------------------------------------------------------------------------------------------

def dynamic_shapes(example: torch.Tensor, batch: bool = True):
    """Height and width (and the batch, unless ``batch=False``) of a model's one image input as dynamic dimensions.

    ``Dim.DYNAMIC`` rather than named ``Dim``s with bounds: a network adds guards such as "the stride-32 map is not
    1 pixel" (PyTorch specialises sizes of 0 and 1); these become run-time checks of the program instead of export
    errors."""
    from torch.export import Dim

    dims = {2: Dim.DYNAMIC, 3: Dim.DYNAMIC}
    if batch:
        dims[0] = Dim.DYNAMIC
    return ({k: dims[k] for k in sorted(dims)},)


# torch before 2.13 computes a pooling layer's output size through a branch on the parity of its input (div_rtn in
# the meta registration), so torch.export records that parity as a guard for every pooling layer.
POOLING_PARITY_GUARDS = release(torch.__version__) < (2, 13)


def _warn_of_pooling_guards(program: Optional["torch.export.ExportedProgram"]) -> None:
    """On a torch whose exports guard on pooling parity: a warning, where ``program`` pools, that it takes fewer
    sizes than asked. The graph is asked rather than the model, which may pool through torch.nn.functional."""
    if not POOLING_PARITY_GUARDS or program is None:
        return
    if any(n.op == "call_function" and "pool" in str(n.target) for n in program.graph.nodes):
        warnings.warn(
            f"torch {torch.__version__} exports pooling layers with a guard on the parity of their input, so the "
            "exported program takes only heights and widths that give every pooling input the parity the example's "
            "gives it (for the FCN models: sizes congruent to the example's modulo 32) and fails with 'Guard failed' "
            "on others; torch >= 2.13 exports any size", stacklevel=3)


def export_program(model: nn.Module, example: torch.Tensor, *, dynamic: bool = True) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of ``model(example)`` (eval mode is the caller's choice), with dynamic N, H and W
    unless ``dynamic=False`` (on torch < 2.13 the sizes keep the example's parities: see POOLING_PARITY_GUARDS)."""
    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes(example) if dynamic else None)
    if dynamic:
        _warn_of_pooling_guards(program)
    return program


def save_pt2(model: nn.Module, example: torch.Tensor, path: str, *, dynamic: bool = True) -> str:
    """Export and save as a ``.pt2`` archive (``torch.export.save``); returns the path."""
    torch.export.save(export_program(model, example, dynamic=dynamic), path)
    return path


def load_pt2(path: str) -> "torch.export.ExportedProgram":
    """A saved program (``.module()`` is callable). The fused ops resolve to fcn_fast's kernels: importing this
    module has imported fcn_fast, which registers them."""
    return torch.export.load(path)


# ---- ONNX translations ---------------------------------------------------------------------------------------

def _ops():
    from onnxscript import opset18

    return opset18


def _int64_1d(op, value):
    """A (1,) int64 tensor from a Python int or a symbolic size (a 0-d int64 value in the graph)."""
    if isinstance(value, int):
        return op.Constant(value_ints=[value])
    return op.Reshape(op.Cast(value, to=7), op.Constant(value_ints=[1]))  # 7: INT64


def _is_double(x) -> bool:
    import onnx_ir as ir

    return x.dtype == ir.DataType.DOUBLE


def _upsample(op, x, factor: int, mode: str, out_hw, offset: Tuple[int, int], align_corners: bool):
    """Bilinear upsampling of x (N, C, h, w) to ``out_hw`` (a (2,) int64 value): what
    fcn_fast.ops._resample.upsample_reference computes."""
    if mode == "interp":
        sizes = op.Concat(op.Shape(x, start=0, end=2), out_hw, axis=0)
        transform = "align_corners" if align_corners else "pytorch_half_pixel"
        return op.Resize(x, None, None, sizes, mode="linear", coordinate_transformation_mode=transform)
    # The depthwise transposed convolution with the Caffe filter: one kernel for every channel, so the channels go
    # into the batch (no weight of C copies to embed, and C may be anything).
    size = deconv_kernel_size(factor)
    filt = bilinear_filler_1d(size, torch.float64)
    kernel = (filt[:, None] * filt[None, :]).reshape(1, 1, size, size)
    weight = op.CastLike(op.Constant(value_floats=kernel.flatten().tolist()), x)
    weight = op.Reshape(weight, op.Constant(value_ints=[1, 1, size, size]))
    planes = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1, 1]), op.Shape(x, start=2, end=4), axis=0))
    full = op.ConvTranspose(planes, weight, strides=[factor, factor])
    full = op.Reshape(full, op.Concat(op.Shape(x, start=0, end=2), op.Shape(full, start=2, end=4), axis=0))
    starts = op.Constant(value_ints=list(offset))
    return op.Slice(full, starts, op.Add(starts, out_hw), op.Constant(value_ints=[2, 3]))


def _upsample_add(x, skip, factor, mode, out_h, out_w, offset_y, offset_x, skip_y, skip_x, skip_scale, align_corners,
                  backend):
    op = _ops()
    out_hw = op.Concat(_int64_1d(op, out_h), _int64_1d(op, out_w), axis=0)
    out = _upsample(op, x, factor, mode, out_hw, (offset_y, offset_x), align_corners)
    if skip is None:
        return out
    starts = op.Constant(value_ints=[skip_y, skip_x])
    cropped = op.Slice(skip, starts, op.Add(starts, out_hw), op.Constant(value_ints=[2, 3]))
    if skip_scale != 1.0:
        cropped = op.Mul(cropped, op.CastLike(op.Constant(value_float=float(skip_scale)), cropped))
    return op.Add(out, cropped)


def _label_dtype(dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return 2 if dtype == torch.uint8 else 7  # UINT8, INT64
    return int(dtype)  # the exporter hands scalar types over as onnx_ir DataTypes, whose values are ONNX's


def _upsample_argmax(coarse, factor, mode, out_h, out_w, offset_y, offset_x, align_corners, dtype, backend):
    op = _ops()
    out_hw = op.Concat(_int64_1d(op, out_h), _int64_1d(op, out_w), axis=0)
    labels = op.ArgMax(_upsample(op, coarse, factor, mode, out_hw, (offset_y, offset_x), align_corners), axis=1,
                       keepdims=0, select_last_index=0)
    return labels if _label_dtype(dtype) == 7 else op.Cast(labels, to=_label_dtype(dtype))


def _cross_entropy(op, logits, target, weight, ignore_index: int, reduction: str, label_smoothing: float):
    """F.cross_entropy of logits (N, C, S) and target (N, S) in the accumulate dtype: (per-pixel loss (N, S) or the
    reduced loss, the softmax statistics (2, N, S) the kernels save for backward, the "mean" denominator)."""
    acc = 11 if _is_double(logits) else 1  # DOUBLE or FLOAT
    z = op.Cast(logits, to=acc)
    lse = op.ReduceLogSumExp(z, op.Constant(value_ints=[1]), keepdims=0)
    # Only its shape matters to an inference graph (nothing runs backward), but it is the op's declared output.
    zmax = op.ReduceMax(z, op.Constant(value_ints=[1]), keepdims=0)
    stats = op.Concat(op.Unsqueeze(zmax, op.Constant(value_ints=[0])),
                      op.Unsqueeze(op.Sub(lse, zmax), op.Constant(value_ints=[0])), axis=0)
    logp = op.Sub(z, op.Unsqueeze(lse, op.Constant(value_ints=[1])))
    labels = op.Cast(target, to=7)
    num_classes = op.Gather(op.Shape(z), op.Constant(value_int=1))
    zero = op.Constant(value_int=0)
    valid = op.And(op.And(op.Not(op.Equal(labels, op.Constant(value_int=int(ignore_index)))),
                          op.GreaterOrEqual(labels, zero)), op.Less(labels, num_classes))
    safe = op.Where(valid, labels, zero)
    picked = op.Squeeze(op.GatherElements(logp, op.Unsqueeze(safe, op.Constant(value_ints=[1])), axis=1),
                        op.Constant(value_ints=[1]))
    zero_acc = op.Cast(zero, to=acc)
    class_weight = None if weight is None else op.Cast(weight, to=acc)
    w_t = op.Cast(valid, to=acc) if class_weight is None else op.Where(valid, op.Gather(class_weight, safe), zero_acc)
    loss = op.Neg(op.Mul(picked, w_t))
    if label_smoothing > 0:
        eps = label_smoothing
        weighted = logp if class_weight is None else op.Mul(
            logp, op.Reshape(class_weight, op.Constant(value_ints=[1, -1, 1])))
        smooth = op.Neg(op.ReduceSum(weighted, op.Constant(value_ints=[1]), keepdims=0))
        smooth = op.Where(valid, smooth, zero_acc)
        loss = op.Add(op.Mul(loss, op.Cast(op.Constant(value_float=1 - eps), to=acc)),
                      op.Div(op.Mul(smooth, op.Cast(op.Constant(value_float=eps), to=acc)),
                             op.Cast(num_classes, to=acc)))
    denom = op.ReduceSum(w_t, keepdims=0)
    if reduction == "sum":
        loss = op.ReduceSum(loss, keepdims=0)
    elif reduction == "mean":
        loss = op.Div(op.ReduceSum(loss, keepdims=0), denom)
    return loss, stats, denom


def _flat(op, x, keep: int):
    """x reshaped to its first ``keep`` dimensions and one more of everything else."""
    return op.Reshape(x, op.Concat(op.Shape(x, start=0, end=keep), op.Constant(value_ints=[-1]), axis=0))


def _softmax_cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, check_targets, need_grad,
                           backend):
    op = _ops()
    flat_logits = _flat(op, logits, 2) if len(logits.shape) != 2 else op.Unsqueeze(logits, op.Constant(value_ints=[2]))
    flat_target = _flat(op, target, 1)
    loss, stats, denom = _cross_entropy(op, flat_logits, flat_target, weight, ignore_index, reduction,
                                        label_smoothing)
    if reduction == "none":
        loss = op.Reshape(loss, op.Shape(target))
    elif CE_KERNELS[backend].gradient_in_forward:
        # A reduced loss on such a backend saves no statistics (its backward runs the forward kernel again).
        stats = op.CastLike(op.ConstantOfShape(op.Constant(value_ints=[0])), denom)
    # The fourth output, a training step's gradient from the CPU forward, is empty wherever nothing trains.
    empty = op.CastLike(op.ConstantOfShape(op.Constant(value_ints=[0])), logits)
    return op.CastLike(loss, logits), stats, denom, empty


def _upsample_cross_entropy(coarse, target, weight, factor, mode, offset_y, offset_x, align_corners, ignore_index,
                            reduction, label_smoothing, check_targets, backend):
    op = _ops()
    out_hw = op.Shape(target, start=1, end=3)
    logits = _upsample(op, coarse, factor, mode, out_hw, (offset_y, offset_x), align_corners)
    loss, stats, denom = _cross_entropy(op, _flat(op, logits, 2), _flat(op, target, 1), weight, ignore_index,
                                        reduction, label_smoothing)
    if reduction == "none":
        loss = op.Reshape(loss, op.Shape(target))
    stats_shape = op.Concat(op.Constant(value_ints=[2]), op.Shape(target), axis=0)
    return op.CastLike(loss, coarse), op.Reshape(stats, stats_shape), denom


def onnx_translation_table() -> Dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: every fused op's forward in standard ONNX
    operators (needs onnxscript)."""
    import fcn_fast  # noqa: F401  (registers the ops)

    ops = torch.ops.fcn_fast
    return {
        ops.upsample_add.default: _upsample_add,
        ops.upsample_argmax.default: _upsample_argmax,
        ops.softmax_cross_entropy.default: _softmax_cross_entropy,
        ops.upsample_cross_entropy.default: _upsample_cross_entropy,
    }


def _output_names(model: nn.Module, example: torch.Tensor):
    """Names for the flattened outputs: a dict's keys (torchvision's "out", "aux"), else "output", "output1", ..."""
    with torch.no_grad():
        out = model(example)
    if isinstance(out, dict):
        return [str(k) for k in out]
    count = len(out) if isinstance(out, (tuple, list)) else 1
    return ["output"] + [f"output{i}" for i in range(1, count)]


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, *, dynamic: bool = True,
                input_name: str = "image", output_names: Optional[Sequence[str]] = None,
                opset_version: Optional[int] = None) -> str:
    """``torch.onnx.export(dynamo=True)`` of ``model(example)`` with the fused ops translated, N/H/W dynamic unless
    ``dynamic=False``; weights inside the file; the input named ``input_name``, the outputs ``output_names`` (by
    default a dict output's keys). Returns the path."""
    program = torch.onnx.export(
        model, (example,), dynamo=True, dynamic_shapes=dynamic_shapes(example) if dynamic else None,
        custom_translation_table=onnx_translation_table(), input_names=[input_name],
        output_names=list(output_names or _output_names(model, example)), opset_version=opset_version,
        external_data=False, verbose=False)
    if dynamic:
        _warn_of_pooling_guards(program.exported_program)
    program.save(path)
    return path


def onnx_session(path: str):
    """An onnxruntime CPU session for a saved file."""
    import onnxruntime

    return onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])


# ---- fcn-fast export ---------------------------------------------------------------------------------------------

OUTPUTS = ("logits", "labels")
CHECK_TOLERANCE = 1e-4


class Labels(nn.Module):
    """A model's labels as its output, (N, H, W) int64: through ``fcn_fast.upsample_argmax`` on the fused path
    (``model.coarse(x).argmax()``), ``argmax(1)`` of the logits otherwise."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.model, "fused", False):
            return self.model.coarse(x).argmax()
        return self.model(x).argmax(1)


def _run_artifact(fmt: str, path: str):
    """A callable running the saved file on a tensor, returning a tensor."""
    if fmt == "pt2":
        module = load_pt2(path).module()
        return lambda x: module(x)
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def check_artifact(fmt: str, path: str, model: nn.Module, sizes: Sequence[Tuple[int, int]], batch: int = 1,
                   channels: int = 3) -> Dict[Tuple[int, int], float]:
    """Run the saved file and the eager model on random images of each size: per size, the largest difference
    relative to the largest logit (at least 1), or for labels the fraction of pixels that differ."""
    run = _run_artifact(fmt, path)
    gen = torch.Generator().manual_seed(0)
    errors = {}
    with torch.no_grad():
        for size in sizes:
            x = torch.randn(batch, channels, *size, generator=gen)
            expected, actual = model(x), run(x)
            if expected.is_floating_point():
                scale = max(1.0, float(expected.abs().max()))
                errors[tuple(size)] = float((actual.double() - expected.double()).abs().max()) / scale
            else:
                errors[tuple(size)] = float((actual != expected).double().mean())
    return errors


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="checkpoint written by fcn-fast train")
    p.add_argument("--format", choices=FORMATS, required=True,
                   help="pt2 (torch.export archive, run with fcn_fast installed) or onnx (standard operators)")
    p.add_argument("--out", help="output file (default: the checkpoint's path with .pt2 / .onnx)")
    p.add_argument("--output", choices=OUTPUTS, default="logits",
                   help="what the exported model returns: logits (N, C, H, W) or labels (N, H, W) (default: logits)")
    p.add_argument("--path", choices=("fused", "reference"), default="fused",
                   help="fused ops or the plain PyTorch head (default: fused)")
    p.add_argument("--size", type=int, nargs=2, default=[96, 128], metavar=("H", "W"),
                   help="example image size to trace with (default: 96 128); the export takes any size")
    p.add_argument("--static", action="store_true", help="fix N, H and W to the example's instead of dynamic")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip running the file against the eager model on three image sizes")


def main(args) -> str:
    from fcn_fast.checkpoint import model_from_checkpoint
    from fcn_fast.errors import UserError

    model, ckpt = model_from_checkpoint(args.checkpoint, override={"fused": args.path == "fused"})
    if args.output == "labels":
        model = Labels(model).eval()
    out = args.out or os.path.splitext(args.checkpoint)[0] + "." + args.format
    h, w = args.size
    if min(h, w) < 1:
        raise UserError(f"--size must be positive, got {h} {w}")
    example = torch.randn(2, 3, h, w)
    try:
        if args.format == "pt2":
            save_pt2(model, example, out, dynamic=not args.static)
        else:
            try:
                import onnxruntime  # noqa: F401
                import onnxscript  # noqa: F401
            except ImportError as exc:
                raise UserError(f"--format onnx needs onnx, onnxscript and onnxruntime ({exc}): "
                                f"pip install 'fcn_fast[onnx]'") from None
            export_onnx(model, example, out, dynamic=not args.static, output_names=[args.output])
    except UserError:
        raise
    except Exception as exc:  # torch.export / ONNX failures: name the model and the cause in one line
        raise UserError(f"exporting {ckpt['model']['name']} to {args.format} failed: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    line = f"{ckpt['model']['name']}: wrote {out} ({args.format}, {args.output}, " \
           f"{'static ' + str(h) + 'x' + str(w) if args.static else 'dynamic N, H, W'})"
    if args.check:
        sizes = [(h, w)] if args.static else [(h, w), (h + 17, w - 9), (2 * h + 1, w + 31)]
        errors = check_artifact(args.format, out, model, sizes, batch=2 if args.static else 1)
        shown = ", ".join(f"{a}x{b}: {e:.2g}" for (a, b), e in errors.items())
        shown += "; " + ("label mismatch fraction" if args.output == "labels" else "relative difference")
        # Float rounding of another implementation (onnxruntime's Resize, ConvTranspose) and the near-ties of
        # labels it can flip; a wrong geometry differs by orders of magnitude more.
        if max(errors.values()) > CHECK_TOLERANCE:
            raise UserError(f"{out} differs from the eager model ({shown})")
        line += f"; checked against eager ({shown})"
    print(line)
    return out


__all__ = ["CHECK_TOLERANCE", "FORMATS", "Labels", "OUTPUTS", "add_arguments", "check_artifact", "dynamic_shapes",
           "export_onnx", "export_program", "load_pt2", "main", "onnx_session", "onnx_translation_table", "save_pt2"]

"""Exports that deploy: torch.export with dynamic N/H/W (saved and loaded as .pt2) of fcn_fast's models and of
fuse()d torchvision/smp models, ONNX translations of every fused op checked in onnxruntime against PyTorch on
several sizes, and ``fcn-fast export``."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.export import Dim

from harness import peer

import fcn_fast
from fcn_fast import models
from fcn_fast.checkpoint import FORMAT, model_spec, save_atomic
from fcn_fast.cli import main
from fcn_fast.export import (POOLING_PARITY_GUARDS, Labels, export_onnx, export_program, load_pt2, onnx_session,
                             onnx_translation_table, save_pt2)



@pytest.fixture
def onnx_peers():
    """The ONNX tests need onnx, onnxscript and onnxruntime (the test extra installs them); the .pt2 tests do not."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        peer(module)


def _model(name: str, **options) -> nn.Module:
    torch.manual_seed(0)
    model = models.build(name, num_classes=5, **options)
    # The scorers start at zero (as in the paper): every output would be trivially equal.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not bool(p.any()):
                p.normal_(0, 0.1)
    return model.eval()


def _images(size, n=1, seed=0):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


MODELS = [  # (name, build options, sizes: the example's first)
    pytest.param("fcn8s", dict(width=1 / 16), id="fcn8s-caffe"),
    pytest.param("fcn8s_resnet50", dict(width=1 / 8), id="fcn8s_resnet50"),
    pytest.param("fcn8s", dict(width=1 / 16, geometry="same"), id="fcn8s-same", marks=pytest.mark.slow),
    pytest.param("fcn32s", dict(width=1 / 16), id="fcn32s-caffe", marks=pytest.mark.slow),
    pytest.param("fcn16s", dict(width=1 / 16), id="fcn16s-caffe", marks=pytest.mark.slow),
    pytest.param("fcn8s_atonce", dict(width=1 / 16), id="fcn8s_atonce", marks=pytest.mark.slow),
]
# Where an export keeps every pooling input's parity (torch < 2.13), the sizes are congruent to the example's modulo 32;
# test_pooling_parity_guards checks both sides of that.
SIZES = [(64, 80), (96, 112), (128, 48)] if POOLING_PARITY_GUARDS else [(64, 80), (97, 51), (130, 128)]


# ---- torch.export ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, options", MODELS)
def test_fcn_fast_model_pt2_dynamic(name, options, tmp_path):
    model = _model(name, **options)
    path = save_pt2(model, _images(SIZES[0], n=2), str(tmp_path / "model.pt2"))
    program = load_pt2(path)
    # The fused ops stay one node each, and the image size is symbolic, not the example's.
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "fcn_fast.upsample_add.default" in targets
    image = next(n for n in program.graph.nodes if n.name == program.graph_signature.user_inputs[0])
    assert all(isinstance(d, torch.SymInt) for d in image.meta["val"].shape[2:])
    run = program.module()
    with torch.no_grad():
        for i, size in enumerate(SIZES):
            x = _images(size, n=1 + i % 2, seed=i)
            assert torch.equal(run(x), model(x)), size


def test_fcn_fast_labels_pt2_dynamic(tmp_path):
    model = _model("fcn8s", width=1 / 16)
    labels = Labels(model).eval()
    program = load_pt2(save_pt2(labels, _images(SIZES[0], n=2), str(tmp_path / "labels.pt2")))
    assert any(str(n.target) == "fcn_fast.upsample_argmax.default" for n in program.graph.nodes)
    with torch.no_grad():
        for size in SIZES:
            x = _images(size)
            assert torch.equal(program.module()(x), model.predict(x))


def test_named_dynamic_dims_stay_symbolic():
    """The public ops read sizes without int(): an export with named dynamic dims keeps H and W symbolic (torch's
    own pooling does not before 2.13)."""
    model = _model("fcn8s_resnet50", width=1 / 8)
    dims = {"x": {2: Dim("h", min=64, max=2048), 3: Dim("w", min=64, max=2048)}}
    if POOLING_PARITY_GUARDS:
        with pytest.raises(Exception, match=r"Constraints violated \(h, w\)(.|\n)*% 2"):
            torch.export.export(model, (_images((64, 80)),), dynamic_shapes=dims)
        return
    program = torch.export.export(model, (_images((64, 80)),), dynamic_shapes=dims)
    assert {str(v) for v in program.range_constraints.values()} == {"VR[64, 2048]"}


@pytest.mark.parametrize("name, options", MODELS[:2])
def test_pooling_parity_guards(name, options):
    """A dynamic export takes an image of another parity on torch >= 2.13; before it, it warns that it will not, and
    the program refuses one with torch's guard message rather than computing something else."""
    model = _model(name, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = export_program(model, _images((64, 80), n=2)).module()
    assert sum("parity" in str(w.message) for w in caught) == int(POOLING_PARITY_GUARDS)
    odd = _images((65, 81))
    with torch.no_grad():
        if POOLING_PARITY_GUARDS:
            with pytest.raises(AssertionError, match="Guard failed"):
                run(odd)
        else:
            assert torch.equal(run(odd), model(odd))


def test_fused_torchvision_and_smp_pt2(tmp_path):
    segmentation = peer("torchvision.models.segmentation")
    smp = peer("segmentation_models_pytorch")
    from fcn_fast.integrations import fuse

    torch.manual_seed(0)
    cases = [  # (original, what the fused model returns in eval mode, sizes: the example's first)
        (segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5), "logits",
         [(64, 80), (97, 51)]),
        (smp.FPN(encoder_name="resnet18", encoder_weights=None, classes=5), "labels", [(64, 96), (128, 64)]),
    ]
    for i, (original, eval_output, sizes) in enumerate(cases):
        original.eval()
        fused = fuse(original, eval_output=eval_output).eval()
        program = load_pt2(save_pt2(fused, _images(sizes[0], n=2), str(tmp_path / f"{i}.pt2")))
        with torch.no_grad():
            for size in sizes:
                x = _images(size, seed=1)
                expected, actual = original(x), program.module()(x)
                expected = expected["out"] if isinstance(expected, dict) else expected
                if eval_output == "labels":
                    assert torch.equal(actual, expected.argmax(1))
                else:
                    torch.testing.assert_close(actual["out"], expected, rtol=1e-5, atol=1e-5)


# ---- ONNX: each op's translation -----------------------------------------------------------------------------

class _Op(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, a, b):
        return self.fn(a, b)


D = Dim.DYNAMIC
_WEIGHT = torch.rand(5, generator=torch.Generator().manual_seed(5)) + 0.5


def _targets(n, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 5, (n, h, w), generator=gen)
    t[torch.rand((n, h, w), generator=gen) < 0.1] = 255
    return t


OPS = [  # (id, fn(a, b), inputs per size: the first traces)
    ("upsample_add-interp-skip",
     lambda x, s: fcn_fast.upsample_add(x, s, factor=2, mode="interp", out_size=s.shape[-2:]),
     [lambda g: (torch.randn(2, 3, 5, 7, generator=g), torch.randn(2, 3, 10, 13, generator=g)),
      lambda g: (torch.randn(2, 3, 9, 4, generator=g), torch.randn(2, 3, 17, 9, generator=g))]),
    ("upsample_add-interp-align_corners",
     lambda x, t: fcn_fast.upsample_add(x, factor=4, mode="interp", out_size=t.shape[-2:], align_corners=True),
     [lambda g: (torch.randn(2, 3, 5, 7, generator=g), torch.zeros(2, 20, 27)),
      lambda g: (torch.randn(2, 3, 9, 4, generator=g), torch.zeros(2, 33, 16))]),
    ("upsample_add-deconv-cropped-skip",
     lambda x, s: fcn_fast.upsample_add(x, s, factor=2, mode="deconv", skip_offset=(5, 5), skip_scale=0.01),
     [lambda g: (torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 44, 44, generator=g)),
      lambda g: (torch.randn(1, 4, 10, 12, generator=g), torch.randn(1, 4, 31, 40, generator=g))]),
    ("upsample_add-deconv-x8-offset",
     lambda x, t: fcn_fast.upsample_add(x, factor=8, mode="deconv", offset=(31, 31), out_size=t.shape[-2:]),
     [lambda g: (torch.randn(1, 4, 12, 12, generator=g), torch.zeros(1, 60, 61)),
      lambda g: (torch.randn(1, 4, 9, 14, generator=g), torch.zeros(1, 30, 70))]),
    ("upsample_argmax-uint8",
     lambda x, t: fcn_fast.upsample_argmax(x, factor=8, mode="deconv", offset=(4, 4), out_size=t.shape[-2:],
                                           dtype=torch.uint8),
     [lambda g: (torch.randn(1, 4, 12, 12, generator=g), torch.zeros(1, 90, 91)),
      lambda g: (torch.randn(1, 4, 9, 14, generator=g), torch.zeros(1, 64, 100))]),
    ("upsample_argmax-interp",
     lambda x, t: fcn_fast.upsample_argmax(x, factor=8, mode="interp", out_size=t.shape[-2:]),
     [lambda g: (torch.randn(2, 5, 6, 7, generator=g), torch.zeros(2, 45, 51)),
      lambda g: (torch.randn(2, 5, 3, 9, generator=g), torch.zeros(2, 20, 70))]),
    ("softmax_cross_entropy-weight-smoothing",
     lambda x, t: fcn_fast.softmax_cross_entropy(x, t, weight=_WEIGHT, label_smoothing=0.1),
     [lambda g: (torch.randn(2, 5, 6, 7, generator=g), _targets(2, 6, 7, 1)),
      lambda g: (torch.randn(2, 5, 3, 9, generator=g), _targets(2, 3, 9, 2))]),
    ("softmax_cross_entropy-none-ignore",
     lambda x, t: fcn_fast.softmax_cross_entropy(x, t, ignore_index=3, reduction="none"),
     [lambda g: (torch.randn(2, 5, 6, 7, generator=g), _targets(2, 6, 7, 3) % 5),
      lambda g: (torch.randn(2, 5, 3, 9, generator=g), _targets(2, 3, 9, 4) % 5)]),
    ("upsample_cross_entropy-interp-sum",
     lambda x, t: fcn_fast.upsample_cross_entropy(x, t, factor=8, mode="interp", reduction="sum"),
     [lambda g: (torch.randn(2, 5, 6, 7, generator=g), _targets(2, 45, 51, 5)),
      lambda g: (torch.randn(2, 5, 3, 9, generator=g), _targets(2, 20, 70, 6))]),
    ("upsample_cross_entropy-deconv-mean-weight",
     lambda x, t: fcn_fast.upsample_cross_entropy(x, t, factor=8, offset=(31, 31), weight=_WEIGHT,
                                                  label_smoothing=0.05),
     [lambda g: (torch.randn(1, 5, 12, 12, generator=g), _targets(1, 60, 61, 7)),
      lambda g: (torch.randn(1, 5, 9, 14, generator=g), _targets(1, 30, 70, 8))]),
]


@pytest.mark.parametrize("fn, inputs", [pytest.param(fn, inputs, id=name) for name, fn, inputs in OPS])
def test_onnx_translation_of_each_op(fn, inputs, tmp_path, onnx_peers):
    gen = torch.Generator().manual_seed(0)
    example = inputs[0](gen)
    dims = tuple({i: D for i in range(1, t.dim()) if i != 1 or t.dim() == 3} for t in example)
    path = str(tmp_path / "op.onnx")
    program = torch.onnx.export(_Op(fn).eval(), example, dynamo=True, dynamic_shapes=dims,
                                custom_translation_table=onnx_translation_table(), verbose=False)
    program.save(path)
    # Only standard operators: no fcn_fast domain left in the file.
    assert all(node.domain in ("", "ai.onnx") for node in program.model_proto.graph.node)
    session = onnx_session(path)
    names = [i.name for i in session.get_inputs()]
    for make in inputs:
        args = make(gen)
        expected = fn(*args)
        feeds = {name: a.numpy() for name, a in zip(names, args)}
        actual = torch.from_numpy(np.asarray(session.run(None, feeds)[0]))
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        if expected.is_floating_point():
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(actual, expected)


# ---- ONNX: models ------------------------------------------------------------------------------------------------

def _onnx_matches(session, model, sizes, labels=False):
    with torch.no_grad():
        for i, size in enumerate(sizes):
            x = _images(size, n=1 + i % 2, seed=i)
            expected = model(x)
            expected = expected["out"] if isinstance(expected, dict) else expected
            actual = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
            if labels:
                # onnxruntime's Resize rounds differently from the fused kernels: near-ties may flip a label.
                assert (actual != expected).double().mean() < 1e-3, size
            else:
                torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("name, options", [
    pytest.param(*p.values, id=p.id, marks=p.marks or ([pytest.mark.slow] if p.id == "fcn8s_resnet50" else []))
    for p in MODELS])
def test_fcn_fast_model_onnx_dynamic(name, options, tmp_path, onnx_peers):
    model = _model(name, **options)
    path = export_onnx(model, _images(SIZES[0], n=2), str(tmp_path / "model.onnx"))
    session = onnx_session(path)
    assert [o.name for o in session.get_outputs()] == ["output"]
    assert [d if isinstance(d, int) else "sym" for d in session.get_inputs()[0].shape] == ["sym", 3, "sym", "sym"]
    _onnx_matches(session, model, SIZES)


def test_fused_torchvision_onnx_dynamic(tmp_path, onnx_peers):
    segmentation = peer("torchvision.models.segmentation")
    from fcn_fast.integrations import fuse

    torch.manual_seed(0)
    original = segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5,
                                                         aux_loss=True).eval()
    session = onnx_session(export_onnx(fuse(original).eval(), _images((64, 80), n=2), str(tmp_path / "deeplab.onnx")))
    assert [o.name for o in session.get_outputs()] == ["out", "aux"]
    _onnx_matches(session, original, [(64, 80), (97, 51)])


@pytest.mark.slow
def test_fused_smp_onnx_dynamic(tmp_path, onnx_peers):
    smp = peer("segmentation_models_pytorch")
    from fcn_fast.integrations import fuse

    torch.manual_seed(0)
    original = smp.DeepLabV3Plus(encoder_name="resnet18", encoder_weights=None, classes=5).eval()
    session = onnx_session(export_onnx(fuse(original).eval(), _images((64, 96), n=2), str(tmp_path / "smp.onnx")))
    _onnx_matches(session, original, [(64, 96), (128, 64)])


# ---- fcn-fast export -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = _model("fcn8s", width=1 / 16)
    path = str(tmp_path_factory.mktemp("export") / "fcn8s.pt")
    save_atomic({"format": FORMAT, "model": model_spec("fcn8s", 5, {"width": 1 / 16}), "class_names": list("abcde"),
                 "input_transform": model.input_transform, "state_dict": model.state_dict()}, path)
    return path, model


def test_cli_export_pt2_and_onnx(checkpoint, capsys, tmp_path, onnx_peers):
    path, model = checkpoint
    assert main(["export", path, "--format", "pt2", "--size", "64", "80"]) == 0
    out, _ = capsys.readouterr()
    pt2 = os.path.splitext(path)[0] + ".pt2"
    assert f"wrote {pt2} (pt2, logits, dynamic N, H, W); checked against eager" in out
    x = _images((71, 93))
    with torch.no_grad():
        assert torch.equal(load_pt2(pt2).module()(x), model(x))
    onnx_path = str(tmp_path / "labels.onnx")
    assert main(["export", path, "--format", "onnx", "--output", "labels", "--out", onnx_path, "--size", "64",
                 "80"]) == 0
    out, _ = capsys.readouterr()
    assert "(onnx, labels, dynamic N, H, W); checked against eager" in out and "label mismatch fraction" in out
    session = onnx_session(onnx_path)
    assert [o.name for o in session.get_outputs()] == ["labels"]
    labels = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    assert (labels != model.predict(x)).double().mean() < 1e-3


def test_cli_export_errors(checkpoint, capsys, tmp_path):
    assert main(["export", str(tmp_path / "missing.pt"), "--format", "pt2"]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["export", checkpoint[0], "--format", "tflite"])
    assert exc.value.code == 2

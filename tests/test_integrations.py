"""fcn_fast.integrations.fuse against the original torchvision and smp models' own path: loss, every parameter's
gradient, eval outputs and labels, odd sizes, both align_corners conventions, train and eval mode, state dicts,
refusals, and the example training script."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import peer

from fcn_fast.integrations import FusedSegmentationModel, SegmentationLoss, fuse
from fcn_fast.models import CoarseOutput
from fcn_fast.nn import UpsampleCrossEntropyLoss

tv_seg = peer("torchvision.models.segmentation")
smp = peer("segmentation_models_pytorch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 5


def _torchvision(name: str, aux: bool) -> nn.Module:
    kwargs = dict(weights=None, weights_backbone=None, num_classes=CLASSES)
    if not name.startswith("lraspp"):
        kwargs["aux_loss"] = aux
    torch.manual_seed(0)
    return getattr(tv_seg, name)(**kwargs)


def _smp(arch: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, classes=CLASSES, **kwargs)


def _target(n, h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, CLASSES, (n, h, w), generator=gen)
    target[torch.rand((n, h, w), generator=gen) < 0.1] = 255  # ignored pixels, as VOC's borders
    return target


def _torchvision_reference_loss(output, target):
    """torchvision's references/segmentation/train.py criterion."""
    losses = {name: F.cross_entropy(x, target, ignore_index=255) for name, x in output.items()}
    return losses["out"] if len(losses) == 1 else losses["out"] + 0.5 * losses["aux"]


def _grads(model, step):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks on both paths: they call the same modules in the same order
    loss = step()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_grads_close(actual, expected):
    assert actual.keys() == expected.keys()
    # Parameters whose true gradient is 0 (a bias before a train-mode batch norm) carry rounding noise of either
    # path: their tolerance is relative to the largest gradient, not to their own.
    scale = max(g.abs().max().item() for g in expected.values())
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def _check_train(original, fused, x, target, reference_loss, fused_loss):
    original.train()
    fused.train()
    loss_ref, grads_ref = _grads(original, lambda: reference_loss(original(x), target))
    loss, grads = _grads(original, lambda: fused_loss(fused(x), target))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    _assert_grads_close(grads, grads_ref)


def _check_eval(original, fused, x, main):
    original.eval()
    fused.eval()
    assert not fused.training and not original.training
    with torch.no_grad():
        expected, actual = original(x), fused(x)
        assert type(actual) is type(expected)
        if isinstance(expected, dict):
            assert list(actual) == list(expected)
            for key in expected:
                torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        labels = fused.predict(x)
        assert labels.dtype == torch.int64 and labels.shape == (x.shape[0], *x.shape[2:])
        assert torch.equal(labels, main(expected).argmax(1))
        assert torch.equal(fused.predict(x, dtype=torch.uint8), labels.to(torch.uint8))


# ---- torchvision -----------------------------------------------------------------------------------------------

TORCHVISION = [  # (builder, aux_loss, an odd input size: coarse maps of ceil(size / stride))
    pytest.param("fcn_resnet50", True, (45, 61), id="fcn_resnet50-aux"),
    pytest.param("deeplabv3_resnet50", True, (65, 33), id="deeplabv3_resnet50-aux"),
    pytest.param("deeplabv3_mobilenet_v3_large", True, (50, 71), id="deeplabv3_mobilenet_v3_large-aux"),
    pytest.param("deeplabv3_mobilenet_v3_large", False, (37, 50), id="deeplabv3_mobilenet_v3_large"),
    pytest.param("lraspp_mobilenet_v3_large", False, (45, 61), id="lraspp_mobilenet_v3_large"),
    pytest.param("fcn_resnet50", False, (64, 64), id="fcn_resnet50", marks=pytest.mark.slow),
    pytest.param("deeplabv3_resnet50", False, (97, 41), id="deeplabv3_resnet50", marks=pytest.mark.slow),
    pytest.param("fcn_resnet101", True, (33, 57), id="fcn_resnet101-aux", marks=pytest.mark.slow),
    pytest.param("deeplabv3_resnet101", True, (45, 61), id="deeplabv3_resnet101-aux", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, aux, size", TORCHVISION)
def test_torchvision_matches_original(name, aux, size):
    original = _torchvision(name, aux)
    fused = fuse(original)
    assert isinstance(fused, FusedSegmentationModel)
    x = torch.randn(2, 3, *size)  # batch 2: train-mode batch norm after DeepLabV3's image pooling needs it
    _check_train(original, fused, x, _target(2, *size), _torchvision_reference_loss, SegmentationLoss())
    _check_eval(original, fused, x, lambda out: out["out"])


def test_torchvision_train_output_is_coarse():
    original = _torchvision("deeplabv3_mobilenet_v3_large", aux=True)
    fused = fuse(original).train()
    x = torch.randn(2, 3, 45, 61)
    out = fused(x)
    assert list(out) == ["out", "aux"]
    # "out" at stride 16 (dilated last stage), "aux" at stride 8: never the 45x61 logits.
    for c, hw, stride in ((out["out"], (3, 4), 16), (out["aux"], (6, 8), 8)):
        assert isinstance(c, CoarseOutput)
        assert c.logits.shape == (2, CLASSES, *hw)
        assert (c.mode, c.offset, c.out_size, c.align_corners, c.factor) == ("interp", (0, 0), (45, 61), False, stride)
    # The geometry is torchvision's F.interpolate(size=input, align_corners=False) exactly.
    torch.testing.assert_close(out["out"].upsample(),
                               F.interpolate(out["out"].logits, size=(45, 61), mode="bilinear", align_corners=False))
    # The module loss of fcn_fast.nn takes each CoarseOutput as well.
    target = _target(2, 45, 61)
    expected = SegmentationLoss()(out, target)
    criterion = UpsampleCrossEntropyLoss(ignore_index=255)
    torch.testing.assert_close(criterion(out["out"], target) + 0.5 * criterion(out["aux"], target), expected)


def test_state_dict_round_trip_and_shared_parameters():
    original = _torchvision("deeplabv3_mobilenet_v3_large", aux=True)
    fused = fuse(original)
    assert list(fused.state_dict()) == list(original.state_dict())
    assert [id(p) for p in fused.parameters()] == [id(p) for p in original.parameters()]
    other = _torchvision("deeplabv3_mobilenet_v3_large", aux=True)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    other.load_state_dict(fused.state_dict())  # the fused model's weights load into an original
    for a, b in zip(other.state_dict().values(), original.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    fused.load_state_dict(other.state_dict())  # and back: the original sees the new weights too
    for a, b in zip(other.state_dict().values(), original.state_dict().values()):
        assert torch.equal(a, b)
    # train()/eval() set the original's modules (they are the same ones).
    fused.eval()
    assert not any(m.training for m in original.modules())
    fused.train()
    assert all(m.training for m in original.modules())


def test_eval_output_labels_and_backend():
    original = _torchvision("lraspp_mobilenet_v3_large", aux=False).eval()
    fused = fuse(original, eval_output="labels", backend="reference").eval()
    x = torch.randn(1, 3, 37, 50)
    with torch.no_grad():
        assert torch.equal(fused(x), original(x)["out"].argmax(1))
    assert "eval_output='labels'" in repr(fused) and "backend='reference'" in repr(fused)


# ---- smp -------------------------------------------------------------------------------------------------------

SMP = [  # (architecture, an input size divisible by its encoder's output stride)
    pytest.param("DeepLabV3", (40, 72), id="DeepLabV3"),
    pytest.param("DeepLabV3Plus", (48, 80), id="DeepLabV3Plus"),
    pytest.param("FPN", (64, 96), id="FPN"),
    pytest.param("PSPNet", (40, 56), id="PSPNet"),
    pytest.param("PAN", (128, 192), id="PAN"),  # its pyramid attention pools the stride-32 map by 8
    pytest.param("UPerNet", (96, 64), id="UPerNet", marks=pytest.mark.slow),
    pytest.param("Segformer", (64, 160), id="Segformer", marks=pytest.mark.slow),
]


def _smp_loss(output, target):
    return F.cross_entropy(output, target, ignore_index=255)


@pytest.mark.parametrize("arch, size", SMP)
def test_smp_matches_original(arch, size):
    original = _smp(arch)
    assert original.segmentation_head[1].align_corners is True  # smp's convention, which the fused one must copy
    fused = fuse(original)
    x = torch.randn(2, 3, *size)
    _check_train(original, fused, x, _target(2, *size), _smp_loss, SegmentationLoss())
    _check_eval(original, fused, x, lambda out: out)


def test_smp_coarse_geometry_and_align_corners_false():
    original = _smp("FPN")
    fused = fuse(original).train()
    x = torch.randn(2, 3, 64, 96)
    out = fused(x)
    assert isinstance(out, CoarseOutput)
    assert out.logits.shape == (2, CLASSES, 16, 24)
    assert (out.mode, out.factor, out.out_size, out.align_corners) == ("interp", 4, (64, 96), True)
    # The other convention: an smp head whose Upsample has align_corners=False (F.interpolate by scale_factor).
    original.segmentation_head[1].align_corners = False
    fused = fuse(original)
    assert fused.train()(x).align_corners is False
    _check_train(original, fused, x, _target(2, 64, 96), _smp_loss, SegmentationLoss())
    _check_eval(original, fused, x, lambda out: out)


def test_smp_classification_head():
    original = _smp("DeepLabV3Plus", aux_params={"classes": 3})
    fused = fuse(original).train()
    x = torch.randn(2, 3, 64, 64)
    masks, labels = fused(x)
    assert isinstance(masks, CoarseOutput) and labels.shape == (2, 3)
    with pytest.raises(TypeError, match=r"pass output\[0\]"):
        SegmentationLoss()((masks, labels), _target(2, 64, 64))
    original.eval()
    fused.eval()
    with torch.no_grad():
        (m_ref, l_ref), (m, l) = original(x), fused(x)
        torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l, l_ref)
        assert torch.equal(fused.predict(x), m_ref.argmax(1))


def test_smp_input_check_kept():
    fused = fuse(_smp("FPN")).eval()
    with pytest.raises(RuntimeError, match="divisible by 32"):
        fused(torch.randn(1, 3, 65, 64))


def test_smp_frozen_encoder_stays_frozen():
    original = _smp("FPN")
    original.freeze_encoder()
    fused = fuse(original).train()
    norms = [m for m in original.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert original.decoder.training


# ---- refusals ----------------------------------------------------------------------------------------------------

def test_unet_style_models_are_not_applicable():
    for arch in ("Unet", "Linknet"):
        with pytest.raises(ValueError, match=f"not applicable to smp {arch}.*no final upsampling"):
            fuse(_smp(arch))


def test_refuses_models_it_does_not_know():
    with pytest.raises(TypeError, match="is not a model it knows"):
        fuse(nn.Sequential(nn.Conv2d(3, 5, 1)))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        fuse("fcn_resnet50")

    class Custom(tv_seg.FCN):  # a subclass that changes the forward: not what fuse knows how to split
        def forward(self, x):
            return super().forward(x)["out"]

    base = _torchvision("fcn_resnet50", aux=False)
    with pytest.raises(TypeError, match="is not a model it knows"):
        fuse(Custom(base.backbone, base.classifier))
    from fcn_fast import models

    with pytest.raises(TypeError, match="run the fused head already"):
        fuse(models.build("fcn32s", width=1 / 16))
    with pytest.raises(TypeError, match="fused already"):
        fuse(fuse(base))
    with pytest.raises(ValueError, match="eval_output must be one of"):
        fuse(base, eval_output="probabilities")


def test_refuses_smp_heads_it_cannot_fuse():
    with pytest.raises(ValueError, match="activation.*activation=None"):
        fuse(_smp("FPN", activation="sigmoid"))
    odd = _smp("FPN")
    odd.segmentation_head[1] = nn.Upsample(scale_factor=2.5, mode="bilinear", align_corners=True)
    with pytest.raises(ValueError, match="integer factor"):
        fuse(odd)
    nearest = _smp("FPN")
    nearest.segmentation_head[1] = nn.Upsample(scale_factor=4, mode="nearest")
    with pytest.raises(TypeError, match="only a bilinear"):
        fuse(nearest)


# ---- the loss ----------------------------------------------------------------------------------------------------

def test_segmentation_loss_on_tensors_and_dicts():
    gen = torch.Generator().manual_seed(3)
    out = {"out": torch.randn(2, CLASSES, 9, 7, generator=gen), "aux": torch.randn(2, CLASSES, 9, 7, generator=gen)}
    target = _target(2, 9, 7)
    expected = _torchvision_reference_loss(out, target)
    torch.testing.assert_close(SegmentationLoss()(out, target), expected)
    torch.testing.assert_close(SegmentationLoss(aux_weight=0.25)(out, target),
                               F.cross_entropy(out["out"], target, ignore_index=255)
                               + 0.25 * F.cross_entropy(out["aux"], target, ignore_index=255))
    weight = torch.rand(CLASSES, generator=gen)
    torch.testing.assert_close(SegmentationLoss(weight, ignore_index=255, label_smoothing=0.1)(out["out"], target),
                               F.cross_entropy(out["out"], target, weight=weight, ignore_index=255,
                                               label_smoothing=0.1))
    with pytest.raises(ValueError, match="needs the key 'out'"):
        SegmentationLoss()({"main": out["out"]}, target)
    with pytest.raises(TypeError, match="must be a CoarseOutput"):
        SegmentationLoss()([out["out"]], target)


# ---- the example -------------------------------------------------------------------------------------------------

def test_example_torchvision_training_runs():
    script = os.path.join(ROOT, "examples", "torchvision_training.py")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, script, "--model", "lraspp_mobilenet_v3_large", "--steps", "2",
                             "--batch-size", "2", "--size", "64"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 2/2" in result.stdout and "pixel accuracy" in result.stdout


# ---- the benchmark case ----------------------------------------------------------------------------------------

def test_benchmark_case_runs_and_checks(tmp_path):
    """The suite's torchvision training-step case: both providers pass the correctness gate against the original
    (loss and every parameter's gradient) before they are timed. Correctness only: no speed is asserted."""
    from fcn_fast import bench
    from fcn_fast.bench import results

    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--ops", "fcn_resnet50", "--device", "cpu", "--out", str(tmp_path),
                           "--no-plots"]) == 0
    finally:
        torch.set_num_threads(threads)
    data = results.load(tmp_path / results.DATA_FILE)
    assert {r["provider"] for r in data.rows} == {"eager", "fcn_fast:cpu"}
    for r in data.rows:
        assert r["status"] == "ok" and r["mode"] == "full" and r["check"]["ok"], r
        assert r["peak_bytes"] > 0 and r["images_per_s"] > 0
    (report,) = [tmp_path / f"{name}.md" for name in data.sets()]
    assert "## fcn_resnet50" in report.read_text()

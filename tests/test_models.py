"""The FCN family (fcn_fast.models): fused vs plain-PyTorch paths, Caffe geometry, weight loading, staged init."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fcn_fast
from fcn_fast import models
from fcn_fast.models import BilinearDeconv, CoarseOutput
from fcn_fast.models._complexity import conv_macs
from fcn_fast.models.vgg import VGG16_BLOCKS, conv_names
from fcn_fast.ops._resample import bilinear_filler_1d, bilinear_kernel, deconv_kernel_size
from harness import assert_close, backend_params, device_for

TINY = 1 / 32
SIZES = [(1, 1), (33, 47), (97, 130)]
# (name, geometry): every model, plus the "same" geometry of the VGG nets.
VARIANTS = [("fcn32s", "caffe"), ("fcn16s", "caffe"), ("fcn8s", "caffe"), ("fcn8s_atonce", "caffe"),
            ("fcn8s", "same"), ("fcn8s_resnet50", None)]
CAFFE_NAMES = {
    "fcn32s": ["upscore"],
    "fcn16s": ["score_pool4", "upscore2", "upscore16"],
    "fcn8s": ["score_pool4", "score_pool3", "upscore2", "upscore_pool4", "upscore8"],
    "fcn8s_atonce": ["scale_pool4", "score_pool4", "scale_pool3", "score_pool3", "upscore2", "upscore_pool4",
                     "upscore8"],
}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero scorers (the built ones are zero, which would hide every backbone gradient)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("score_"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def pair(name, geometry=None, device="cpu", **options):
    """A fused model and its plain-PyTorch twin with the same weights."""
    fused = randomize(models.build(name, width=TINY, geometry=geometry, dropout=0.0, **options)).to(device)
    reference = models.build(name, width=TINY, geometry=geometry, dropout=0.0, fused=False, **options).to(device)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def close(actual, expected, rtol=1e-4):
    """float32 agreement relative to the tensor's scale (sums over many pixels reorder the arithmetic)."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 1.0
    assert_close(actual, expected, rtol=rtol, atol=1e-5 * max(scale, 1e-3))


# ---- fused vs reference -----------------------------------------------------------------------------------------

INTERPRETED = device_for("triton").type == "cpu"  # Triton under its (slow) interpreter


def fused_cases():
    """Every variant x size x backend; interpreted Triton runs one case by default, the rest are marked slow."""
    cases = []
    for name, geometry in VARIANTS:
        for size in SIZES:
            for b in backend_params():
                backend = b.values[0]
                marks = list(b.marks)
                if backend == "triton" and INTERPRETED and (name, size) != ("fcn8s", (1, 1)):
                    marks.append(pytest.mark.slow)
                ident = f"{name}-{geometry}-{size[0]}x{size[1]}-{backend}" if geometry else f"{name}-{size[0]}x{size[1]}-{backend}"
                cases.append(pytest.param(name, geometry, size, backend, marks=marks, id=ident))
    return cases


@pytest.mark.parametrize("name,geometry,size,backend", fused_cases())
def test_fused_matches_reference(name, geometry, size, backend):
    device = device_for(backend)
    fused, reference = pair(name, geometry, device)
    # Eval mode: batch norm on running statistics. In train mode its backward cancels large terms, which turns the
    # head's float32 summation order into relative noise in the gradients before it, whatever the head computes.
    fused.eval(), reference.eval()
    batch = 1
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, *size, generator=gen).to(device)
    target = torch.randint(0, 21, (batch, *size), generator=gen)
    if size != (1, 1):
        target[0, 0, 0] = 255  # one ignored pixel
    target = target.to(device)

    with fcn_fast.use_backend(backend):
        logits = fused(x)
        loss = fcn_fast.nn.UpsampleCrossEntropyLoss(ignore_index=255)(fused.coarse(x), target)
        loss.backward()
    ref_logits = reference(x)
    ref_loss = F.cross_entropy(ref_logits, target, ignore_index=255)
    ref_loss.backward()

    assert logits.shape == ref_logits.shape == (batch, 21, *size)
    close(logits, ref_logits)
    close(loss, ref_loss)
    grads = dict(reference.named_parameters())
    for pname, p in fused.named_parameters():
        assert p.grad is not None, pname
        close(p.grad, grads[pname].grad)


@pytest.mark.parametrize("backend", [pytest.param(*b.values, marks=list(b.marks) + (
    [pytest.mark.slow] if b.values[0] == "triton" and INTERPRETED else []), id=b.id) for b in backend_params()])
def test_predict_and_coarse_helpers(backend):
    device = device_for(backend)
    fused, reference = pair("fcn8s", "caffe", device)
    fused.eval(), reference.eval()
    x = torch.randn(2, 3, 21, 34, device=device)
    with fcn_fast.use_backend(backend):
        out = fused.coarse(x)
        labels = fused.predict(x)
        full = out.upsample()
        assert isinstance(out, CoarseOutput) and out.out_size == (21, 34) and out.factor == 8 and out.offset == (31, 31)
        assert torch.equal(out.argmax(), labels)
    close(full, reference(x))
    assert labels.dtype == torch.int64 and labels.shape == (2, 21, 34)
    expected = reference.predict(x)
    # Labels agree wherever the top two logits are not within rounding of each other.
    top2 = reference(x).topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert torch.equal(labels[clear], expected[clear])


# ---- geometry ---------------------------------------------------------------------------------------------------

def test_caffe_crops_are_the_reference_nets():
    assert models.caffe_crops(32) == ([], 19)
    assert models.caffe_crops(16) == ([5], 27)
    assert models.caffe_crops(8) == ([5, 9], 31)


def caffe_sizes(height: int, stride: int):
    """Every blob height of the Caffe net, by the layer arithmetic (conv1_1 pad 100, ceil-mode pools, valid fc6)."""
    h = height + 2 * 100 - 2
    pools = []
    for _ in range(5):
        h = math.ceil((h - 2) / 2) + 1
        pools.append(h)
    return pools, pools[4] - 6


@pytest.mark.parametrize("stride", [32, 16, 8])
def test_caffe_crops_fit_every_size(stride):
    """The derived crops stay inside the blobs they crop, for every input size (what pad 100 guarantees)."""
    skips, final = models.caffe_crops(stride)
    for height in range(1, 700):
        pools, h = caffe_sizes(height, stride)
        for factor, offset, pool in zip((2, 2), skips, (pools[3], pools[2])):
            h = (h - 1) * factor + deconv_kernel_size(factor)
            assert offset + h <= pool, (height, offset, h, pool)
        factor = 32 // 2 ** len(skips)
        assert final + height <= (h - 1) * factor + deconv_kernel_size(factor)


@pytest.mark.parametrize("name,geometry", VARIANTS, ids=[f"{n}-{g}" if g else n for n, g in VARIANTS])
def test_output_size_equals_input_size(name, geometry):
    model = models.build(name, width=1 / 64, geometry=geometry).eval()
    for size in [(1, 5), (2, 1), (31, 17), (64, 65)]:
        x = torch.randn(1, 3, *size)
        with fcn_fast.use_backend("reference"):
            assert model(x).shape == (1, 21, *size)
            assert model.predict(x).shape == (1, *size)


def test_bilinear_filler_matches_its_formula():
    # upsample_filt of the reference surgery.py, written out independently
    for size in (1, 3, 4, 7, 16, 32, 64):
        factor = (size + 1) // 2
        center = factor - 1 if size % 2 == 1 else factor - 0.5
        expected = torch.tensor([1 - abs(k - center) / factor for k in range(size)], dtype=torch.float64)
        assert torch.equal(bilinear_filler_1d(size), expected)
    layer = BilinearDeconv(3, 8)
    filt = bilinear_filler_1d(16)
    assert layer.weight.shape == (3, 3, 16, 16)
    for i in range(3):
        for j in range(3):
            expected = (filt[:, None] * filt[None, :]).float() if i == j else torch.zeros(16, 16)
            assert torch.equal(layer.weight[i, j], expected)
    # bilinear interpolation reproduces a linear ramp away from the borders
    ramp = torch.arange(6.0).view(1, 1, 1, 6).expand(1, 3, 6, 6)
    up = layer(ramp)[0, 1, 20, 8:40]
    assert torch.allclose(up.diff(), torch.full_like(up.diff(), 1 / 8))


# ---- names, weights, staged init ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CAFFE_NAMES))
def test_state_dict_keys_are_caffe_names(name):
    model = models.build(name, width=TINY)
    layers = conv_names() + ["fc6", "fc7", "score_fr"]
    expected = {f"{n}.{p}" for n in layers for p in ("weight", "bias")}
    for layer in CAFFE_NAMES[name]:
        expected |= {f"{layer}.weight"} if layer.startswith(("upscore", "scale_")) else {f"{layer}.weight",
                                                                                         f"{layer}.bias"}
    assert set(model.state_dict()) == expected


def caffe_converted(model: nn.Module) -> dict:
    """What a Caffe->PyTorch conversion of the reference net gives: Caffe shapes (C x C deconvolutions), bilinear
    deconvolutions as computed by numpy in surgery.py and stored as float32 blobs."""
    state = {k: torch.randn(v.shape) * 0.01 for k, v in model.state_dict().items()}
    for name, layer in model.upsampling_layers().items():
        state[f"{name}.weight"] = bilinear_kernel(layer.channels, layer.factor, torch.float64, diagonal=True).float()
    for k in state:
        if k.startswith("scale_pool"):
            state[k] = model.state_dict()[k].clone()
    return state


@pytest.mark.parametrize("name", list(CAFFE_NAMES))
def test_converted_caffe_weights_load_and_stay_fused(name):
    model = models.build(name, width=TINY).eval()
    model.load_state_dict(caffe_converted(model))
    assert all(layer.exact for layer in model.upsampling_layers().values())
    reference = models.build(name, width=TINY, fused=False).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 19, 23)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the fused path stays in use
        with fcn_fast.use_backend("reference"):
            close(model(x), reference(x))


def test_non_bilinear_fixed_weights_fall_back_with_one_warning():
    model, reference = pair("fcn8s")
    state = model.state_dict()
    state["upscore_pool4.weight"] = torch.randn_like(state["upscore_pool4.weight"])
    model.load_state_dict(state)
    reference.load_state_dict(state)
    assert not model.upscore_pool4.exact
    x = torch.randn(1, 3, 17, 29)
    with fcn_fast.use_backend("reference"):
        with pytest.warns(UserWarning, match="upscore_pool4"):
            out = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per model
            model(x)
    close(out, reference(x))


def test_learnable_upsample():
    fused, reference = pair("fcn8s", learnable_upsample=True)
    names = {n for n, _ in fused.named_parameters()}
    assert {"upscore2.weight", "upscore_pool4.weight", "upscore8.weight"} <= names
    assert torch.equal(fused.upscore8.weight, bilinear_kernel(21, 8, diagonal=True))
    with torch.no_grad():  # as after some training: no longer bilinear
        for net in (fused, reference):
            for layer in net.upsampling_layers().values():
                layer.weight.add_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.01)
    x = torch.randn(1, 3, 25, 18)
    target = torch.randint(0, 21, (1, 25, 18))
    with fcn_fast.use_backend("reference"):
        with pytest.warns(UserWarning, match="learnable"):
            coarse = fused.coarse(x)
        loss = fcn_fast.nn.UpsampleCrossEntropyLoss()(coarse, target)
        loss.backward()
        assert coarse.factor == 1 and coarse.logits.shape == (1, 21, 25, 18)
        close(fused(x), reference(x))
    ref_loss = F.cross_entropy(reference(x), target)
    ref_loss.backward()
    close(loss, ref_loss)
    for (n, p), (_, q) in zip(fused.named_parameters(), reference.named_parameters()):
        close(p.grad, q.grad)


def fake_torchvision_vgg16(width: float):
    """torchvision's vgg16 layout (features.N, classifier.0/3/6) at a tiny width."""
    layers, in_ch = [], 3
    for block in VGG16_BLOCKS:
        for c in block:
            layers += [nn.Conv2d(in_ch, max(1, round(c * width)), 3, padding=1), nn.ReLU(inplace=True)]
            in_ch = max(1, round(c * width))
        layers.append(nn.MaxPool2d(2, 2))
    fc = max(1, round(4096 * width))
    features = nn.Sequential(*layers)
    classifier = nn.Sequential(nn.Linear(in_ch * 49, fc), nn.ReLU(True), nn.Dropout(), nn.Linear(fc, fc),
                               nn.ReLU(True), nn.Dropout(), nn.Linear(fc, 1000))
    net = nn.Module()
    net.features, net.classifier = features, classifier
    return net


def test_convolutionalised_vgg16_classifier_equals_linear(tmp_path):
    torch.manual_seed(0)
    tv = fake_torchvision_vgg16(TINY).eval()
    path = tmp_path / "vgg16.pth"
    torch.save(tv.state_dict(), path)
    model = models.build("fcn32s", width=TINY, backbone_weights=path).eval()
    same = models.build("fcn32s", width=TINY, geometry="same", backbone_weights=str(path)).eval()
    assert model.input_transform == "imagenet"  # what torchvision's VGG16 was trained on
    x = torch.randn(2, 3, 224, 224)
    pool5 = tv.features(x)
    assert pool5.shape[-2:] == (7, 7)
    close(same._features(x)["pool5"], pool5)  # the convolutions, in torchvision's order
    linear = tv.classifier[:5](pool5.flatten(1))
    conv = F.relu(model.fc7(F.relu(model.fc6(pool5))))
    assert conv.shape[-2:] == (1, 1)
    close(conv.flatten(1), linear)


def test_backbone_weights_errors(tmp_path):
    tv = fake_torchvision_vgg16(TINY).state_dict()
    wrong = dict(tv)
    del wrong["features.0.bias"]
    wrong["features.1.weight"] = torch.zeros(1)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"missing keys \[features\.0\.bias\].*unexpected keys \[features\.1\.weight\]"):
        models.build("fcn8s", width=TINY, backbone_weights=tmp_path / "wrong.pth")
    torch.save(tv, tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match=r"conv1_1\.weight: expected \(4, 3, 3, 3\), got \(2, 3, 3, 3\)"):
        models.build("fcn8s", width=1 / 16, backbone_weights=tmp_path / "narrow.pth")
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        models.build("fcn8s", width=TINY, backbone_weights=tmp_path / "nothing.pth")


def test_resnet50_backbone_weights(tmp_path):
    source = models.build("fcn8s_resnet50", width=TINY)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("score_")}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 64), torch.randn(1000)  # torchvision's ImageNet head
    torch.save(state, tmp_path / "resnet50.pth")
    model = models.build("fcn8s_resnet50", width=TINY, backbone_weights=tmp_path / "resnet50.pth")
    for k, v in model.state_dict().items():
        if k.startswith("score_"):
            assert not v.any()
        else:
            assert torch.equal(v, state[k]), k
    assert model.input_transform == "imagenet"
    with pytest.raises(ValueError, match=r"missing keys \[conv1\.weight, bn1\.weight"):
        models.build("fcn8s_resnet50", width=TINY, backbone_weights=fake_torchvision_vgg16(TINY).state_dict())


def test_staged_init(tmp_path):
    fcn32 = randomize(models.build("fcn32s", width=TINY))
    fcn16 = models.init_from(models.build("fcn16s", width=TINY), fcn32)
    torch.save(fcn16.state_dict(), tmp_path / "fcn16s.pth")
    fcn8 = models.init_from(randomize(models.build("fcn8s", width=TINY)), tmp_path / "fcn16s.pth")
    for stage, source, new in ((fcn16, fcn32, {"score_pool4"}), (fcn8, fcn16, {"score_pool3"})):
        src = source.state_dict()
        for k, v in stage.state_dict().items():
            layer = k.split(".")[0]
            if layer in new:
                assert not v.any(), k  # new scorers start at zero
            elif layer.startswith("upscore"):
                assert stage.upsampling_layers()[layer].exact
            else:
                assert torch.equal(v, src[k]), k
    # zero-initialised skips: the finer net starts from the coarser one's scores
    x = torch.randn(1, 3, 40, 40)
    with fcn_fast.use_backend("reference"):
        assert torch.equal(fcn8.coarse(x).logits.abs().amax((2, 3)) > 0, fcn16.coarse(x).logits.abs().amax((2, 3)) > 0)


def test_staged_init_errors():
    fcn16 = models.build("fcn16s", width=TINY)
    with pytest.raises(ValueError, match=r"unexpected keys \[score_pool3\.weight, score_pool3\.bias"):
        models.init_from(fcn16, models.build("fcn8s", width=TINY))
    with pytest.raises(ValueError, match=r"missing keys \[conv1_1\.weight"):
        models.init_from(fcn16, models.build("fcn8s_resnet50", width=TINY))
    with pytest.raises(ValueError, match=r"score_fr\.weight: expected \(21, 128, 1, 1\), got \(5, 128, 1, 1\)"):
        models.init_from(fcn16, models.build("fcn32s", num_classes=5, width=TINY))
    with pytest.raises(TypeError, match="state dict"):
        models.init_from(fcn16, [1, 2])


# ---- training regimes, compile, complexity -----------------------------------------------------------------------

@pytest.mark.parametrize("name", models.available())
def test_freeze_backbone(name):
    model = models.build(name, width=TINY, freeze_backbone=True).train()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("score_") for n in trainable)
    batch_norms = [m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.training for m in batch_norms)
    x = torch.randn(2, 3, 20, 20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with fcn_fast.use_backend("reference"):
        model(x).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics kept


def test_torch_compile_fullgraph():
    model = randomize(models.build("fcn8s", width=TINY, dropout=0.0))
    x = torch.randn(1, 3, 20, 24)
    target = torch.randint(0, 21, (1, 20, 24))
    loss_fn = fcn_fast.nn.UpsampleCrossEntropyLoss()

    def step(x, target):
        return loss_fn(model.coarse(x), target)

    with fcn_fast.use_backend("reference"):
        expected = model(x)
        expected_loss = step(x, target)
        # aot_eager traces the whole graph (fake kernels, autograd registrations) without inductor's compile time.
        close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), expected)
        loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x, target)
        loss.backward()
    close(loss, expected_loss)


@pytest.mark.slow
def test_torch_compile_inductor():
    model = randomize(models.build("fcn8s", width=TINY, dropout=0.0))
    x = torch.randn(1, 3, 20, 24)
    with fcn_fast.use_backend("reference"):
        close(torch.compile(model, fullgraph=True)(x), model(x))


def test_complexity_counts_the_layers():
    stats = models.complexity("fcn32s", size=(1, 1), width=TINY)
    model = models.build("fcn32s", width=TINY)
    assert stats["params"] == sum(p.numel() for p in model.parameters())
    # by hand: conv1 at 199 (1 + 2*100 - 2), pools 100, 50, 25, 13, 7, fc6 valid -> 1
    sizes, macs, in_ch = [199, 100, 50, 25, 13], 0, 3
    for size, block in zip(sizes, VGG16_BLOCKS):
        for c in block:
            macs += size * size * round(c * TINY) * in_ch * 9
            in_ch = round(c * TINY)
    macs += 128 * in_ch * 49 + 128 * 128 + 21 * 128
    assert stats["gflops"] == pytest.approx(2 * macs / 1e9)
    conv = nn.Conv2d(4, 6, 3, groups=2)
    assert conv_macs(conv, torch.empty(1, 6, 5, 5)) == 6 * 25 * 2 * 9


# ---- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fcn8s", "fcn8s_resnet50"])
def test_bad_inputs(name):
    model = models.build(name, width=TINY)
    with pytest.raises(ValueError, match=rf"{name}: x must have 3 channels .*shape \(1, 4, 8, 8\)"):
        model(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=rf"{name}: x must have 4 dimensions, got shape \(3, 8, 8\)"):
        model(torch.randn(3, 8, 8))
    with pytest.raises(TypeError, match=rf"{name}: x must have dtype in .*torch.uint8"):
        model.predict(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match=rf"{name}: x must have the model's dtype torch.float32, got .*float64"):
        model.coarse(torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="H, W >= 1"):
        model(torch.zeros(1, 3, 0, 8))
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        model([1, 2, 3])


def test_bad_build_options():
    with pytest.raises(ValueError, match="unknown model 'fcn4s'; choose from fcn32s, fcn16s"):
        models.build("fcn4s")
    with pytest.raises(ValueError, match=r"width must be > 0.0, got 0"):
        models.build("fcn8s", width=0)
    with pytest.raises(ValueError, match="geometry must be one of"):
        models.build("fcn8s", geometry="valid")
    with pytest.raises(ValueError, match="learnable_upsample needs geometry='caffe'"):
        models.build("fcn8s", geometry="same", learnable_upsample=True)
    with pytest.raises(ValueError, match="ResNet-50 has one geometry"):
        models.build("fcn8s_resnet50", geometry="caffe")
    with pytest.raises(ValueError, match="num_classes must be an int >= 1, got 0"):
        models.build("fcn8s", num_classes=0)
    with pytest.raises(ValueError, match="dropout must be >= 0.0 and < 1.0, got 1.5"):
        models.build("fcn8s", dropout=1.5)
    with pytest.raises(ValueError, match="input_transform must be one of"):
        models.build("fcn8s", input_transform="rgb")

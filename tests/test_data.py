"""Data sets: the synthetic generator, VOC layout (synthetic and the real voc-mini sample), SBD .mat labels, image/
label pairs, transforms, batching, and the errors for bad data."""

import os
import shutil

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import torch
from PIL import Image

from fcn_fast.data import (CAFFE_BGR_MEAN, IMAGENET_MEAN, IMAGENET_STD, VOC_PALETTE, Augment, label_image,
                           list_items, make_synthetic, normalize, open_dataset, pad_batch, read_label,
                           read_sbd_label)
from fcn_fast.data.synthetic import CLASSES, render
from fcn_fast.errors import UserError
from pipeline_helpers import voc_mini


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp("syn") / "data"), train=6, val=3, size=(48, 64), seed=3)


def test_synthetic_layout_and_labels(synthetic):
    with open(os.path.join(synthetic, "ImageSets", "Segmentation", "train.txt")) as f:
        ids = f.read().split()
    assert len(ids) == 6
    lab = Image.open(os.path.join(synthetic, "SegmentationClass", ids[0] + ".png"))
    assert lab.mode == "P" and lab.size == (64, 48)
    assert np.array_equal(np.frombuffer(bytes(lab.getpalette()[:30]), np.uint8).reshape(10, 3), VOC_PALETTE[:10])
    # The label file holds exactly the rendered label, and the image the rendered pixels (PNG is lossless).
    image, label = render(3, 0, (48, 64))
    assert np.array_equal(np.asarray(lab), label)
    assert np.array_equal(np.asarray(Image.open(os.path.join(synthetic, "JPEGImages", ids[0] + ".png"))), image)
    labels = np.stack([read_label(os.path.join(synthetic, "SegmentationClass", i + ".png")) for i in ids])
    assert labels.max() < len(CLASSES) and len(np.unique(labels)) > 2


def test_synthetic_is_deterministic_and_seeded():
    a, b, c = render(1, 5), render(1, 5), render(2, 5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_synthetic_has_shapes_thinner_than_the_fcn8s_stride():
    # Thin parts (ring, bar, cross) exist: some labelled pixel has background within 3 pixels on both sides.
    thin = 0
    for i in range(20):
        _, label = render(0, i)
        fg = label > 0
        thin += int(np.sum(fg[:, 3:-3] & ~fg[:, :-6] & ~fg[:, 6:]))
    assert thin > 0


def test_make_data_refuses_a_non_empty_folder(synthetic, tmp_path):
    with pytest.raises(UserError, match="already exists"):
        make_synthetic(synthetic, train=1, val=1)
    (tmp_path / "empty").mkdir()
    make_synthetic(str(tmp_path / "empty"), train=1, val=1, size=(16, 16))  # an empty folder is fine
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_voc_loader_on_synthetic(synthetic):
    ds = open_dataset(synthetic, "train")
    assert len(ds) == 6 and ds.num_classes == len(CLASSES) and ds.class_names == CLASSES
    x, y, name = ds[0]
    image, label = render(3, 0, (48, 64))
    assert x.shape == (3, 48, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(label.astype(np.int64)))
    # Caffe input: BGR 0..255 minus the mean.
    expected = torch.from_numpy(image[..., ::-1].astype(np.float32).copy()).permute(2, 0, 1) \
        - torch.tensor(CAFFE_BGR_MEAN).view(3, 1, 1)
    torch.testing.assert_close(x, expected)
    assert name == "syn_000000"


def test_imagenet_normalisation():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = normalize(image, "imagenet")
    manual = (image.astype(np.float64) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), manual, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input_transform"):
        normalize(image, "rgb")


def test_voc_mini_real_images():
    root = voc_mini()
    if root is None:
        pytest.skip("shared/data/voc-mini not found above the repository (set FCN_FAST_VOC_MINI)")
    ds = open_dataset(str(root), "trainval")
    assert ds.num_classes == 21
    seen = {}
    for i in range(len(ds)):
        x, y, name = ds[i]
        assert x.shape[1:] == y.shape and x.shape[0] == 3
        seen[name] = set(torch.unique(y).tolist())
    # The classes the sample's README lists for its labels (255: void borders, absent from 2011_000025).
    assert seen["2011_000003"] == {0, 5, 15, 255}
    assert seen["2011_000025"] == {0, 6, 7}
    assert len(open_dataset(str(root), "train")) == 2 and len(open_dataset(str(root), "val")) == 1


def _sbd(root, ids, seg):
    os.makedirs(root / "cls")
    os.makedirs(root / "img")
    for i in ids:
        Image.fromarray(np.zeros(seg.shape + (3,), np.uint8)).save(root / "img" / f"{i}.jpg")
        # The real SBD layout: a 1x1 struct GTcls with Boundaries (20x1 cell of sparse matrices), Segmentation
        # (uint8 class indices) and CategoriesPresent.
        boundaries = np.empty((20, 1), dtype=object)
        for k in range(20):
            boundaries[k, 0] = scipy.sparse.csc_matrix(seg.shape, dtype=np.float64)
        present = np.unique(seg[seg > 0]).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(root / "cls" / f"{i}.mat", {"GTcls": {"Boundaries": boundaries, "Segmentation": seg,
                                                              "CategoriesPresent": present}})
    (root / "train.txt").write_text("\n".join(ids) + "\n")


def test_sbd_mat_labels(tmp_path):
    seg = np.zeros((10, 12), np.uint8)
    seg[2:5, 3:9] = 15
    seg[7:, :4] = 7
    _sbd(tmp_path, ["2008_000002", "2008_000003"], seg)
    assert np.array_equal(read_sbd_label(str(tmp_path / "cls" / "2008_000002.mat")), seg)
    ds = open_dataset(str(tmp_path), "train")
    assert len(ds) == 2 and ds.num_classes == 21
    assert torch.equal(ds[1][1], torch.from_numpy(seg.astype(np.int64)))
    (tmp_path / "cls" / "bad.mat").write_bytes(b"not a mat file")
    with pytest.raises(UserError, match="bad.mat"):
        read_sbd_label(str(tmp_path / "cls" / "bad.mat"))
    scipy.io.savemat(tmp_path / "cls" / "other.mat", {"x": np.zeros(3)})
    with pytest.raises(UserError, match="GTcls"):
        read_sbd_label(str(tmp_path / "cls" / "other.mat"))


def test_image_label_pairs(tmp_path):
    for split, n in (("train", 2), ("val", 1)):
        os.makedirs(tmp_path / split / "images")
        os.makedirs(tmp_path / split / "labels")
        for k in range(n):
            Image.fromarray(np.full((9, 11, 3), 40 * k, np.uint8)).save(tmp_path / split / "images" / f"a{k}.png")
            label_image(np.full((9, 11), k + 1, np.uint8)).save(tmp_path / split / "labels" / f"a{k}.png")
    ds = open_dataset(str(tmp_path), "train")
    assert [it.id for it in ds.items] == ["a0", "a1"] and ds[1][1].unique().tolist() == [2]
    assert len(open_dataset(str(tmp_path), "val")) == 1


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_bad_data_errors(synthetic, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(str(tmp_path / "nowhere"), "train")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="is not a data set"):
        open_dataset(str(tmp_path / "plain"), "train")
    with pytest.raises(UserError, match=r"test\.txt does not exist.*splits there: train, trainval, val"):
        open_dataset(synthetic, "test")

    root = _copy(synthetic, tmp_path / "d")
    sets = os.path.join(root, "ImageSets", "Segmentation")
    open(os.path.join(sets, "empty.txt"), "w").close()
    with pytest.raises(UserError, match="empty.txt lists no images"):
        open_dataset(root, "empty")
    with open(os.path.join(sets, "missing.txt"), "w") as f:
        f.write("syn_999999\n")
    with pytest.raises(UserError, match="syn_999999"):
        open_dataset(root, "missing")

    label = os.path.join(root, "SegmentationClass", "syn_000000.png")
    label_image(np.zeros((10, 10), np.uint8)).save(label)
    ds = open_dataset(root, "train")
    with pytest.raises(UserError, match=r"syn_000000\.png is 10x10 but its image .* is 64x48"):
        ds[0]
    bad = np.zeros((48, 64), np.uint8)
    bad[0, 0], bad[1, 1] = 37, 255
    label_image(bad).save(label)
    with pytest.raises(UserError, match=r"syn_000000\.png has values \[37\] outside the 6 classes"):
        ds[0]
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(label)
    with pytest.raises(UserError, match="RGB image; labels must be palette"):
        ds[0]


def test_augment_keeps_image_and_label_aligned():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).view(2, 3, 5, 7)[0]
    y = torch.arange(5 * 7).view(5, 7) % 6
    aug = Augment(crop=9, flip=True)
    for seed in range(6):
        xa, ya = aug(x, y, torch.Generator().manual_seed(seed))
        assert xa.shape == (3, 9, 9) and ya.shape == (9, 9)
        pad = ya == 255
        assert pad.sum() == 81 - 35 and torch.all(xa[:, pad] == 0)  # padding: mean (0) and ignore
        # The label of every kept pixel is the one of the image pixel it came with.
        vals = xa[0][~pad].long()
        assert torch.equal(ya[~pad], vals % 35 % 6)
    xs, ys = Augment(scale=(2.0, 2.0))(x, y, torch.Generator().manual_seed(0))
    assert xs.shape == (3, 10, 14) and torch.equal(ys[::2, ::2], y)
    a = Augment(scale=(0.5, 1.5), crop=4, flip=True)
    r1, r2 = a(x, y, torch.Generator().manual_seed(4)), a(x, y, torch.Generator().manual_seed(4))
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])


def test_pad_batch():
    images = [torch.ones(3, 2, 3), 2 * torch.ones(3, 4, 1)]
    labels = [torch.zeros(2, 3, dtype=torch.long), torch.ones(4, 1, dtype=torch.long)]
    x, y = pad_batch(images, labels)
    assert x.shape == (2, 3, 4, 3) and y.shape == (2, 4, 3)
    assert torch.all(y[0, 2:] == 255) and torch.all(y[1, :, 1:] == 255) and torch.all(x[0, :, 2:] == 0)
    assert torch.equal(y[1, :, 0], torch.ones(4, dtype=torch.long))


def test_list_items_prefers_jpg(tmp_path, synthetic):
    root = _copy(synthetic, tmp_path / "j")
    Image.open(os.path.join(root, "JPEGImages", "syn_000001.png")).save(os.path.join(root, "JPEGImages",
                                                                                     "syn_000001.jpg"))
    items = {it.id: it for it in list_items(root, "train")}
    assert items["syn_000001"].image.endswith(".jpg") and items["syn_000002"].image.endswith(".png")

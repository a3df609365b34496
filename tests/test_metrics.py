"""fcn_fast.metrics against a direct NumPy computation of the FCN paper's definitions, pixel by pixel."""

import math

import numpy as np
import pytest
import torch

from fcn_fast.metrics import ConfusionMatrix, format_table, scores


def numpy_metrics(pred, target, n, ignore=255):
    keep = target != ignore
    p, t = pred[keep], target[keep]
    tp = np.array([np.sum((t == c) & (p == c)) for c in range(n)], dtype=np.float64)
    truth = np.array([np.sum(t == c) for c in range(n)], dtype=np.float64)
    predicted = np.array([np.sum(p == c) for c in range(n)], dtype=np.float64)
    union = truth + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = tp / truth
        iou = tp / union
    present = truth > 0
    return {
        "pixel_acc": tp.sum() / truth.sum(),
        "mean_acc": np.nanmean(acc),
        "mean_iu": np.nanmean(iou),
        "fw_iu": np.sum(truth[present] / truth.sum() * iou[present]),
        "iou": iou,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    n = 7
    cm = ConfusionMatrix(n)
    preds, targets = [], []
    for _ in range(3):  # accumulated over batches of different sizes
        h, w = rng.integers(5, 30, 2)
        target = rng.integers(0, n - 1, (2, h, w))  # class n-1 never labelled
        target[rng.random((2, h, w)) < 0.1] = 255
        pred = np.where(rng.random((2, h, w)) < 0.6, target, rng.integers(0, n, (2, h, w)))
        pred[pred == 255] = 0
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        preds.append(pred.ravel())
        targets.append(target.ravel())
    got = cm.compute()
    want = numpy_metrics(np.concatenate(preds), np.concatenate(targets), n)
    for key in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    np.testing.assert_allclose(np.array(got["iou"], dtype=np.float64), want["iou"], rtol=1e-12)
    assert got["pixels"] == sum(int(np.sum(t != 255)) for t in targets)
    assert got["ignored"] == sum(int(np.sum(t == 255)) for t in targets)


def test_absent_classes_and_perfect_prediction():
    target = torch.tensor([[0, 0, 1, 1, 255]])
    cm = ConfusionMatrix(4)
    cm.update(target.clamp(max=1), target)
    r = cm.compute()
    assert r["pixel_acc"] == 1 and r["mean_iu"] == 1 and r["fw_iu"] == 1
    assert math.isnan(r["iou"][2]) and math.isnan(r["acc"][3])  # never labelled nor predicted: left out
    cm.update(torch.tensor([[3]]), torch.tensor([[0]]))  # predicted but never labelled: IoU 0, counted
    r = cm.compute()
    assert r["iou"][3] == 0 and r["mean_iu"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_out_of_range_labels_are_reported():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="1 pixels had labels or predictions outside the 3 classes"):
        cm.compute()
    with pytest.raises(ValueError, match="one shape"):
        cm.update(torch.zeros(2, 3), torch.zeros(3, 2))


def test_no_labelled_pixels_and_table():
    cm = ConfusionMatrix(2)
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    assert math.isnan(cm.compute()["mean_iu"])
    r = scores(torch.tensor([[3, 1], [0, 4]]))
    assert r["pixel_acc"] == pytest.approx(7 / 8)
    text = format_table(r, ["bg", "thing"])
    assert "mean IU 77.50" in text and "thing" in text.splitlines()[-1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_accumulates_on_the_gpu():
    cm = ConfusionMatrix(5, device="cuda")
    target = torch.randint(0, 5, (2, 16, 16), device="cuda")
    cm.update(target, target)
    assert cm.counts.device.type == "cuda" and cm.compute()["pixel_acc"] == 1

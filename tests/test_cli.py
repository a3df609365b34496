"""The fcn-fast command end to end in a temporary folder: make-data, train, eval, predict, demo --fast, and the
user-error paths (one line, non-zero exit, no traceback)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fcn_fast.cli import main
from pipeline_helpers import REPO

TRAIN = ["--model", "fcn32s", "--width", "0.0625", "--geometry", "same", "--optimizer", "adamw", "--lr", "1e-3",
         "--loss-reduction", "mean", "--threads", "1", "--no-progress"]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data, run_dir = str(root / "data"), str(root / "run")
    assert main(["make-data", data, "--train", "4", "--val", "2", "--size", "40", "48"]) == 0
    assert main(["train", "--data", data, "--out", run_dir, "--epochs", "1", *TRAIN]) == 0
    return root, data, run_dir


def test_make_data_train_eval(trained, capsys):
    root, data, run_dir = trained
    assert len(open(os.path.join(data, "ImageSets", "Segmentation", "train.txt")).read().split()) == 4
    assert os.path.isfile(os.path.join(run_dir, "summary.json"))
    out_json = str(root / "eval.json")
    code, out, err = run(["eval", os.path.join(run_dir, "checkpoints", "last.pt"), "--data", data, "--split", "val",
                          "--json", out_json, "--no-progress"], capsys)
    assert code == 0, err
    assert "mean IU" in out and "triangle" in out
    with open(out_json) as f:
        result = json.load(f)
    assert result["pixels"] == 2 * 40 * 48 and 0 <= result["mean_iu"] <= 1


def test_predict_any_size(trained, capsys, tmp_path):
    _, data, run_dir = trained
    odd = tmp_path / "odd.jpg"
    Image.open(os.path.join(data, "JPEGImages", "syn_000000.png")).resize((37, 53)).save(odd)
    out = tmp_path / "pred"
    code, _, err = run(["predict", os.path.join(data, "JPEGImages", "syn_000001.png"), str(odd), "--checkpoint",
                        os.path.join(run_dir, "checkpoints", "best.pt"), "--out", str(out)], capsys)
    assert code == 0, err
    lab = Image.open(out / "odd.png")
    assert lab.mode == "P" and lab.size == (37, 53) and np.asarray(lab).max() < 6
    assert Image.open(out / "odd_overlay.png").size == (37, 53)
    assert Image.open(out / "syn_000001.png").size == (48, 40)


def test_demo_fast(tmp_path, capsys):
    code, out, err = run(["demo", "--fast", "--out", str(tmp_path / "demo"), "--no-progress"], capsys)
    assert code == 0, err
    for stage in ("fcn32s", "fcn16s", "fcn8s"):
        assert f"| {stage}" in out
    with open(tmp_path / "demo" / "results.json") as f:
        stages = json.load(f)["stages"]
    assert [s["stage"] for s in stages] == ["fcn32s", "fcn16s", "fcn8s"]
    assert all(0 <= s["mean_iu"] <= 1 for s in stages)
    for stage in stages:  # evaluated during training, for the curves of plots/stages.png; the last one is the table's
        with open(tmp_path / "demo" / stage["stage"] / "metrics.json") as f:
            scored = [row for row in json.load(f) if row.get("mean_iu") is not None]
        assert len(scored) > 1 and scored[-1]["mean_iu"] == stage["mean_iu"]
    assert os.path.isfile(tmp_path / "demo" / "examples.png")
    assert os.path.isfile(tmp_path / "demo" / "plots" / "stages.png")


def test_user_errors(trained, capsys, tmp_path):
    root, data, run_dir = trained
    ckpt = os.path.join(run_dir, "checkpoints", "last.pt")
    bad_label = str(tmp_path / "bad")
    import shutil

    shutil.copytree(data, bad_label)
    Image.open(os.path.join(data, "SegmentationClass", "syn_000004.png")).resize((10, 10)).save(
        os.path.join(bad_label, "SegmentationClass", "syn_000004.png"))
    cases = [
        (["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r1"), *TRAIN], "does not exist"),
        (["train", "--data", data, "--out", run_dir, *TRAIN], "already holds a run"),
        (["eval", str(tmp_path / "none.pt"), "--data", data], "none.pt does not exist"),
        (["eval", ckpt, "--data", data, "--split", "test"], "test.txt does not exist"),
        (["eval", ckpt, "--data", bad_label, "--no-progress"], "syn_000004.png is 10x10"),
        (["predict", str(tmp_path / "nope.png"), "--checkpoint", ckpt, "--out", str(tmp_path / "p")],
         "nope.png does not exist"),
        (["make-data", data], "already exists"),
    ]
    for argv, message in cases:
        code, out, err = run(argv, capsys)
        assert code == 1, argv
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "p") and not os.path.exists(tmp_path / "r1" / "summary.json")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--no-such-option"])
    assert exc.value.code == 2


def test_console_entry_point_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fcn_fast.cli", "eval", str(tmp_path / "x.pt"), "--data", "nowhere"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"fcn-fast eval: error: checkpoint {tmp_path / 'x.pt'} does not exist"

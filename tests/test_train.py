"""Training: a short run lowers the loss and fills its run folder; resume after a simulated interrupt equals an
uninterrupted run; staged init and checkpoint mistakes; DDP with 2 gloo processes equals one process."""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from fcn_fast.checkpoint import load_checkpoint, model_from_checkpoint
from fcn_fast.data import make_synthetic
from fcn_fast.errors import UserError
from fcn_fast.train import TrainConfig, train
from pipeline_helpers import REPO

SMALL = dict(width=1 / 16, geometry="same", optimizer="adamw", lr=2e-3, loss_reduction="mean", threads=1,
             progress=False, log_every=2)


def _free_port() -> int:
    """A port nothing listens on now, so parallel or repeated runs do not collide on a fixed rendezvous port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp("d") / "syn"), train=6, val=2, size=(48, 48), seed=1)


def test_short_run_lowers_the_loss(data, tmp_path):
    out = str(tmp_path / "run")
    summary = train(TrainConfig(out=out, data=data, epochs=4, dropout=0.0, **SMALL))
    with open(os.path.join(out, "metrics.json")) as f:
        history = json.load(f)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4] and history[-1]["step"] == 24
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert 0 <= history[-1]["mean_iu"] <= 1 and summary["final"]["mean_iu"] == history[-1]["mean_iu"]
    for name in ("config.json", "log.txt", "metrics.csv", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt",
                 "plots/loss.png", "plots/mean_iu.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "plots", "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "metrics.csv")) as f:
        assert len(f.read().strip().splitlines()) == 5
    with pytest.raises(UserError, match="already holds a run"):
        train(TrainConfig(out=out, data=data, **SMALL))


class Interrupt(Exception):
    pass


def test_resume_equals_an_uninterrupted_run(data, tmp_path):
    # Dropout, loss sampling and augmentation all draw random numbers; checkpoints mid-epoch and at epoch ends.
    base = TrainConfig(out="", data=data, steps=10, checkpoint_every=4, dropout=0.5, loss_sampling=0.3,
                       flip=True, scale=(0.75, 1.25), **SMALL)
    full = train(dataclasses.replace(base, out=str(tmp_path / "a")))

    def stop(step):
        if step == 9:  # the last checkpoint was at step 8: step 9 is lost and must be redone identically
            raise Interrupt

    interrupted = str(tmp_path / "b")
    with pytest.raises(Interrupt):
        train(dataclasses.replace(base, out=interrupted), hooks={"after_step": stop})
    assert not os.path.exists(os.path.join(interrupted, "summary.json"))
    assert load_checkpoint(os.path.join(interrupted, "checkpoints", "last.pt"))["train"]["step"] == 8
    resumed = train(dataclasses.replace(base, out=interrupted, resume=True))
    assert resumed["steps"] == full["steps"] == 10

    a = load_checkpoint(full["checkpoint"])
    b = load_checkpoint(resumed["checkpoint"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for pa, pb in zip(a["train"]["optimizer"]["state"].values(), b["train"]["optimizer"]["state"].values()):
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), k
    assert torch.equal(a["train"]["rng"][0]["torch"], b["train"]["rng"][0]["torch"])
    def scores(history):  # everything but the wall time; repr so that NaN (absent classes) equals NaN
        return repr([{k: v for k, v in row.items() if k != "time_s"} for row in history])

    assert scores(a["train"]["history"]) == scores(b["train"]["history"])
    assert a["train"]["trace"] == b["train"]["trace"]


def test_staged_init_and_wrong_checkpoints(data, tmp_path):
    s32 = train(TrainConfig(out=str(tmp_path / "32"), data=data, model="fcn32s", steps=2, val_split=None, **SMALL))
    s16 = train(TrainConfig(out=str(tmp_path / "16"), data=data, model="fcn16s", steps=1, lr=1e-12,
                            init_from=s32["checkpoint"], val_split=None, **{k: v for k, v in SMALL.items() if k != "lr"}))
    m32, _ = model_from_checkpoint(s32["checkpoint"])
    m16, _ = model_from_checkpoint(s16["checkpoint"])
    # A tiny LR barely moves the copied layers: they are FCN-32s's.
    torch.testing.assert_close(m16.conv1_1.weight, m32.conv1_1.weight, rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="holds a fcn16s model, not fcn32s"):
        model_from_checkpoint(s16["checkpoint"], expect="fcn32s")
    with pytest.raises(UserError, match=r"--init-from .*fcn16s.*score_pool4"):
        train(TrainConfig(out=str(tmp_path / "x"), data=data, model="fcn32s", steps=1, init_from=s16["checkpoint"],
                          **SMALL))
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(2)}, bogus)
    with pytest.raises(UserError, match="is not an fcn_fast checkpoint"):
        load_checkpoint(str(bogus))
    with pytest.raises(UserError, match="nothing to resume"):
        train(TrainConfig(out=str(tmp_path / "none"), data=data, resume=True, **SMALL))


def test_ddp_two_gloo_processes_equal_one_process(data, tmp_path):
    # DDP on 2 processes x batch 1 averages the gradients of the two images; one process with batch 2 and the mean
    # loss computes the same step (equal-size images, no ignored pixels): DistributedSampler hands rank r the
    # images r, r+2, ... of the same permutation.
    args = ["train", "--data", data, "--model", "fcn16s", "--width", "0.0625", "--geometry", "same", "--dropout",
            "0", "--optimizer", "adamw", "--lr", "2e-3", "--loss-reduction", "mean", "--steps", "3",
            "--device", "cpu", "--threads", "1", "--no-progress", "--val-split", "val"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp_out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "fcn_fast.cli", *args, "--out", ddp_out, "--batch-size", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(TrainConfig(out=str(tmp_path / "one"), data=data, model="fcn16s", steps=3, batch_size=2,
                               dropout=0.0, device="cpu", **{k: v for k, v in SMALL.items() if k != "log_every"}))
    a = load_checkpoint(os.path.join(ddp_out, "checkpoints", "last.pt"))
    b = load_checkpoint(single["checkpoint"])
    assert len(a["train"]["rng"]) == 2 and a["train"]["step"] == 3
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=1e-3, atol=1e-4)  # AdamW amplifies float noise of tiny gradients
    with open(os.path.join(ddp_out, "config.json")) as f:
        assert json.load(f)["world_size"] == 2
    assert 0 <= a["train"]["history"][-1]["mean_iu"] <= 1


def test_evaluating_during_training_leaves_the_training_unchanged(data, tmp_path):
    # The demo evaluates every few epochs to draw its curves and reports the same scores as without: evaluation
    # must draw no random numbers (dropout and loss sampling here would see them) and leave the weights alone.
    runs = {}
    for every in (0, 1):
        out = str(tmp_path / f"every{every}")
        runs[every] = train(TrainConfig(out=out, data=data, epochs=3, dropout=0.5, loss_sampling=0.2,
                                        eval_every=every, **SMALL))
        with open(os.path.join(out, "metrics.json")) as f:
            assert sum(r.get("mean_iu") is not None for r in json.load(f)) == (3 if every else 1)
    weights = [load_checkpoint(runs[every]["checkpoint"])["state_dict"] for every in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    assert runs[0]["final"] == runs[1]["final"]

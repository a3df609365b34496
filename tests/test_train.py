"""Training: a short run lowers the loss and fills its run folder; resume after a simulated interrupt equals an
uninterrupted run; staged init and checkpoint mistakes; DDP with 2 gloo processes equals one process."""

import dataclasses
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from fcn_fast.checkpoint import load_checkpoint, model_from_checkpoint
from fcn_fast.cli import main
from fcn_fast.data import make_synthetic
from fcn_fast.errors import UserError
from fcn_fast.train import TrainConfig, train
from pipeline_helpers import REPO

SMALL = dict(width=1 / 16, geometry="same", optimizer="adamw", lr=2e-3, loss_reduction="mean", threads=1,
             progress=False, log_every=2)


LR_DDP, ATOL_DDP = "0.01", 1e-5


def _cli(args, *, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` (e.g. -m fcn_fast.cli train ...) in the repository, one thread per process."""
    return subprocess.run([sys.executable, *args], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)


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

    _assert_same_run(full["checkpoint"], resumed["checkpoint"])


def test_resume_keeps_the_runs_length_and_intervals_unless_given(data, tmp_path):
    out = str(tmp_path / "run")
    train(TrainConfig(out=out, data=data, steps=2, checkpoint_every=1, val_split=None, **SMALL))
    again = {k: v for k, v in SMALL.items() if k != "log_every"}
    assert train(TrainConfig(out=out, resume=True, **again))["steps"] == 2  # done: nothing more
    assert train(TrainConfig(out=out, resume=True, steps=3, **again))["steps"] == 3
    config = load_checkpoint(os.path.join(out, "checkpoints", "last.pt"))["train"]["config"]
    assert (config["steps"], config["checkpoint_every"], config["log_every"]) == (3, 1, 2)
    with pytest.raises(UserError, match="--log-every must be at least 1"):
        train(TrainConfig(out=out, resume=True, log_every=0, **again))


def _assert_same_run(path_a, path_b) -> None:
    """Two runs' checkpoints hold bitwise the same weights, optimiser state, RNG state, history and loss trace."""
    a, b = load_checkpoint(str(path_a)), load_checkpoint(str(path_b))
    assert a["train"]["step"] == b["train"]["step"]
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


# Dropout, loss sampling and augmentation all draw random numbers; checkpoints mid-epoch (every 2 steps) and at the
# ends of the 6-step epochs.
KILLED_RUN = ["-m", "fcn_fast.cli", "train", "--model", "fcn32s", "--width", "0.0625", "--geometry", "same",
              "--optimizer", "adamw", "--lr", "2e-3", "--loss-reduction", "mean", "--dropout", "0.5",
              "--loss-sampling", "0.3", "--flip", "--scale", "0.75", "1.25", "--steps", "12", "--checkpoint-every", "2"]
RUNTIME = ["--threads", "1", "--no-progress"]


def _kill_when(proc: subprocess.Popen, ready, err_path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"exited ({proc.returncode}) before it could be killed: {open(err_path).read()}"
        assert time.monotonic() < deadline, "timed out waiting to kill the run"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(data, tmp_path):
    full = tmp_path / "full"  # the same command in this process: every process start costs a torch import
    assert main([*KILLED_RUN[2:], "--data", data, "--out", str(full), *RUNTIME]) == 0
    out, err = tmp_path / "killed", str(tmp_path / "stderr.txt")
    checkpoints = out / "checkpoints"

    def start(args, env=None):
        with open(err, "w") as f:
            return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=f,
                                    env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))

    # Killed half way through writing its third checkpoint (last.pt at step 6): the second (step 4) stays whole.
    marker = tmp_path / "paused"
    proc = start([*KILLED_RUN, "--data", data, "--out", str(out), *RUNTIME],
                 env={"FCN_FAST_TEST_PAUSE_SAVE": f"3:{marker}"})
    _kill_when(proc, marker.exists, err)
    partial = list(checkpoints.glob(".last.pt.tmp*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0, partial
    assert load_checkpoint(str(checkpoints / "last.pt"))["train"]["step"] == 4

    # Resumed with nothing but --resume (the run's own length and intervals), and killed at random moments after it
    # has set up (checkpoint writes included: one every 2 steps).
    rng = random.Random(0)
    log = out / "log.txt"
    for _ in range(2):
        starts = log.read_text().count("resuming")
        proc = start(["-m", "fcn_fast.cli", "train", "--out", str(out), "--resume", *RUNTIME])
        wake = time.monotonic() + rng.uniform(0, 1.5)
        _kill_when(proc, lambda: log.read_text().count("resuming") > starts and time.monotonic() > wake, err)
        assert not partial[0].exists()  # the killed writer's partial file was removed
        assert 4 <= load_checkpoint(str(checkpoints / "last.pt"))["train"]["step"] <= 12

    assert main(["train", "--out", str(out), "--resume", *RUNTIME]) == 0
    with open(out / "summary.json") as f:
        assert json.load(f)["steps"] == 12
    assert not list(checkpoints.glob(".*.tmp*"))
    _assert_same_run(full / "checkpoints" / "last.pt", checkpoints / "last.pt")
    _assert_same_run(full / "checkpoints" / "best.pt", checkpoints / "best.pt")


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


def test_ddp_two_gloo_processes_average_gradients_as_one_process_with_their_batch(data, tmp_path):
    # DDP on 2 processes x batch 1 averages the gradients of the two images; one process with batch 2 and the mean
    # loss computes the same step (equal-size images, no ignored pixels): DistributedSampler hands rank r the
    # images r, r+2, ... of the same permutation. SGD's step is proportional to the gradient, so summed instead of
    # averaged gradients would double it (AdamW's normalised step could not tell).
    args = ["--data", data, "--model", "fcn16s", "--width", "0.0625", "--geometry", "same", "--dropout", "0",
            "--optimizer", "sgd", "--momentum", "0.9", "--weight-decay", "0", "--loss-reduction", "mean", "--steps", "3", "--device", "cpu",
            "--threads", "1", "--no-progress", "--val-split", "val"]
    ddp_out = str(tmp_path / "ddp")
    proc = _cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                 "-m", "fcn_fast.cli", "train", *args, "--lr", LR_DDP, "--out", ddp_out, "--batch-size", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_checkpoint(os.path.join(ddp_out, "checkpoints", "last.pt"))
    assert len(a["train"]["rng"]) == 2 and a["train"]["step"] == 3
    with open(os.path.join(ddp_out, "config.json")) as f:
        assert json.load(f)["world_size"] == 2
    assert 0 <= a["train"]["history"][-1]["mean_iu"] <= 1

    def single(name, lr):
        assert main(["train", *args, "--lr", lr, "--out", str(tmp_path / name), "--batch-size", "2"]) == 0
        return load_checkpoint(str(tmp_path / name / "checkpoints" / "last.pt"))["state_dict"]

    same, doubled = single("one", LR_DDP), single("doubled", str(2 * float(LR_DDP)))  # = summed gradients
    for key, value in same.items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=0, atol=ATOL_DDP)
    # The step of summed gradients is far outside that tolerance.
    assert max((doubled[k] - same[k]).abs().max().item() for k in same) > 100 * ATOL_DDP


def _all_finite(path) -> bool:
    state = load_checkpoint(str(path))["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoints(tmp_path, capsys):
    # SGD on the summed loss with --lr 1e-3 diverges within a few steps (the loss is ~40 at step 2, then overflows);
    # 2 training images make an epoch, with its evaluation and checkpoints, every 2 steps.
    data = make_synthetic(str(tmp_path / "data"), train=2, val=1, size=(48, 48), seed=1)
    args = ["train", "--data", data, "--model", "fcn32s", "--width", "0.0625", "--geometry", "same", "--dropout", "0",
            "--optimizer", "sgd", "--loss-reduction", "sum", "--lr", "1e-3", "--steps", "6", *RUNTIME]
    out = tmp_path / "run"
    proc = _cli(["-m", "fcn_fast.cli", *args, "--out", str(out)])
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcn-fast train: error: non-finite loss"), proc.stderr[-3000:]
    found = re.search(r"non-finite loss \((nan|inf|-inf)\) at step (\d+) of 6: training stopped", lines[0])
    assert found, lines[0]
    bad = int(found.group(2))
    assert bad > 2, "the loss must stay finite through the first epoch for this test to mean anything"
    last, best = out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt"
    saved = load_checkpoint(str(last))["train"]["step"]
    assert saved < bad and _all_finite(last) and _all_finite(best)
    assert f"the last good weights are in {last} (step {saved}) (and the best so far in {best})" in lines[0]
    assert f"`fcn-fast train --out {out} --resume`" in lines[0] and "--skip-nonfinite" in lines[0]
    assert not (out / "summary.json").exists()
    assert lines[0].split("error: ", 1)[1] in (out / "log.txt").read_text()

    # --skip-nonfinite from the start skips that step first: the step named was the first non-finite one.
    skipped = tmp_path / "skipped"
    assert main([*args, "--out", str(skipped), "--skip-nonfinite"]) == 0
    printed = capsys.readouterr().out
    first = re.search(r"step (\d+): non-finite loss \((nan|inf|-inf)\), step skipped", printed)
    assert first and int(first.group(1)) == bad, printed
    with open(skipped / "summary.json") as f:
        summary = json.load(f)
    assert summary["steps"] == 6 and summary["skipped_steps"] >= 1
    assert _all_finite(skipped / "checkpoints" / "last.pt")

    # The stopped run resumes with --skip-nonfinite, as its message says, to the same end.
    assert main(["train", "--out", str(out), "--resume", "--skip-nonfinite", *RUNTIME]) == 0
    _assert_same_run(skipped / "checkpoints" / "last.pt", last)


def test_damaged_checkpoints_get_a_clear_message_and_are_not_loaded(data, tmp_path, capsys):
    run = train(TrainConfig(out=str(tmp_path / "run"), data=data, steps=1, val_split=None, **SMALL))
    whole = open(run["checkpoint"], "rb").read()
    truncated, garbage = tmp_path / "truncated.pt", tmp_path / "garbage.pt"
    truncated.write_bytes(whole[: len(whole) // 2])
    garbage.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(4096)))
    for path in (truncated, garbage):
        with pytest.raises(UserError, match=rf"cannot read checkpoint {path}: it is not a whole torch.save archive"):
            load_checkpoint(str(path))
    # A flipped byte inside the tensor data: torch.load would return the damaged weights without a word.
    with zipfile.ZipFile(run["checkpoint"]) as archive:
        record = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 64)
    start = record.header_offset + 30 + len(record.filename.encode()) + len(record.extra) + record.file_size // 2
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(whole[:start] + bytes([whole[start] ^ 0xFF]) + whole[start + 1:])
    with pytest.raises(UserError, match=r"it is damaged \(its record .*/data/\d+ fails its checksum\)"):
        load_checkpoint(str(flipped))
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "fcn_fast.checkpoint/1", "hook": Interrupt()}, unsafe)
    with pytest.raises(UserError, match="other than tensors and plain data.*not loaded, since unpickling them can run"):
        load_checkpoint(str(unsafe))

    # Through the commands: one line, exit status 1, and never the advice to load without weights_only.
    for path in (truncated, garbage, flipped, unsafe):
        assert main(["eval", str(path), "--data", data, "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot read checkpoint {path}" in err and "weights_only" not in err, err
    os.replace(truncated, os.path.join(os.path.dirname(run["checkpoint"]), "last.pt"))
    assert main(["train", "--out", run["run"], "--resume", *RUNTIME]) == 1
    assert "it is not a whole torch.save archive" in capsys.readouterr().err


def test_ddp_processes_stop_together_at_a_nonfinite_loss(tmp_path):
    # Each process checks the flags of all (an all-reduce at the check): none may stop alone and leave the others
    # waiting in the next gradient all-reduce.
    data = make_synthetic(str(tmp_path / "data"), train=4, val=1, size=(48, 48), seed=1)
    out = tmp_path / "ddp"
    proc = _cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                 "-m", "fcn_fast.cli", "train", "--data", data, "--model", "fcn32s", "--width", "0.0625", "--geometry",
                 "same", "--dropout", "0", "--optimizer", "sgd", "--lr", "1e-3", "--steps", "12", "--device", "cpu",
                 "--out", str(out), *RUNTIME], timeout=240)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fcn-fast train: error: non-finite loss")]
    assert len(errors) == 2, proc.stderr[-3000:]  # both processes, at the same step
    assert len({re.search(r"at step (\d+)", line).group(1) for line in errors}) == 1
    assert _all_finite(out / "checkpoints" / "last.pt")

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

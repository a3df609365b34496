"""Smoke tests of the benchmark suite (fcn_fast.bench): a --quick run writes its JSON, markdown and charts, and a
provider that computes the wrong thing is failed by the correctness gate instead of being timed. Correctness only:
no test here asserts a speed."""

import json

import pytest
import torch

from fcn_fast import bench
from fcn_fast.bench import report
from fcn_fast.bench.cases import OPS, build_cases
from harness import requires_backend

QUICK_OPS = "upsample_add,softmax_cross_entropy"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--ops", QUICK_OPS, "--device", "cpu", "--out", str(out), "--name", "q"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_quick_run_writes_results(quick_run):
    doc = json.loads((quick_run / "q.json").read_text())
    env = doc["env"]
    for key in ("device_name", "torch", "triton", "cuda", "cpu_model", "cpu_threads", "date_utc", "git_commit"):
        assert key in env
    assert doc["copy_bandwidth"]["gbps"] > 0
    rows = doc["rows"]
    assert {r["op"] for r in rows} == set(QUICK_OPS.split(","))
    eager = [r for r in rows if r["provider"] == "eager"]
    assert eager and all(r["status"] == "ok" for r in eager)
    for r in eager:
        assert r["check"]["ok"] and r["check"]["error"] <= r["check"]["tol"]
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["speedup_vs_eager"] == pytest.approx(1.0)
        assert r["bytes"] > 0 and r["gbps"] > 0 and r["bytes_formula"]
        assert r["peak_bytes"] > 0  # eager allocates at least its output
    for r in rows:  # every row is either measured after passing its check, or says why not
        assert r["device_name"] == env["device_name"] and r["torch"] == torch.__version__
        assert r["status"] in ("ok", "failed", "skipped")
        assert r["status"] == "ok" or r["reason"]
    md = (quick_run / "q.md").read_text()
    assert "## upsample_add" in md and "## softmax_cross_entropy" in md and "| eager |" in md
    assert (quick_run / "q_upsample_add.png").stat().st_size > 0


def test_compare_and_report(quick_run, tmp_path):
    path = quick_run / "q.json"
    assert bench.main(["compare", str(path), str(path), "-o", str(tmp_path / "c.md")]) == 0
    text = (tmp_path / "c.md").read_text()
    assert "| upsample_add |" in text and "| 1.00 |" in text
    copy = tmp_path / "r.json"
    copy.write_text(path.read_text())
    assert bench.main(["report", str(copy), "--no-plots"]) == 0
    assert (tmp_path / "r.md").read_text().startswith("# fcn_fast benchmark")


@requires_backend("cpu")  # the fused provider the wrong one stands in for
def test_wrong_provider_is_not_timed(tmp_path, monkeypatch):
    op = OPS["softmax_cross_entropy"]
    eager = op.eager

    def wrong(s, device, dtype, backend):
        provider = eager(s, device, dtype)
        fn = provider.fn
        provider.fn, provider.name = (lambda inp: fn(inp) * 1.01), f"fcn_fast:{backend}"
        return provider

    monkeypatch.setattr(op, "fused", wrong)
    bench.main(["--quick", "--ops", "softmax_cross_entropy", "--device", "cpu", "--modes", "forward",
                "--out", str(tmp_path), "--name", "w", "--no-plots"])
    rows = report.load(tmp_path / "w.json")["rows"]
    fused = [r for r in rows if r["provider"].startswith("fcn_fast:")]
    assert fused and all(r["status"] == "failed" and "median_ms" not in r for r in fused)
    assert all(r["check"]["error"] > r["check"]["tol"] for r in fused)
    assert [r["status"] for r in rows if r["provider"] == "eager"] == ["ok"]


def test_full_suite_declares_every_case():
    cpu, gpu = build_cases("cpu", quick=False), build_cases("cuda", quick=False)
    assert {c.op for c in gpu} == set(OPS)
    assert {c.dtype for c in gpu} == {"fp32", "bf16", "fp16"}
    labels = {c.shape.label for c in gpu}
    assert {"caffe500 upscore8", "voc512 x2+skip", "cityscapes x8", "ade512 x8"} <= labels
    assert all(c.shape.note for c in cpu if c.shape.n < 2 and c.shape.label.startswith(("voc", "city", "ade")))
    with pytest.raises(ValueError, match="unknown op"):
        build_cases("cpu", quick=True, ops=["nope"])

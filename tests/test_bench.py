"""Smoke tests of the benchmark suite (fcn_fast.bench): --quick runs append their rows to the data file, the set's
report, comparisons and charts are made from that file, and a provider that computes the wrong thing is failed by the
correctness gate instead of being timed. Correctness only: no test here asserts a speed."""

import json

import pytest
import torch

from fcn_fast import bench
from fcn_fast.bench import results
from fcn_fast.bench.cases import OPS, build_cases
from harness import requires_backend

QUICK_OPS = "upsample_add,softmax_cross_entropy"


def _bench(*argv):
    threads = torch.get_num_threads()
    try:
        return bench.main(list(argv))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Two runs into one folder: the quick suite of two ops, then one op's forward alone."""
    out = tmp_path_factory.mktemp("bench")
    assert _bench("--quick", "--ops", QUICK_OPS, "--device", "cpu", "--out", str(out)) == 0
    first = (out / "runs.jsonl").read_text()
    assert _bench("--quick", "--ops", "softmax_cross_entropy", "--modes", "forward", "--device", "cpu",
                  "--out", str(out), "--no-plots") == 0
    return out, first


def test_runs_append_rows_to_one_data_file(quick_runs):
    out, first = quick_runs
    text = (out / "runs.jsonl").read_text()
    assert text.startswith(first)  # appended, nothing rewritten
    data = results.load(out / "runs.jsonl")
    assert len(data.runs) == 2 and set(data.elapsed) == set(data.runs)  # both ran to their end
    one, two = data.runs
    env = data.runs[one]["env"]
    for key in ("device_name", "torch", "triton", "cuda", "cpu_model", "cpu_threads", "date_utc", "git_commit"):
        assert key in env
    assert data.runs[one]["copy_bandwidth"]["gbps"] > 0 and data.runs[one]["quick"]
    rows = data.rows_of([one])
    assert {r["op"] for r in rows} == set(QUICK_OPS.split(","))
    assert {r["op"] for r in data.rows_of([two])} == {"softmax_cross_entropy"}
    name = results.set_name(env, "fp32", quick=True)
    assert name == f"cpu-{results.device_slug(env['device_name'])}_fp32_{env['cpu_threads']}t_quick"
    eager = [r for r in rows if r["provider"] == "eager"]
    assert eager and all(r["status"] == "ok" for r in eager)
    for r in eager:
        assert r["check"]["ok"] and r["check"]["error"] <= r["check"]["tol"]
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["speedup_vs_eager"] == pytest.approx(1.0)
        assert r["bytes"] > 0 and r["gbps"] > 0 and r["bytes_formula"]
        assert r["peak_bytes"] > 0  # eager allocates at least its output
    for r in data.rows:  # every row says where it comes from, and is measured after its check or says why not
        assert r["set"] == name and r["device_name"] == env["device_name"] and r["torch"] == torch.__version__
        assert r["git_commit"] == env["git_commit"] and r["date_utc"] == data.runs[r["run"]]["env"]["date_utc"]
        assert r["status"] in ("ok", "failed", "skipped")
        assert r["status"] == "ok" or r["reason"]
    for line in text.splitlines():
        assert json.loads(line)["record"] in ("run", "row", "end")


def test_set_report_is_the_latest_run_per_case(quick_runs):
    out, _ = quick_runs
    data = results.load(out / "runs.jsonl")
    one, two = data.runs
    (name,) = data.sets()
    current = data.current(name)
    # The second run measured softmax CE forward only: that case comes from it, everything else from the first.
    for r in current:
        newer = r["op"] == "softmax_cross_entropy" and r["mode"] == "forward"
        assert r["run"] == (two if newer else one), (r["op"], r["mode"], r["run"])
    assert {results.case_key(r) for r in current} == {results.case_key(r) for r in data.rows_of([one])}
    md = (out / f"{name}.md").read_text()
    assert md.startswith(f"# fcn_fast benchmark: {name}")
    assert "## upsample_add" in md and "## softmax_cross_entropy" in md and "| eager |" in md
    assert f"`{one}`" in md and f"`{two}`" in md  # rows from two runs say which
    assert (out / f"{name}.png").stat().st_size > 0  # drawn by the first run; the second ran with --no-plots
    (out / f"{name}.md").unlink()
    assert _bench("report", "--results", str(out)) == 0
    assert (out / f"{name}.md").read_text() == md


def test_compare_and_chart_from_the_data_file(quick_runs, tmp_path):
    out, _ = quick_runs
    data = results.load(out / "runs.jsonl")
    one, two = data.runs
    (name,) = data.sets()
    assert _bench("compare", one, two, "--results", str(out), "-o", str(tmp_path / "c.md")) == 0
    text = (tmp_path / "c.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| softmax_cross_entropy |")]
    assert rows and all("| forward |" in line for line in rows)  # only what both runs measured
    assert _bench("compare", name, one, "--results", str(out), "-o", str(tmp_path / "same.md")) == 0
    assert "| upsample_add |" in (tmp_path / "same.md").read_text()
    assert _bench("chart", "--results", str(out), "-o", str(tmp_path)) == 0
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert _bench("chart", two, "--results", str(out), "-o", str(tmp_path)) == 0
    assert (tmp_path / f"{name}_{two}.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no set or run matches"):
        _bench("compare", "nothing-like-this", one, "--results", str(out))


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
    _bench("--quick", "--ops", "softmax_cross_entropy", "--device", "cpu", "--modes", "forward",
           "--out", str(tmp_path), "--no-plots")
    rows = results.load(tmp_path / "runs.jsonl").rows
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

"""The suite's results as data: one JSON-lines file that every run appends to, and the selections that reports,
comparisons and charts are made from.

Each line of ``runs.jsonl`` is one record:

    {"record": "run", "schema": 2, "run": ID, "env": {...}, "copy_bandwidth": {...}, "argv": [...], "quick": bool}
    {"record": "row", "run": ID, "set": SET, <device, versions, threads, date, commit>, <op, case, ..., median_ms, ...>}
    {"record": "end", "run": ID, "elapsed_s": seconds}

A run writes its "run" record first and its rows after each case group, so a run stopped at a time limit keeps what
it measured (and has no "end" record). Every row repeats the device, versions, threads, date and commit, so rows can
be filtered and pooled on their own (``pandas.read_json(path, lines=True)``). A row's ``set`` names the (device,
dtype, threads) it belongs to, e.g. ``cpu-amd-epyc_fp32_1t``; a set's current results are, per case, the rows of
the latest run that measured that case.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

SCHEMA = 2
DATA_FILE = "runs.jsonl"
# What every row repeats from its run's environment.
ROW_ENV = ("device_type", "device_name", "cpu_threads", "torch", "triton", "cuda", "date_utc", "git_commit")


class Results:
    """The records of one data file: runs (id -> run record, in file order), their rows, elapsed times."""

    def __init__(self, runs: Dict[str, dict], rows: List[dict], elapsed: Dict[str, float]):
        self.runs, self.rows, self.elapsed = runs, rows, elapsed

    def sets(self) -> List[str]:
        return sorted({r["set"] for r in self.rows})

    def rows_of(self, run_ids: Iterable[str]) -> List[dict]:
        wanted = set(run_ids)
        return [r for r in self.rows if r["run"] in wanted]

    def match(self, selector: str) -> List[str]:
        """Run ids matching a selector: a run id or its prefix, or a git commit (prefix)."""
        return [rid for rid, run in self.runs.items()
                if rid.startswith(selector) or (run["env"].get("git_commit") or "").startswith(selector)]

    def current(self, set_name: str) -> List[dict]:
        """The set's current rows: per (op, case, dtype, mode), the rows of the latest run that measured it (a run
        that only recorded it as skipped, e.g. at its time budget, does not replace an earlier measurement)."""
        mine = [r for r in self.rows if r["set"] == set_name]
        order = {rid: i for i, rid in enumerate(sorted(self.runs, key=lambda rid: self.runs[rid]["env"]["date_utc"]))}
        best: Dict[tuple, Tuple[bool, int]] = {}
        for r in mine:
            rank = (r["status"] != "skipped", order[r["run"]])
            best[case_key(r)] = max(best.get(case_key(r), rank), rank)
        chosen = [r for r in mine if order[r["run"]] == best[case_key(r)][1]]
        # Newest run's case order first, so the tables follow the suite's order.
        newest = sorted(order, key=order.get, reverse=True)
        position: Dict[tuple, int] = {}
        for rid in newest:
            for r in chosen:
                if r["run"] == rid:
                    position.setdefault(case_key(r), len(position))
        return sorted(chosen, key=lambda r: position[case_key(r)])


def case_key(row: dict) -> tuple:
    return row["op"], row["case"], row["dtype"], row["mode"]


def row_key(row: dict) -> tuple:
    return case_key(row) + (row["provider"],)


def device_slug(name: str) -> str:
    """'AMD EPYC' -> 'amd-epyc', 'Intel(R) Xeon(R) Processor' -> 'intel-xeon', 'NVIDIA H100 80GB HBM3' ->
    'nvidia-h100-80gb-hbm3'."""
    name = re.sub(r"\((R|TM)\)|\bCPU\b|\bProcessor\b|@.*$", " ", name, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def set_name(env: dict, dtype: str, quick: bool = False) -> str:
    """The (device, dtype, threads) a row belongs to, and the stem of its report: cpu-amd-epyc_fp32_1t."""
    threads = f"_{env['cpu_threads']}t" if env["device_type"] == "cpu" else ""
    return f"{env['device_type']}-{device_slug(env['device_name'])}_{dtype}{threads}" + ("_quick" if quick else "")


def run_id(env: dict, taken: Sequence[str] = ()) -> str:
    """When and at which commit: 20261201T145350Z-9813863 (a suffix if that is taken)."""
    when = datetime.datetime.fromisoformat(env["date_utc"]).astimezone(datetime.timezone.utc)
    base = f"{when:%Y%m%dT%H%M%SZ}-{(env.get('git_commit') or 'nogit')[:7]}"
    rid, n = base, 1
    while rid in taken:
        n += 1
        rid = f"{base}-{n}"
    return rid


def _append(path: Path, records: Iterable[dict]) -> None:
    lines = "".join(json.dumps(r, default=str) + "\n" for r in records)
    with open(path, "a") as f:  # one write per call: whole lines, even with another run appending
        f.write(lines)


class RunWriter:
    """Appends one run to a data file: its record at the start, its rows as they come, its elapsed time at the end."""

    def __init__(self, path: Path, env: dict, copy_bw: dict, argv: Sequence[str], quick: bool):
        self.path, self.env, self.quick = Path(path), env, quick
        self.path.parent.mkdir(parents=True, exist_ok=True)
        taken = load(self.path).runs if self.path.exists() else {}
        self.run = run_id(env, list(taken))
        self.written = 0
        self.sets: List[str] = []
        _append(self.path, [{"record": "run", "schema": SCHEMA, "run": self.run, "env": env,
                             "copy_bandwidth": copy_bw, "argv": list(argv), "quick": quick}])

    def rows(self, rows: Sequence[dict]) -> None:
        """Appends the rows not written yet (the suite passes all its rows after each case group)."""
        stamp = {k: self.env.get(k) for k in ROW_ENV}
        new = []
        for r in rows[self.written:]:
            name = set_name(self.env, r["dtype"], self.quick)
            if name not in self.sets:
                self.sets.append(name)
            new.append({"record": "row", "run": self.run, "set": name, **stamp, **r})
        self.written = len(rows)
        _append(self.path, new)

    def end(self, elapsed_s: float) -> None:
        _append(self.path, [{"record": "end", "run": self.run, "elapsed_s": elapsed_s}])


def load(path) -> Results:
    runs: Dict[str, dict] = {}
    rows: List[dict] = []
    elapsed: Dict[str, float] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        kind = rec.get("record")
        if kind == "run":
            if rec.get("schema") != SCHEMA:
                raise ValueError(f"{path}:{number}: results schema {rec.get('schema')!r}, expected {SCHEMA}")
            runs[rec["run"]] = rec
        elif kind == "row":
            rows.append(rec)
        elif kind == "end":
            elapsed[rec["run"]] = rec["elapsed_s"]
        else:
            raise ValueError(f"{path}:{number}: unknown record {kind!r}")
    orphans = {r["run"] for r in rows} - set(runs)
    if orphans:
        raise ValueError(f"{path}: rows of runs without a run record: {sorted(orphans)}")
    return Results(runs, rows, elapsed)


def select(results: Results, selector: str, set_filter: Optional[str] = None) -> Tuple[List[dict], str]:
    """Rows for a report, comparison or chart, and a name for them. The selector is a set name (its current
    rows), or a run id / commit prefix (those runs' rows, the latest per row where runs repeat one);
    ``set_filter`` keeps one set's rows."""
    if selector in results.sets():
        if set_filter and set_filter != selector:
            raise ValueError(f"{selector!r} is a set; --set {set_filter!r} names another")
        return results.current(selector), selector
    ids = results.match(selector)
    if not ids:
        raise ValueError(f"no set or run matches {selector!r}; sets: {', '.join(results.sets()) or 'none'} "
                         f"(`fcn-fast bench runs` lists the runs)")
    rows = [r for r in results.rows_of(ids) if set_filter is None or r["set"] == set_filter]
    if not rows:
        raise ValueError(f"runs {ids} have no rows in set {set_filter!r}")
    by_key: Dict[tuple, dict] = {}
    for r in sorted(rows, key=lambda r: results.runs[r["run"]]["env"]["date_utc"]):
        by_key[row_key(r)] = r  # the latest wins
    clash = {row_key(r) for r in rows if r["set"] != by_key[row_key(r)]["set"]}
    if clash:
        sets = sorted({r["set"] for r in rows if row_key(r) in clash})
        raise ValueError(f"{selector!r} matches the same cases in several sets ({', '.join(sets)}): add --set")
    order = {id(r): i for i, r in enumerate(rows)}
    return sorted(by_key.values(), key=lambda r: order[id(r)]), selector

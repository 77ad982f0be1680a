"""The memory-scaling benchmark's smoke mode runs in the suite, so the script cannot rot."""

from __future__ import annotations

import json

import pytest
from procs import run_benchmark_smoke


@pytest.mark.slow
def test_memory_scaling_benchmark_smoke(tmp_path):
    run_benchmark_smoke("bench_memory_scaling.py", tmp_path, timeout_s=300)
    assert (tmp_path / "bench_memory_scaling_smoke.md").read_text().startswith("# ")
    assert (tmp_path / "bench_memory_scaling_smoke.png").stat().st_size > 0
    report = json.loads((tmp_path / "bench_memory_scaling_smoke.json").read_text())

    for key in ("command", "environment", "cells", "rounds", "rows", "summary"):
        assert key in report
    assert report["environment"]["threads"] == 2
    cells = report["cells"]
    assert len(cells) >= 3
    assert min(cells) <= report["dense_max_cells"] < max(cells)  # `auto` runs both of its paths

    rows = report["rows"]
    batch = {(r["path"], r["mode"]) for r in rows if r["shape"] == "batch"}
    for path in ("sparse", "dense", "auto", "router"):
        assert {(path, "infer"), (path, "train")} <= batch
    assert ("topk", "infer") in batch
    assert {(r["path"], r["mode"]) for r in rows if r["shape"] == "serve"} == {
        ("sparse", "infer"),
        ("dense", "infer"),
        ("auto", "infer"),
    }
    for path, mode in batch:
        assert (
            sorted(r["cells"] for r in rows if (r["shape"], r["path"], r["mode"]) == ("batch", path, mode))
            == cells
        )
    for row in rows:
        assert row["parents"] * report["children"] == row["cells"]
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["runs"] == report["rounds"]
        assert row["peak_mib"] is not None
        assert row["peak_mib"] >= 0
        assert row["resident_mib"] > 0

    summary = {(e["shape"], e["path"], e["mode"]): e for e in report["summary"]}
    for mode in ("infer", "train"):
        for path in ("sparse", "dense", "auto", "auto above threshold"):
            entry = summary[("batch", path, mode)]
            assert entry["time"]["ratio"] >= 1.0
            assert isinstance(entry["time_met"], bool)
        assert summary[("batch", "sparse", mode)]["goal_applies"]
        assert not summary[("batch", "dense", mode)]["goal_applies"]

"""The service load benchmark's smoke mode runs end to end: real server processes, a load generator
process, the report, the plot, and the A/B mode against a second server started from a checkout
(this one: both builds are the same code, so both must serve every request)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from procs import run_benchmark_smoke

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_bench_service_load_smoke(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    run_benchmark_smoke(
        "bench_service_load.py", tmp_path, extra=("--baseline-root", str(root), "--ab-rounds", "1")
    )
    results = json.loads((tmp_path / "service_load.json").read_text())
    for popularity in ("zipf", "uniform"):
        run = results["service"][popularity]
        assert run["throughput_rps"] > 0
        assert set(run["statuses"]) == {"200"}
        assert run["p99_ms"] >= run["p50_ms"] > 0
    assert results["naive"]["mean_rows_per_pass"] == 1.0
    inprocess = results["inprocess"]
    for name in ("bare", "memories", "bucketed", "single_row"):  # bucketed: the shipped Batcher
        assert inprocess[f"{name}_rows_per_s"] == inprocess["spread"][name]["median"] > 0
        assert inprocess["spread"][name]["runs"] == 2
    assert results["upload"]["median_ms"] > 0
    assert results["rss"]["registered"] == results["config"]["rss_tasks"]
    assert (tmp_path / "service_load.png").stat().st_size > 10_000
    ab = results["ab"]
    assert ab["baseline_root"] == str(root)
    assert ab["rounds"] == 1
    for build in ("current", "baseline"):
        assert [set(run["statuses"]) for run in ab["runs"][build]] == [{"200"}]
        figures = ab["figures"][build]
        assert figures["throughput_rps"]["min"] > 0
        assert figures["throughput_rps"]["runs"] == 1
        assert figures["p99_ms"]["median"] >= figures["p50_ms"]["median"] > 0
    per_round = [c["throughput_rps"] / b["throughput_rps"] for c, b in zip(*ab["runs"].values(), strict=True)]
    assert ab["throughput_ratio"]["median"] == pytest.approx(statistics.median(per_round))
    report = (tmp_path / "SERVICE_BENCHMARKS.md").read_text()
    assert "| goal |" in report
    assert "## Against the baseline build" in report

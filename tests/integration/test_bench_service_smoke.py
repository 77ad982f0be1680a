"""The service load benchmark's smoke mode runs end to end: real server processes, a load generator
process, the report, the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from procs import run_benchmark_smoke

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_bench_service_load_smoke(tmp_path: Path) -> None:
    run_benchmark_smoke("bench_service_load.py", tmp_path)
    results = json.loads((tmp_path / "service_load.json").read_text())
    for popularity in ("zipf", "uniform"):
        run = results["service"][popularity]
        assert run["throughput_rps"] > 0
        assert set(run["statuses"]) == {"200"}
        assert run["p99_ms"] >= run["p50_ms"] > 0
    assert results["naive"]["mean_rows_per_pass"] == 1.0
    assert results["inprocess"]["bare_rows_per_s"] > 0
    assert results["upload"]["median_ms"] > 0
    assert results["rss"]["registered"] == results["config"]["rss_tasks"]
    assert (tmp_path / "service_load.png").stat().st_size > 10_000
    assert "| goal |" in (tmp_path / "SERVICE_BENCHMARKS.md").read_text()

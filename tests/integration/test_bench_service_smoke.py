"""The service load benchmark's smoke mode runs end to end: real server processes, a load generator
process, the report, the plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_bench_service_load_smoke(repo_root: Path, tmp_path: Path) -> None:
    script = repo_root / "benchmarks" / "bench_service_load.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(tmp_path)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
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

"""The overload benchmark's smoke mode runs end to end on a real server process: overload is refused
with 429 + Retry-After, nothing hangs, every outcome is one the service promises; report and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from procs import run_benchmark_smoke

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_bench_overload_smoke(tmp_path: Path) -> None:
    run_benchmark_smoke("bench_overload.py", tmp_path)
    result = json.loads((tmp_path / "overload.json").read_text())
    burst = result["overload"]
    assert result["capacity"]["rps"] > 0
    assert burst["statuses"].get("429", 0) > 0, "5x capacity was not refused"
    assert burst["rejections_with_retry_after"] == burst["statuses"]["429"]
    assert burst["hung"] == 0
    assert set(burst["statuses"]) <= {"200", "429", "504"}
    assert result["recovery"]["recovered"]
    assert (tmp_path / "overload.png").stat().st_size > 10_000
    assert "| goal | met |" in (tmp_path / "overload.md").read_text()

"""The abuse benchmark's smoke mode on a real server process: huge requests beside small ones of
another task, and an upload burst against the bytes-in-flight budget (plain and retrying clients)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from procs import run_benchmark_smoke

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_bench_abuse_smoke(tmp_path: Path) -> None:
    run_benchmark_smoke("bench_abuse.py", tmp_path)
    report = json.loads((tmp_path / "abuse.json").read_text())
    (huge,) = report["huge"]
    assert set(huge["big"]) <= {"200", "429"}, huge  # refused at once or served; never 5xx or 504
    assert huge["big_refused_with_retry_after"] == huge["big"].get("429", 0)
    assert set(huge["small"]) == {"200"}, huge  # the other task's client is never failed
    burst, retried = report["uploads"]
    assert burst["first_try"].get("429", 0) > 0, burst  # six files against a budget of two
    assert set(burst["final"]) == {"201", "429"}, burst
    assert retried["final"] == {"201": 6}, retried  # clients honouring Retry-After all get stored
    assert burst["rss_mib"]["peak"] >= burst["rss_mib"]["before"] > 100
    assert "## Concurrent uploads" in (tmp_path / "abuse.md").read_text()

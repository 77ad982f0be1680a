"""The soak benchmark's smoke mode runs end to end on a real server process: mixed predict / upload /
delete traffic, /proc samples, every uploaded task deleted at the end; report and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from procs import run_benchmark_smoke

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_bench_soak_smoke(tmp_path: Path) -> None:
    run_benchmark_smoke("bench_soak.py", tmp_path)
    result = json.loads((tmp_path / "soak.json").read_text())
    kinds = {key.split()[0] for key in result["outcomes"]}
    assert kinds == {"predict", "upload", "delete"}
    assert len(result["samples"]) >= 10
    analysis = result["analysis"]
    # Correctness, not speed: a deleted task's memory leaves the registry whatever the machine.
    assert analysis["memory_bytes_after_deletes"] == analysis["memory_bytes_shipped"]
    assert all(k.endswith((" 200", " 201", " 204", " 404")) for k in result["outcomes"])
    assert (tmp_path / "soak.png").stat().st_size > 10_000
    assert "| goal | met |" in (tmp_path / "soak.md").read_text()

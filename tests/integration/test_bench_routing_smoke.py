"""The routing benchmark's smoke mode runs end to end on the shipped BBC memory: report, table, heatmap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from procs import run_benchmark_smoke


@pytest.mark.model
@pytest.mark.slow
def test_bench_routing_smoke(tmp_path: Path) -> None:
    run_benchmark_smoke("bench_routing.py", tmp_path, timeout_s=300)
    report = json.loads((tmp_path / "bench_routing_smoke.json").read_text())
    assert report["documents"] == 10
    assert set(report["documents_per_topic"].values()) == {2}
    trained, untrained = report["results"]
    assert (trained["memory"], untrained["memory"]) == ("trained", "untrained")
    layers = 6
    for result in report["results"]:
        assert len(result["mi_bits"]) == len(result["shuffled_mi_bits"]["max"]) == layers
        assert all(0 <= mi <= result["topic_entropy_bits"] + 1e-9 for mi in result["mi_bits"])
        # Every topic row of every layer holds its tokens x k choices.
        assert sum(map(sum, result["topic_counts"][0])) == result["tokens"] * report["top_k"]
    assert trained["accuracy"] >= 0.8  # the shipped memory knows its topics (0.996 on the whole split)
    assert (tmp_path / "bench_routing_smoke.md").read_text().startswith("# ")
    assert (tmp_path / "routing_bbc_smoke.png").stat().st_size > 10_000

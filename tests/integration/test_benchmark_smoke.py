"""The memory layer against the published reference code, in the suite so the mode cannot rot."""

from __future__ import annotations

import json

import pytest
from procs import run_benchmark_smoke


@pytest.mark.slow
def test_memory_layer_against_the_reference_smoke(tmp_path):
    """The memory-scaling benchmark's reference comparison (docs/BENCHMARKS.md, section 1): the published
    code's expanded gather against our paths; its backward builds the [N, E, C, H] gradient ours avoid."""
    mode = ("--children", "3", "--shapes", "batch", "--paths", "expanded", "dense", "sparse", "auto")
    run_benchmark_smoke(
        "bench_memory_scaling.py", tmp_path, timeout_s=300, extra=(*mode, "--name", "bench_memory_layer")
    )
    assert (tmp_path / "bench_memory_layer_smoke.md").read_text().startswith("# ")
    report = json.loads((tmp_path / "bench_memory_layer_smoke.json").read_text())
    rows = {(r["cells"], r["path"], r["mode"]): r for r in report["rows"]}
    assert {path for _, path, _ in rows} == {"expanded", "dense", "sparse", "auto"}
    assert all(0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in rows.values())
    tokens, top = 4 * 16, max(report["cells"])  # the smoke batch shape: 4 x 16 tokens
    gradient_mib = tokens * (top // 3 * 3) * report["hidden"] * 4 / 2**20
    expanded, sparse = rows[(top, "expanded", "train")], rows[(top, "sparse", "train")]
    assert expanded["peak_mib"] >= gradient_mib, (expanded, gradient_mib)
    assert sparse["peak_mib"] < expanded["peak_mib"] / 4, (sparse, expanded)

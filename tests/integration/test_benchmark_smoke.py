"""The memory layer against the published reference code, in the suite so the mode cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_memory_layer_against_the_reference_smoke(repo_root, tmp_path):
    """The memory-scaling benchmark's reference comparison (docs/BENCHMARKS.md, section 1): the published
    code's expanded gather against our paths; its backward builds the [N, E, C, H] gradient ours avoid."""
    script = repo_root / "benchmarks" / "bench_memory_scaling.py"
    mode = ["--children", "3", "--shapes", "batch", "--paths", "expanded", "dense", "sparse", "auto"]
    mode += ["--name", "bench_memory_layer"]
    cmd = [sys.executable, str(script), "--smoke", "--out", str(tmp_path), *mode]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
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

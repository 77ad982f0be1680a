"""The benchmarks' smoke modes run in the suite, so the scripts cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_smoke(repo_root, script: str, out) -> dict:
    cmd = [sys.executable, str(repo_root / "benchmarks" / script), "--smoke", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    name = script.removesuffix(".py") + "_smoke"
    assert (out / f"{name}.md").read_text().startswith("# ")
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow
def test_memory_layer_benchmark_smoke(repo_root, tmp_path):
    report = run_smoke(repo_root, "bench_memory_layer.py", tmp_path)
    impls = {row["impl"] for row in report["rows"]}
    assert impls == {"expanded", "dense", "sparse", "auto"}
    assert all(row["median_ms"] > 0 for row in report["rows"])


@pytest.mark.model
@pytest.mark.slow
def test_encoder_overhead_benchmark_smoke(repo_root, tmp_path):
    report = run_smoke(repo_root, "bench_encoder_overhead.py", tmp_path)
    assert [r["batch"] for r in report["results"]] == [1, 2]
    assert all(r["spartan_ratio_median"] > 0 for r in report["results"])

"""Smoke modes of the accuracy comparison and the SPARTAN tuning sweep (real MiniLM, real peers)."""

from __future__ import annotations

import json
import subprocess

import pytest
from procs import SMOKE_ENV

pytestmark = [pytest.mark.model, pytest.mark.slow]


def run(peers_python, repo_root, *args: str) -> str:
    done = subprocess.run(
        [str(peers_python), *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=SMOKE_ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_accuracy_benchmark_smoke_trains_every_method_and_reports(peers_python, repo_root, tmp_path):
    script = "benchmarks/bench_accuracy.py"
    methods = ["head", "spartan", "pfeiffer", "lora", "spartan-fast"]
    run(peers_python, repo_root, script, "run", "--smoke", "--tasks", "trec", "--methods", *methods,
        "--seeds", "0", "--out", str(tmp_path))  # fmt: skip
    records = [
        json.loads(line) for line in (tmp_path / "accuracy_smoke_minilm.jsonl").read_text().splitlines()
    ]
    assert [r["method"] for r in records] == methods
    for record in records:
        assert 0.0 <= record["test"]["accuracy"] <= 1.0
        assert record["steps"] > 0
        assert record["trainable_parameters"] > 0
    by_method = {r["method"]: r for r in records}
    # The head alone is a strict subset of every other method's per-task parameters.
    assert all(
        by_method[m]["trainable_parameters"] > by_method["head"]["trainable_parameters"] for m in methods[1:]
    )
    fast = by_method["spartan-fast"]  # the few-shot recipe, through the shipped trainer
    assert fast["first_memory_layer"] == 2  # MiniLM: memories after layers 2-5
    assert (fast["recipe"]["memory_layers"], fast["recipe"]["layernorm_layers"]) == (4, 3)
    assert 0 < fast["seconds_to_best"] <= fast["train_seconds"]
    # A rerun finds every run recorded and trains nothing (the benchmark is resumable).
    again = run(peers_python, repo_root, script, "run", "--smoke", "--tasks", "trec", "--methods", *methods,
                "--seeds", "0", "--out", str(tmp_path))  # fmt: skip
    assert again.startswith("0 runs to do")
    compared = run(peers_python, repo_root, script, "compare", "--smoke", "--out", str(tmp_path))
    assert "| trec |" in compared
    assert "| spartan-fast - spartan | " not in compared  # one pair only: no spread to report
    assert (tmp_path / "accuracy_fast_minilm.md").read_text() == compared.strip() + "\n"
    run(peers_python, repo_root, script, "report", "--out", str(tmp_path))
    report = (tmp_path / "accuracy.md").read_text()
    assert "| trec |" in report
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_spartan_tuning_smoke_scores_dev_only(peers_python, repo_root, tmp_path):
    run(peers_python, repo_root, "benchmarks/bench_spartan_tuning.py", "--smoke", "--out", str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "spartan_tuning.jsonl").read_text().splitlines()]
    assert {r["variant"] for r in records} == {"default", "k=2", "no LayerNorm"}
    assert all("test" not in r and 0.0 <= r["dev"]["accuracy"] <= 1.0 for r in records)
    assert (tmp_path / "spartan_tuning.md").read_text().startswith("# SPARTAN hyperparameters")

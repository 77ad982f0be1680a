"""The training-speed benchmark's smoke mode (both measures: per epoch, and from the start to the kept
epoch) runs in the suite (peers' environment), so it cannot rot."""

from __future__ import annotations

import json

import pytest
from procs import run_benchmark_smoke


@pytest.mark.model
@pytest.mark.slow
def test_training_speed_benchmark_smoke(peers_python, tmp_path):
    run_benchmark_smoke("bench_training_speed.py", tmp_path, timeout_s=540, python=peers_python)

    assert (tmp_path / "speed_training_smoke.md").read_text().startswith("# Training speed")
    assert (tmp_path / "speed_training_smoke.png").stat().st_size > 0
    report = json.loads((tmp_path / "speed_training_smoke.json").read_text())
    for key in (
        "date",
        "command",
        "environment",
        "workload",
        "rounds",
        "memory_method",
        "runs",
        "ratios",
        "goal",
    ):
        assert key in report
    env = report["environment"]
    assert env["torch_threads"] == 2
    assert env["cpu_count"] >= 1
    assert {"torch", "adapters", "peft"} <= env["packages"].keys()
    workload = report["workload"]
    assert (workload["examples"], workload["batch_size"], workload["max_length"]) == (16, 8, 16)
    assert workload["steps_per_epoch"] == 2

    runs = report["runs"]
    assert {r["contender"] for r in runs} == {"spartan", "pfeiffer"}
    assert {r["backbone"] for r in runs} == {"minilm"}
    for run in runs:
        assert run["available"], run
        assert run["trainable_parameters"] > 0
        assert run["task_bytes"] > 0
        assert len(run["rounds"]) == report["rounds"] == 2
        for record in run["rounds"]:
            assert len(record["step_ms"]) == workload["steps_per_epoch"]
            assert all(ms > 0 for ms in record["step_ms"])
            assert record["epoch_s"] > 0
        step = run["step_ms"]
        assert 0 < step["min"] <= step["median"] <= step["max"]
        assert all(ms > 0 for ms in run["phase_ms"].values())
        assert [b["rows"] for b in run["batches"]] == [8, 8]
        assert run["tokenize_epoch_s"] > 0
    # The peak-memory child process: the smoke run starts one (the first contender's), not one each.
    memory = runs[0]["memory"]
    assert "error" not in memory, memory
    assert memory["rss_after_build_mib"] > 0
    assert memory["optimizer_state_mib"] > 0
    assert memory["gradient_mib"] > 0
    assert memory["saved_activations_mib"] > 0
    if memory["hwm_reset"]:
        assert memory["peak_mib"] > 0
    assert "memory" not in runs[1]
    # the same encodings for every contender
    assert len({json.dumps(r["batches"]) for r in runs}) == 1

    assert {(r["contender"], r["reference"]) for r in report["ratios"]} == {("spartan", "pfeiffer")}
    for ratio in report["ratios"]:
        assert len(ratio["per_round"]) == 2
        assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
    (goal,) = report["goal"]
    assert goal["adapter"] == "pfeiffer"
    assert goal["goal"] == 0.75
    assert isinstance(goal["met"], bool)

    # From the start of training to the kept epoch: the few-shot recipe and Pfeiffer, 2 rounds each
    # (in the smoke run's own process).
    kept = json.loads((tmp_path / "speed_training_kept_smoke.json").read_text())
    assert (tmp_path / "speed_training_kept_smoke.md").read_text().startswith("# Few-shot training")
    assert {(r["contender"], r["round"]) for r in kept["runs"]} == {
        (name, number) for name in ("spartan-fast", "pfeiffer") for number in (0, 1)
    }
    for run in kept["runs"]:
        assert "error" not in run, run
        assert 0 < run["time_to_kept_s"] <= run["total_s"]
        assert run["kept_epoch"] in run["dev_epochs"]
        assert 0.0 <= run["test"]["accuracy"] <= 1.0
        # in one warm process a later run can fit in memory an earlier one left: 0 MiB on top
        assert run["peak_mib"] is None or run["peak_mib"] >= 0
    (ratio,) = kept["summary"]["suite_ratio"].values()
    assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]

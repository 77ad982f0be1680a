"""The engine benchmark's smoke modes run in the suite: every runtime's code path, and numbers that
must hold even on a busy machine (bf16 agrees with fp32, per-channel int8 stays close, ratios sane)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from procs import run_benchmark_smoke

pytestmark = [pytest.mark.model, pytest.mark.slow]


def smoke(repo_root: Path, out: Path, command: str) -> dict:
    runtimes = repo_root / ".venv-runtimes" / "bin" / "python"
    if not runtimes.exists():
        pytest.fail(f"{runtimes} is missing: run `make runtimes-env` (or `make test`, which builds it)")
    run_benchmark_smoke("bench_engine.py", out, timeout_s=600, extra=(command,))
    assert (out / f"engine_{command}_smoke.md").read_text().startswith("# ")
    return json.loads((out / f"engine_{command}_smoke.json").read_text())


def test_engine_speed_smoke(repo_root: Path, tmp_path: Path) -> None:
    report = smoke(repo_root, tmp_path, "speed")
    runs = {(r["runtime"], r["precision"]): r for r in report["runs"]}
    assert set(runs) == {
        ("torch", "fp32"), ("torch", "bf16"), ("graph", "bf16"), ("onnxruntime", "int8"), ("openvino", "bf16")
    }  # fmt: skip
    for run in runs.values():
        key = "eager" if run["runtime"] in ("torch", "graph") else "bare"
        assert all(cell[key]["min"] > 0 for cell in run["cells"]), run
    assert runs[("torch", "fp32")]["cosine_to_torch_fp32"] == pytest.approx(1.0, abs=1e-6)
    # bf16 keeps 8 significant bits, per-channel int8 weights ~7: close to fp32, not equal.
    assert 0.999 < runs[("torch", "bf16")]["cosine_to_torch_fp32"] < 1.0
    assert 0.999 < runs[("openvino", "bf16")]["cosine_to_torch_fp32"] <= 1.0
    assert 0.999 < runs[("graph", "bf16")]["cosine_to_torch_fp32"] <= 1.0
    assert runs[("onnxruntime", "int8")]["cosine_to_torch_fp32"] > 0.9
    for runtime, precision in (("torch", "fp32"), ("torch", "bf16"), ("graph", "bf16")):
        for cell in runs[(runtime, precision)]["cells"]:
            assert {"bare", "spartan-1"} <= set(cell["vs_eager"]), cell
            assert 0 < cell["vs_bare"]["spartan-1"]["median"] < 5, cell
            # the memories' overhead over transformers' own model (docs/BENCHMARKS.md, section 2)
            assert 0 < cell["vs_eager"]["spartan-1"]["median"] < 5, cell
        mixed = [c for c in runs[(runtime, precision)]["cells"] if c["batch"] >= 6]
        assert mixed, "a cell large enough for 6 tasks in one pass"
        assert all({"spartan-6", "served-6"} <= set(c["vs_bare"]) for c in mixed)


def test_engine_accuracy_smoke(repo_root: Path, tmp_path: Path) -> None:
    report = smoke(repo_root, tmp_path, "accuracy")
    tasks = {t["task"]: t for t in report["tasks"]}
    assert set(tasks) == {"sentiment", "banking77", "bbc-news"}
    for task in tasks.values():
        assert task["test_rows"] == 64
        assert task["accuracy_fp32"] > 0.6, task  # the shipped memories are trained, not random
        assert set(task["variants"]) == {
            "bf16",
            "graph-bf16",
            "graph-fp32",
            "int8-per-tensor",
            "int8-per-channel",
        }
        assert task["variants"]["graph-fp32"]["label_agreement"] == 1.0  # fp32 to rounding: no label moves
        assert task["variants"]["graph-fp32"]["max_score_difference"] < 1e-4
        for name, variant in task["variants"].items():
            # bf16 keeps 8 significant bits; int8 moves 0.5-2 % of the predictions (docs/RESULTS.md)
            assert variant["label_agreement"] >= (0.9 if name.startswith("int8") else 0.97), (name, task)
            # accuracy can move by at most the share of predictions that changed
            assert abs(variant["accuracy_change_points"]) <= 100 * (1 - variant["label_agreement"]) + 1e-9
            assert variant["accuracy"] == pytest.approx(
                task["accuracy_fp32"] + variant["accuracy_change_points"] / 100
            )
            # changed, not broken: bf16 moves no probability by half; int8 flips a few rows
            assert 0 < variant["max_score_difference"] < (1.0 if name.startswith("int8") else 0.5), (
                name,
                task,
            )

"""The inference-speed benchmark's smoke mode (real MiniLM, real adapters/PEFT peers, int8 included)."""

from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

CONTENDERS = {"bare", "spartan", "pfeiffer", "houlsby", "lora"}


def test_speed_benchmark_smoke(peers_python, repo_root, tmp_path):
    cmd = [str(peers_python), "benchmarks/bench_speed.py", "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "speed_inference_smoke.json").read_text())
    markdown = (tmp_path / "speed_inference_smoke.md").read_text()
    assert markdown.startswith("# Inference speed")
    assert "## int8 accuracy" in markdown
    assert "## The gap to the paper's 1.9x" in markdown
    assert (tmp_path / "speed_inference_smoke.png").stat().st_size > 0

    for key in ("date", "command", "environment", "settings", "profiles", "cells", "summary", "quantization"):
        assert key in report
    for key in ("torch", "transformers", "adapters", "peft", "cpu_count", "platform"):
        assert report["environment"][key]
    assert {p["name"]: (p["threads"], p["int8"]) for p in report["profiles"]} == {
        "server": (1, False),
        "edge": (1, False),
        "edge-int8": (1, True),
    }

    cells = report["cells"]
    assert {(c["profile"], c["batch"], c["length"]) for c in cells} == {
        (profile, batch, 16) for profile in ("server", "edge", "edge-int8") for batch in (1, 2)
    }
    for cell in cells:
        assert cell["backbone"] == "minilm"
        assert set(cell["examples_per_s"]) == CONTENDERS  # `adapters` supports MiniLM: nothing missing
        for entry in cell["examples_per_s"].values():
            assert len(entry["per_round"]) == cell["rounds"] == 2
            assert all(v > 0 for v in entry["per_round"])
            assert 0 < entry["min"] <= entry["median"] <= entry["max"]
        for key in ("spartan/bare", "spartan/best_adapter", "spartan/lora", "pfeiffer/bare", "lora/bare"):
            ratio = cell["ratios"][key]
            assert len(ratio["per_round"]) == 2
            assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
        assert isinstance(cell["goals"]["spartan_vs_bare"], bool)
        assert isinstance(cell["goals"]["spartan_vs_adapters"], bool)

    # int8 really happened, on every contender's backbone and only there, and the output stayed close.
    quantization = report["quantization"]["minilm"]
    assert set(quantization) == CONTENDERS
    for name, q in quantization.items():
        assert q["backbone_linears"] > 0
        assert q["quantized"] == q["backbone_linears"], name
        assert not q["skipped"], name
        assert q["model_quantized"] == q["quantized"], name  # nothing outside the backbone
        assert q["backbone_float_linears_left"] == q["model_float_linears"] - (0 if name == "bare" else 2)
        assert q["pooled_cosine_min"] > 0.8, name
    # the per-task Linear modules (SPARTAN's head, adapter bottlenecks, LoRA A/B) stayed float32
    assert quantization["bare"]["model_float_linears"] == 0
    assert quantization["spartan"]["model_float_linears"] == 2  # the head; the memory has no Linear
    for name in ("pfeiffer", "houlsby", "lora"):
        assert quantization[name]["backbone_float_linears_left"] > 0, name

    accuracy = report["int8_accuracy"]
    assert {a["dataset"] for a in accuracy} == {"movie", "banking77", "bbc"}
    for row in accuracy:
        assert row["examples"] == 16
        assert 0.0 <= row["fp32"]["accuracy"] <= 1.0
        assert set(row["schemes"]) == {"per-tensor", "per-channel"}
        for scheme in row["schemes"].values():
            assert scheme["backbone_linears_quantized"] == scheme["backbone_linears"] > 0
            assert 0.0 <= scheme["metrics"]["accuracy"] <= 1.0
            assert scheme["delta_accuracy"] == pytest.approx(
                scheme["metrics"]["accuracy"] - row["fp32"]["accuracy"]
            )
            assert 0.0 <= scheme["prediction_agreement"] <= 1.0
        assert row["int8"] == row["schemes"][row["int8_scheme"]]["metrics"]

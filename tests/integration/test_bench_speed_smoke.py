"""The inference-speed benchmark's smoke mode (real MiniLM, real adapters/PEFT peers, int8 included; the
accuracy int8 keeps is the engine benchmark's, tests/integration/test_bench_engine_smoke.py)."""

from __future__ import annotations

import json
import statistics
from typing import Any

import pytest
from procs import run_benchmark_smoke

pytestmark = [pytest.mark.model, pytest.mark.slow]

CONTENDERS = {"bare", "spartan", "pfeiffer", "houlsby", "lora"}
ADAPTERS = ("pfeiffer", "houlsby")
GOAL_VS_BARE, GOAL_VS_ADAPTERS = 0.97, 1.0  # benchmarks/bench_speed.py (the report's goals)
# The ratios are float64 quotients of the recorded float64 throughputs: equal up to rounding.
RATIO_RTOL = 1e-12


def expected_ratios(per_round: dict[str, list[float]]) -> dict[str, list[float]]:
    """Each ratio, round by round, from the recorded throughputs (the same pairs the report names)."""
    rounds = range(len(per_round["bare"]))
    best_adapter = [max(per_round[a][r] for a in ADAPTERS) for r in rounds]
    pairs = {
        "spartan/bare": (per_round["spartan"], per_round["bare"]),
        "spartan/best_adapter": (per_round["spartan"], best_adapter),
        "spartan/lora": (per_round["spartan"], per_round["lora"]),
        "pfeiffer/bare": (per_round["pfeiffer"], per_round["bare"]),
        "lora/bare": (per_round["lora"], per_round["bare"]),
        "bare/best_adapter": (per_round["bare"], best_adapter),
    }
    return {key: [a / b for a, b in zip(top, bottom, strict=True)] for key, (top, bottom) in pairs.items()}


def check_cell_numbers(cell: dict[str, Any]) -> None:
    per_round = {name: entry["per_round"] for name, entry in cell["examples_per_s"].items()}
    for name, entry in cell["examples_per_s"].items():
        values = entry["per_round"]
        assert (entry["min"], entry["median"], entry["max"]) == (
            min(values),
            statistics.median(values),
            max(values),
        ), name
    for key, want in expected_ratios(per_round).items():
        got = cell["ratios"][key]
        assert got["per_round"] == pytest.approx(want, rel=RATIO_RTOL), key
        assert got["median"] == pytest.approx(statistics.median(want), rel=RATIO_RTOL), key
    # A 1-thread MiniLM pass at length 16 runs at tens to hundreds of examples/s, never 0 or a million.
    assert all(1 < v < 100_000 for values in per_round.values() for v in values), per_round
    assert cell["goals"]["spartan_vs_bare"] == (cell["ratios"]["spartan/bare"]["median"] >= GOAL_VS_BARE)
    assert cell["goals"]["spartan_vs_adapters"] == (
        cell["ratios"]["spartan/best_adapter"]["median"] >= GOAL_VS_ADAPTERS
    )


def check_summary(summary: list[dict[str, Any]], cells: list[dict[str, Any]]) -> None:
    assert [row["profile"] for row in summary] == ["server", "edge", "edge-int8"]
    for row in summary:
        mine = [c for c in cells if c["profile"] == row["profile"]]
        vs_bare = [c["ratios"]["spartan/bare"]["median"] for c in mine]
        assert row["cells"] == len(mine) == 2, row
        assert row["spartan_vs_bare_met"] == sum(c["goals"]["spartan_vs_bare"] for c in mine), row
        assert row["spartan_vs_adapters_met"] == sum(c["goals"]["spartan_vs_adapters"] for c in mine), row
        assert row["spartan_vs_bare_worst"] == min(vs_bare), row
        assert row["spartan_vs_bare_median"] == statistics.median(vs_bare), row
        assert row["bare_vs_best_adapter_max"] == max(
            c["ratios"]["bare/best_adapter"]["median"] for c in mine
        )


def test_speed_benchmark_smoke(peers_python, tmp_path):
    run_benchmark_smoke("bench_speed.py", tmp_path, timeout_s=600, python=peers_python)
    report = json.loads((tmp_path / "speed_inference_smoke.json").read_text())
    markdown = (tmp_path / "speed_inference_smoke.md").read_text()
    assert markdown.startswith("# Inference speed")
    assert "## int8 speed-up at 1 thread" in markdown
    assert "## The gap to the paper's 1.9x" in markdown
    assert (tmp_path / "speed_inference_smoke.png").stat().st_size > 0

    for key in ("command", "environment", "settings", "profiles", "cells", "summary", "quantization"):
        assert key in report
    for key in ("torch", "transformers", "adapters", "peft"):
        assert report["environment"]["packages"][key]
    for key in ("cpu_count", "platform"):
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
        check_cell_numbers(cell)
    check_summary(report["summary"], cells)

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
        assert q["pooled_cosine_min"] <= q["pooled_cosine_mean"] <= 1.0 + 1e-6, name  # float32 cosine
        assert q["output_close"] == (q["pooled_cosine_min"] >= 0.95), name
    # the per-task Linear modules (SPARTAN's head, adapter bottlenecks, LoRA A/B) stayed float32
    assert quantization["bare"]["model_float_linears"] == 0
    assert quantization["spartan"]["model_float_linears"] == 2  # the head; the memory has no Linear
    for name in ("pfeiffer", "houlsby", "lora"):
        assert quantization[name]["backbone_float_linears_left"] > 0, name

"""infinity-emb, the service benchmark's peer (benchmarks/peer_infinity.py): each CPU engine serves the
local MiniLM classifier and answers /classify. Needs `make infinity-env`, which `make test` does not
build: skipped without it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import peer_infinity

pytestmark = [
    pytest.mark.model,
    pytest.mark.slow,
    pytest.mark.skipif(not peer_infinity.available(), reason="no .venv-infinity: run `make infinity-env`"),
]

TEXTS = ["a gripping, beautifully acted film", "dull, predictable and far too long", "ok"]


def served(engine: Literal["torch", "optimum"], **options: Any) -> list[list[dict[str, Any]]]:
    model_dir = peer_infinity.prepare_classifier()
    server = peer_infinity.start_infinity(model_dir, engine, threads=1, batch_size=4, **options)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            answers = peer_infinity.classify(client, TEXTS)
    finally:
        server.stop()
    assert len(answers) == len(TEXTS)
    for answer in answers:  # every label, softmaxed
        assert sorted(item["label"] for item in answer) == sorted(peer_infinity.LABELS)
        assert sum(item["score"] for item in answer) == pytest.approx(1.0, abs=1e-4)
    return answers


def scores(answers: list[list[dict[str, Any]]]) -> list[float]:
    return [next(i["score"] for i in answer if i["label"] == "positive") for answer in answers]


@pytest.fixture(scope="module")
def torch_fp32() -> list[float]:
    return scores(served("torch"))


@pytest.mark.parametrize(
    ("engine", "options", "tolerance"),
    [
        ("torch", {"dtype": "bfloat16"}, 0.05),
        ("optimum", {}, 1e-4),
        ("optimum", {"optimize": True}, 1e-3),
    ],
)
def test_engine_serves_the_local_classifier(
    torch_fp32: list[float], engine: Literal["torch", "optimum"], options: dict[str, Any], tolerance: float
) -> None:
    assert scores(served(engine, **options)) == pytest.approx(torch_fp32, abs=tolerance)

"""EncoderRunner on the real MiniLM: rows of interleaved tasks, rows that fail alone, bf16 serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from api_fixtures import build_memory
from parity import assert_f32_close

from app.engine.backbone import load_backbone
from app.engine.encoder import SpartanEncoder
from app.engine.runner import EncoderRunner, Row
from app.errors import InvalidInput

pytestmark = pytest.mark.model

TEXTS = [
    "a gorgeous, witty and moving film",
    "dull",
    "the plot never quite comes together, though the cast tries hard",
    "how do I reset my card pin?",
    "stocks fell sharply after the bank raised interest rates",
    "two hours I will never get back",
]


@pytest.fixture(scope="module")
def bf16_encoder(cache_dir: Path) -> SpartanEncoder:
    return SpartanEncoder(load_backbone("all-MiniLM-L6-v2", cache_dir, precision="bf16"))


def served(runner: EncoderRunner, rows: list[Row]) -> list[list[float]]:
    prepared = runner.prepare(rows)
    return [r.outputs for r in runner.run(prepared)]


def test_interleaved_tasks_give_each_row_what_it_gets_alone(minilm_encoder: Any) -> None:
    """Rows of three tasks, interleaved, run as one pass (sorted into per-task slices inside) and come
    back in the callers' order, each equal to the row served alone."""
    memories = [
        build_memory(minilm_encoder, seed=1),
        build_memory(minilm_encoder, seed=2, layernorms=False, labels=("x", "y", "z")),
        build_memory(minilm_encoder, seed=3),
    ]
    rows = [Row(memories[i % 3], text, task=f"t{i % 3}") for i, text in enumerate(TEXTS)]
    runner = EncoderRunner(minilm_encoder)
    together = served(runner, rows)
    for row, got in zip(rows, together, strict=True):
        alone = served(runner, [row])[0]
        assert len(got) == row.memory.spec.num_outputs
        assert_f32_close(torch.tensor(got), torch.tensor(alone))
        assert sum(got) == pytest.approx(1.0, abs=1e-5)  # probabilities, computed in the worker


def test_a_text_the_tokenizer_refuses_fails_alone(minilm_encoder: Any) -> None:
    memory = build_memory(minilm_encoder, seed=4)
    rows = [Row(memory, text) for text in ("fine", "\ud800", "also fine")]
    prepared = EncoderRunner(minilm_encoder).prepare(rows)
    assert [p.error is None for p in prepared] == [True, False, True]
    assert isinstance(prepared[1].error, InvalidInput)
    assert [p.length for p in (prepared[0], prepared[2])] == [3, 4]


def test_bf16_serving_agrees_with_fp32(minilm_encoder: Any, bf16_encoder: SpartanEncoder) -> None:
    """The same memories on the bf16 backbone: the same labels, probabilities within bf16 rounding
    (8 significant bits: ~0.4% per op, a few of them compounding: 0.03 absolute on a probability)."""
    assert bf16_encoder.identity() == minilm_encoder.identity()  # memory files match either precision
    assert bf16_encoder.backbone.precision == "bf16"
    memories = [build_memory(minilm_encoder, seed=5), build_memory(minilm_encoder, seed=6, layernorms=False)]
    rows = [Row(memories[i % 2], text) for i, text in enumerate(TEXTS)]
    fp32 = torch.tensor(served(EncoderRunner(minilm_encoder), rows))
    bf16 = torch.tensor(served(EncoderRunner(bf16_encoder), rows))
    assert bf16.dtype == torch.float32  # heads and memories run in fp32 whatever the backbone
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.03)
    assert bf16.argmax(-1).tolist() == fp32.argmax(-1).tolist()


def test_embedding_rows_share_a_pass_with_task_rows(minilm_encoder: Any) -> None:
    """Rows without a memory (the embeddings API) ride in the same pass as task rows: each gets what
    it gets alone, and embeddings are unit vectors (the model's Normalize module)."""
    memory = build_memory(minilm_encoder, seed=7)
    rows = [Row(None, TEXTS[0]), Row(memory, TEXTS[1]), Row(None, TEXTS[2]), Row(memory, TEXTS[3])]
    runner = EncoderRunner(minilm_encoder)
    results = runner.run(runner.prepare(rows))
    for row, result in zip(rows, results, strict=True):
        alone = runner.run(runner.prepare([row]))[0]
        assert_f32_close(torch.tensor(result.outputs), torch.tensor(alone.outputs))
        assert result.tokens == alone.tokens > 0
    assert [len(r.outputs) for r in results] == [384, 2, 384, 2]
    for embedding in (results[0], results[2]):
        assert torch.tensor(embedding.outputs).norm() == pytest.approx(1.0, abs=1e-5)

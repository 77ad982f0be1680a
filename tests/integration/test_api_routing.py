"""GET /v1/tasks/{task}/routing on the real MiniLM backbone with the shipped memories: counts grow with
the served tokens, are split by predicted label, match the encoder's own routing, restart with a new
version, vanish with a delete, stay per task in mixed batches, and never cost a prediction."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from parity import assert_f32_close

from app.engine.batcher import BatchRecord
from app.engine.encoder import RowGroup
from app.engine.routing_tally import RoutingTally
from app.engine.runner import EncoderRunner, Row
from app.spartan.memfile import load_memory
from app.spartan.routing_stats import count_choices, entropy_bits, mutual_information_bits

pytestmark = pytest.mark.model

MEMORIES = Path(__file__).resolve().parents[2] / "memories"
BBC = (MEMORIES / "bbc-news.safetensors").read_bytes()
SENTIMENT = (MEMORIES / "sentiment.safetensors").read_bytes()
NEWS = [
    "Shares in the bank fell sharply after it warned that profits would miss forecasts.",
    "The striker scored twice as the champions came from behind to win the cup final.",
    "The new phone's chip doubles battery life, the company told developers.",
    "The prime minister faced MPs' questions on the budget and the election date.",
    "The actress won the award for best film at the ceremony in London.",
]
REVIEWS = ["a gripping, beautifully acted film", "dull, predictable and far too long"]


def version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def token_counts(encoder: Any, texts: list[str]) -> list[int]:
    return [int(encoder.encode([text], None, 128)["attention_mask"].sum()) for text in texts]


def counts_of(payload: dict[str, Any]) -> torch.Tensor:
    """[layers, labels, parents] from a routing response."""
    labels = payload["labels"]
    return torch.tensor([[layer["counts"][label] for label in labels] for layer in payload["layers"]])


def expected_counts(encoder: Any, data: bytes, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """The same statistics straight from the encoder: counts by predicted label, and the predictions."""
    memory = load_memory(data, encoder.identity())
    encoding = encoder.encode(texts, None, memory.spec.max_length)
    with torch.inference_mode():
        out = encoder.forward(encoding, [RowGroup(memory, torch.arange(len(texts)))], record_routing=True)
    predicted = out.outputs[0].argmax(-1)
    spec = memory.spec
    mask = encoding["attention_mask"]
    counts = count_choices(out.routing[0], mask, predicted, len(spec.labels), spec.num_parents)
    return counts, predicted.tolist()


async def predict(client: Any, task: str, texts: list[str]) -> dict[str, Any]:
    response = await client.post(f"/v1/tasks/{task}/predict", json={"inputs": texts})
    assert response.status_code == 200, response.text
    return response.json()


async def routing(client: Any, task: str, **kwargs: Any) -> dict[str, Any]:
    response = await client.get(f"/v1/tasks/{task}/routing", **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def test_counts_grow_with_served_tokens_split_by_predicted_label(
    minilm_encoder: Any, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    settings = settings_for()
    write_memory(settings, "bbc-news", BBC)
    first, second = NEWS[:3], NEWS[3:]

    async def scenario() -> tuple[dict[str, Any], ...]:
        async with serve(settings) as (_, client):
            before = await routing(client, "bbc-news")
            answered = await predict(client, "bbc-news", first)
            after_first = await routing(client, "bbc-news")
            await predict(client, "bbc-news", second)
            return before, answered, after_first, await routing(client, "bbc-news")

    before, answered, after_first, after_second = asyncio.run(scenario())
    layers, top_k = minilm_encoder.backbone.num_layers, 8
    assert before["version"] == version(BBC)
    assert (before["rows"], before["tokens"], before["num_parents"], before["top_k"]) == (0, 0, 16, top_k)
    assert before["labels"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(before["layers"]) == layers
    assert int(counts_of(before).sum()) == 0

    tokens = token_counts(minilm_encoder, first)
    counts = counts_of(after_first)
    assert (after_first["rows"], after_first["tokens"]) == (3, sum(tokens))
    assert counts.sum((1, 2)).tolist() == [sum(tokens) * top_k] * layers
    # Split by predicted label: each label holds exactly its rows' tokens x k choices per layer.
    labels = after_first["labels"]
    for label in labels:
        own = sum(n for n, p in zip(tokens, answered["predictions"], strict=True) if p["label"] == label)
        assert counts[:, labels.index(label)].sum(-1).tolist() == [own * top_k] * layers
    expected, predicted = expected_counts(minilm_encoder, BBC, first)
    assert [labels[i] for i in predicted] == [p["label"] for p in answered["predictions"]]
    assert torch.equal(counts, expected)
    for layer, table in zip(after_first["layers"], counts, strict=True):
        assert layer["mutual_information_bits"] == pytest.approx(mutual_information_bits(table))
        assert layer["parent_entropy_bits"] == pytest.approx(entropy_bits(table.sum(0)))
    assert after_first["label_entropy_bits"] == pytest.approx(entropy_bits(counts[0].sum(-1)))
    # 16 parents, k = 8: a parent can say at most 1 bit about the label.
    assert after_first["mutual_information_ceiling_bits"] == min(after_first["label_entropy_bits"], 1.0)

    grown = counts_of(after_second)
    assert after_second["rows"] == 5
    assert after_second["tokens"] == sum(tokens) + sum(token_counts(minilm_encoder, second))
    assert bool((grown >= counts).all())
    assert torch.equal(grown - counts, expected_counts(minilm_encoder, BBC, second)[0])


def test_counts_restart_with_a_new_version_and_vanish_with_a_delete(
    memory_file: Any, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    settings = settings_for()
    write_memory(settings, "sentiment", SENTIMENT)
    replacement = memory_file(seed=1)
    url = "/v1/tasks/sentiment"

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with serve(settings) as (_, client):
            await predict(client, "sentiment", REVIEWS)
            seen["served"] = await routing(client, "sentiment")
            assert (await client.put(f"{url}/memory?replace=true", content=replacement)).status_code == 200
            seen["replaced"] = await routing(client, "sentiment")
            await predict(client, "sentiment", REVIEWS[:1])
            seen["served_new"] = await routing(client, "sentiment")
            assert (await client.delete(url)).status_code == 204
            seen["deleted"] = (await client.get(f"{url}/routing")).json()
            seen["unknown"] = (await client.get("/v1/tasks/nope/routing")).json()
            # The same bytes again: a deleted task's counts do not come back.
            assert (await client.put(f"{url}/memory", content=replacement)).status_code == 201
            seen["recreated"] = await routing(client, "sentiment")
        return seen

    seen = asyncio.run(scenario())
    assert seen["served"]["version"] == version(SENTIMENT)
    assert seen["served"]["rows"] == 2
    assert seen["replaced"]["version"] == version(replacement)
    assert (seen["replaced"]["rows"], seen["replaced"]["tokens"]) == (0, 0)
    assert int(counts_of(seen["replaced"]).sum()) == 0
    assert seen["served_new"]["rows"] == 1
    assert seen["deleted"]["error"]["type"] == "task_not_found"
    assert seen["unknown"]["error"]["type"] == "task_not_found"
    assert (seen["recreated"]["version"], seen["recreated"]["rows"]) == (version(replacement), 0)


def test_mixed_batches_count_each_task_apart(
    minilm_encoder: Any, make_memory: Any, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    from app.spartan.memfile import memory_to_bytes

    settings = settings_for(max_batch_size=64, max_wait_ms=300)  # all requests queued before it closes
    write_memory(settings, "bbc-news", BBC)
    write_memory(settings, "sentiment", SENTIMENT)
    write_memory(settings, "score", memory_to_bytes(make_memory(seed=5, task_type="regression")))
    records: list[BatchRecord] = []

    async def scenario() -> list[dict[str, Any]]:
        async with serve(settings) as (app, client):
            app.state.services.batcher.add_listener(records.append)
            await asyncio.gather(
                predict(client, "bbc-news", NEWS), predict(client, "sentiment", REVIEWS),
                predict(client, "score", REVIEWS[:1]),
            )  # fmt: skip
            return [await routing(client, task) for task in ("bbc-news", "sentiment", "score")]

    news, reviews, score = asyncio.run(scenario())
    assert any(len(record.tasks) == 3 for record in records), records
    assert (news["rows"], news["tokens"]) == (5, sum(token_counts(minilm_encoder, NEWS)))
    assert (reviews["rows"], reviews["tokens"]) == (2, sum(token_counts(minilm_encoder, REVIEWS)))
    assert torch.equal(counts_of(news), expected_counts(minilm_encoder, BBC, NEWS)[0])
    # A regression task has one bucket, so its parents cannot tell labels apart.
    assert score["labels"] == ["all"]
    assert score["task_type"] == "regression"
    assert int(counts_of(score).sum()) == score["tokens"] * 8 * minilm_encoder.backbone.num_layers
    assert all(layer["mutual_information_bits"] == 0.0 for layer in score["layers"])


def test_a_top_layers_task_reports_its_memory_layers_only(
    minilm_encoder: Any, make_memory: Any, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    """A task with memories in layers 3-5, served in mixed batches beside a task with memories in
    every layer: its statistics and its per-prediction routing cover layers 3, 4, 5; the other's all 6."""
    from app.spartan.memfile import memory_to_bytes

    settings = settings_for(max_batch_size=64, max_wait_ms=300)
    top = memory_to_bytes(make_memory(seed=3, labels=("a", "b", "c"), first_memory_layer=3))
    write_memory(settings, "bbc-news", BBC)
    write_memory(settings, "top", top)
    records: list[BatchRecord] = []

    async def scenario() -> tuple[Any, ...]:
        async with serve(settings) as (app, client):
            app.state.services.batcher.add_listener(records.append)
            described = (await client.get("/v1/tasks/top")).json()
            routed = await client.post(
                "/v1/tasks/top/predict", json={"inputs": NEWS[:1], "return_routing": True}
            )
            await asyncio.gather(predict(client, "bbc-news", NEWS), predict(client, "top", NEWS))
            return described, routed.json(), await routing(client, "top"), await routing(client, "bbc-news")

    described, routed, stats, news = asyncio.run(scenario())
    assert any(len(record.tasks) == 2 for record in records), records
    assert described["first_memory_layer"] == 3
    assert len(routed["predictions"][0]["routing"]) == 3
    assert [layer["layer"] for layer in stats["layers"]] == [3, 4, 5]
    assert [layer["layer"] for layer in news["layers"]] == list(range(6))
    expected, _ = expected_counts(minilm_encoder, top, NEWS[:1])
    both, _ = expected_counts(minilm_encoder, top, NEWS)
    assert torch.equal(counts_of(stats), expected + both)
    assert stats["tokens"] == sum(token_counts(minilm_encoder, [NEWS[0], *NEWS]))


def test_switched_off_guarded_and_documented(settings_for: Any, serve: Any, write_memory: Any) -> None:
    off = settings_for(routing_stats=False)
    write_memory(off, "sentiment", SENTIMENT)
    guarded = settings_for(predict_api_key="reader-key-0123456789")
    write_memory(guarded, "sentiment", SENTIMENT)

    async def scenario() -> tuple[Any, ...]:
        async with serve(off) as (app, client):
            assert app.state.services.routing_tally is None
            await predict(client, "sentiment", REVIEWS)
            disabled = (await client.get("/v1/tasks/sentiment/routing")).json()
        async with serve(guarded) as (_, client):
            anonymous = (await client.get("/v1/tasks/sentiment/routing")).status_code
            key = {"Authorization": "Bearer reader-key-0123456789"}
            allowed = await routing(client, "sentiment", headers=key)
            schema = (await client.get("/openapi.json")).json()
        return disabled, anonymous, allowed, schema

    disabled, anonymous, allowed, schema = asyncio.run(scenario())
    assert disabled["error"]["type"] == "routing_stats_disabled"
    assert anonymous == 401
    assert allowed["rows"] == 0
    route = schema["paths"]["/v1/tasks/{task}/routing"]["get"]
    assert {"200", "401", "404"} <= set(route["responses"])
    assert schema["components"]["schemas"]["RoutingOut"]["examples"]


class BrokenTally(RoutingTally):
    def add_pass(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("counting broke")


def test_a_counting_failure_never_costs_a_prediction(minilm_encoder: Any) -> None:
    memory = load_memory(SENTIMENT, minilm_encoder.identity())
    rows = [Row(memory, text, task="sentiment") for text in REVIEWS]
    plain = EncoderRunner(minilm_encoder)
    broken = EncoderRunner(minilm_encoder, BrokenTally())
    expected = [r.outputs for r in plain.run(plain.prepare(rows))]
    served = [r.outputs for r in broken.run(broken.prepare(rows))]
    assert len(served) == len(rows)
    for got, want in zip(served, expected, strict=True):
        assert_f32_close(got, want)

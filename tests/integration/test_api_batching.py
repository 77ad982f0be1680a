"""Mixed-task batching through the API on the real backbone: concurrent requests of three different
tasks share forward passes (seen from the batcher, not assumed) and each gets exactly what it gets
when served alone; overload is refused with 429s, never a hang."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from app.engine.batcher import BatchRecord

pytestmark = pytest.mark.model

# Three tasks that differ in everything a batch must keep apart: own LayerNorms or not, max_length
# (the intents task truncates at 12 tokens), single texts vs text pairs, classification vs regression.
TASKS: dict[str, dict[str, Any]] = {
    "reviews": {"seed": 11, "max_length": 128},
    "intents": {
        "seed": 12,
        "max_length": 12,
        "labels": ("card", "loan", "fees", "other"),
        "layernorms": False,
    },
    "similar": {"seed": 13, "max_length": 48, "text_pairs": True, "task_type": "regression"},
}
REQUESTS: list[tuple[str, list[Any]]] = [
    ("reviews", ["a gripping, beautifully acted film", "dull"]),
    ("reviews", ["I laughed, I cried, and then I laughed some more at how bad the ending was."]),
    ("intents", ["my card was swallowed by the cash machine this morning and I need it back", "loan"]),
    ("intents", ["why was I charged a fee for a transfer between my own accounts at the weekend?"]),
    ("similar", [["how do I reset my PIN?", "I forgot my PIN number"], ["hello", "goodbye"]]),
    ("similar", ["a single text for a pair task gets an empty pair, as in training"]),
    ("reviews", ["an unexpected delight"]),
    ("intents", ["what is the interest rate"]),
    ("similar", [["is the bank open on sunday", "opening hours at weekends"]]),
]


def scores_of(payload: dict[str, Any]) -> list[list[float]]:
    out = []
    for p in payload["predictions"]:
        out.append([p["value"]] if p["value"] is not None else [p["scores"][k] for k in sorted(p["scores"])])
    return out


def test_concurrent_requests_of_three_tasks_share_passes_and_match_serving_alone(
    memory_file: Any, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    # A long max_wait so that all requests are queued before the first batch closes.
    settings = settings_for(max_batch_size=64, max_wait_ms=300)
    for task, options in TASKS.items():
        write_memory(settings, task, memory_file(**options))
    records: list[BatchRecord] = []

    async def ask(client: Any, task: str, inputs: list[Any]) -> dict[str, Any]:
        body = {"inputs": inputs, "return_all_scores": True}
        response = await client.post(f"/v1/tasks/{task}/predict", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with serve(settings) as (app, client):
            # Resident first, so that every request reaches the queue at once (no cold loads).
            await asyncio.gather(*(ask(client, task, ["warm up"]) for task in TASKS))
            app.state.services.batcher.add_listener(records.append)
            together = await asyncio.gather(*(ask(client, task, inputs) for task, inputs in REQUESTS))
            mixed_records = list(records)
            records.clear()
            alone = [await ask(client, task, inputs) for task, inputs in REQUESTS]
            records.extend(mixed_records)
            return together, alone

    together, alone = asyncio.run(scenario())
    mixed_passes = [p for record in records for p in record.passes if len(p.tasks) > 1]
    assert mixed_passes, f"no forward pass mixed tasks: {records}"
    assert any(len(record.tasks) == 3 for record in records), records
    for (task, inputs), got, reference in zip(REQUESTS, together, alone, strict=True):
        assert got["version"] == reference["version"]
        for row_got, row_alone in zip(scores_of(got), scores_of(reference), strict=True):
            assert row_got == pytest.approx(row_alone, abs=1e-5), (task, inputs)
        assert [p["label"] for p in got["predictions"]] == [p["label"] for p in reference["predictions"]]


def test_overload_gets_429_with_retry_after_not_a_hang(
    memory_file: Any, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    settings = settings_for(max_batch_size=1, max_wait_ms=0, max_queue_rows=4, max_inputs_per_request=2)
    write_memory(settings, "reviews", memory_file(seed=1))
    body = {"inputs": ["a fairly ordinary sentence about a film", "and another one"]}

    async def scenario() -> tuple[list[Any], float, float | None]:
        async with serve(settings) as (app, client):
            await client.post("/v1/tasks/reviews/predict", json=body)  # resident before the burst
            started = time.monotonic()
            burst = [client.post("/v1/tasks/reviews/predict", json=body) for _ in range(40)]
            responses = await asyncio.wait_for(asyncio.gather(*burst), timeout=60)
            refused = app.state.metrics.registry.get_sample_value(
                "spartan_requests_total", {"task": "reviews", "outcome": "overloaded"}
            )
            return responses, time.monotonic() - started, refused

    responses, seconds, refused = asyncio.run(scenario())
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}, statuses
    assert statuses.count(429) >= 20
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["error"]["type"] == "overloaded"
    assert refused == statuses.count(429)
    assert seconds < 30

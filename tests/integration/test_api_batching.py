"""Mixed-task batching through the API (plumbing: the tiny random backbone). Concurrent requests of
three different tasks share forward passes (seen from the batcher, not assumed) and each gets exactly
what it gets when served alone; overload is refused at once with 429s, never a hang. The batch worker
is held inside a pass (HeldRunner) while the queue is built, so batches and counts are exact."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from api_fixtures import HeldRunner

from app.engine.batcher import BatchRecord

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
    # No fill window: the worker takes whatever is queued, and the held runner decides what that is.
    # A huge pass overhead makes the planner keep a batch in one pass (no cut saves that much padding).
    settings = settings_for(max_batch_size=64, max_wait_ms=0, pass_overhead_tokens=100_000)
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
            # Resident first, so that no request waits on a cold load.
            await asyncio.gather(*(ask(client, task, ["warm up"]) for task in TASKS))
            held = HeldRunner.install(app)
            # One worker runs batches one after another, and publishes each before taking the next: a
            # batch published once the held runner has been entered is the blocker's or a later one.
            app.state.services.batcher.add_listener(
                lambda r: records.append(r) if held.running.is_set() else None
            )
            blocker = asyncio.ensure_future(ask(client, "reviews", ["holds the worker"]))
            await held.until_running()
            together = [asyncio.ensure_future(ask(client, task, inputs)) for task, inputs in REQUESTS]
            await held.until_accepted(1 + len(REQUESTS))  # all queued behind the held batch
            held.release()
            await blocker
            results = await asyncio.gather(*together)
            alone = [await ask(client, task, inputs) for task, inputs in REQUESTS]
            return results, alone

    together, alone = asyncio.run(scenario())  # the worker has stopped: every batch is published
    # The blocker, then every request at once in one pass of all three tasks, then each one alone.
    assert [r.requests for r in records] == [1, len(REQUESTS)] + [1] * len(REQUESTS), records
    batch = records[1]
    assert sorted(batch.tasks) == sorted(TASKS)  # queue order is the order the requests arrived
    assert batch.rows == sum(len(inputs) for _, inputs in REQUESTS)
    assert [(p.rows, set(p.tasks)) for p in batch.passes] == [(batch.rows, set(TASKS))]
    assert batch.failed_requests == 0
    for (task, inputs), got, reference in zip(REQUESTS, together, alone, strict=True):
        assert got["version"] == reference["version"]
        # float32 over a padded, mixed batch vs alone: reduction order differs, ~1e-7 relative.
        for row_got, row_alone in zip(scores_of(got), scores_of(reference), strict=True):
            assert row_got == pytest.approx(row_alone, abs=1e-5), (task, inputs)
        assert [p["label"] for p in got["predictions"]] == [p["label"] for p in reference["predictions"]]


def test_overload_gets_429_with_retry_after_not_a_hang(
    memory_file: Any, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    settings = settings_for(max_batch_size=1, max_wait_ms=0, max_queue_rows=4, max_inputs_per_request=2)
    write_memory(settings, "reviews", memory_file(seed=1))
    body = {"inputs": ["a fairly ordinary sentence about a film", "and another one"]}  # 2 rows
    url = "/v1/tasks/reviews/predict"

    async def scenario() -> tuple[list[Any], list[Any], float | None]:
        async with serve(settings) as (app, client):
            assert (await client.post(url, json=body)).status_code == 200  # resident before the burst
            held = HeldRunner.install(app)
            running = asyncio.ensure_future(client.post(url, json=body))
            await held.until_running()  # the worker holds this one; the queue is empty
            queued = [asyncio.ensure_future(client.post(url, json=body)) for _ in range(2)]
            await held.until_accepted(3)  # 4 rows queued: the queue is full
            # Nothing can drain while the worker is held: these are answered without waiting for work.
            refused = await asyncio.wait_for(
                asyncio.gather(*(client.post(url, json=body) for _ in range(10))), 30
            )
            held.release()
            served = await asyncio.gather(running, *queued)
            overloaded = app.state.metrics.registry.get_sample_value(
                "spartan_requests_total", {"task": "reviews", "outcome": "overloaded"}
            )
            return refused, served, overloaded

    refused, served, overloaded = asyncio.run(scenario())
    assert [r.status_code for r in refused] == [429] * 10
    for response in refused:
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["type"] == "overloaded"
    assert [r.status_code for r in served] == [200] * 3  # the accepted ones are all answered
    assert overloaded == 10

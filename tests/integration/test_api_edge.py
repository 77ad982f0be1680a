"""The HTTP edge through the real app (real MiniLM, lifespan and batcher): texts that cannot be encoded
are refused before they are queued, multipart is recognised in any case, /metrics has its own key and
a bounded set of task labels."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import OTHER_TASKS, UNKNOWN_TASK

pytestmark = pytest.mark.model

ADMIN_KEY = f"admin-{uuid.uuid4().hex}"
PREDICT_KEY = f"predict-{uuid.uuid4().hex}"
METRICS_KEY = f"metrics-{uuid.uuid4().hex}"

LONE_SURROGATE = "\ud800"  # valid JSON ("\ud800"), but no UTF-8 encoding exists for it


@pytest.mark.parametrize(
    ("inputs", "index"),
    [
        ([LONE_SURROGATE], 0),
        (["a fine film", f"dull {LONE_SURROGATE} and long"], 1),
        (["ok", "ok", ["a fine film", f"{LONE_SURROGATE}"]], 2),  # the second text of a pair
        ([["\udfff", "ok"]], 0),
    ],
)
def test_a_text_with_a_lone_surrogate_gets_422_before_it_is_queued(
    inputs: list[Any], index: int, settings_for: Any, serve: Any, memory_file: Any, write_memory: Any
) -> None:
    settings = settings_for()
    write_memory(settings, "pairs", memory_file(seed=3, text_pairs=True))

    async def scenario() -> None:
        async with serve(settings) as (app, client):
            # json.dumps writes the surrogate as the escape "\ud800", as a client would send it (httpx's
            # json= refuses: it encodes to UTF-8, which has no such character).
            body = json.dumps({"inputs": inputs}).encode()
            response = await client.post(
                "/v1/tasks/pairs/predict", content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert error["type"] == "invalid_request"
            assert f"input {index}" in error["message"]
            assert "UTF-8" in error["message"]
            # Never queued: the batch worker ran no batch, and a good request is served alongside.
            batches = app.state.metrics.batch_size.collect()[0].samples
            assert next(s.value for s in batches if s.name == "spartan_batch_size_count") == 0
            ok = await client.post("/v1/tasks/pairs/predict", json={"inputs": [["a fine film", "ok"]]})
            assert ok.status_code == 200, ok.text

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "content_type", ["Multipart/Form-Data", "MULTIPART/FORM-DATA", "multipart/form-data"]
)
def test_multipart_uploads_are_recognised_in_any_case(
    content_type: str, settings_for: Any, serve: Any, memory_file: Any
) -> None:
    settings = settings_for()
    data = memory_file(seed=4)
    boundary = "spartanboundary0123456789"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.safetensors"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )

    async def scenario() -> None:
        async with serve(settings) as (_, client):
            response = await client.put(
                "/v1/tasks/cased/memory",
                content=body,
                headers={"content-type": f"{content_type}; boundary={boundary}"},
            )
            assert response.status_code == 201, response.text
            listed = (await client.get("/v1/tasks/cased")).json()
            assert listed["file_bytes"] == len(data)

    asyncio.run(scenario())


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("keys", "allowed", "refused"),
    [
        # Its own key: only it opens /metrics (Prometheus holds no key that reads or writes tasks).
        (
            {"metrics_api_key": METRICS_KEY, "predict_api_key": PREDICT_KEY, "admin_api_key": ADMIN_KEY},
            [METRICS_KEY],
            [None, PREDICT_KEY, ADMIN_KEY, "wrong-key-0123456789"],
        ),
        ({"metrics_api_key": METRICS_KEY}, [METRICS_KEY], [None, "wrong-key-0123456789"]),
        # No metrics key but a predict key: /metrics names every task, so it is guarded like listings.
        ({"predict_api_key": PREDICT_KEY, "admin_api_key": ADMIN_KEY}, [PREDICT_KEY, ADMIN_KEY], [None]),
        ({}, [None], []),
    ],
    ids=["metrics-key", "metrics-key-alone", "predict-key-only", "no-keys"],
)
def test_metrics_need_their_key(
    keys: dict[str, str],
    allowed: list[str | None],
    refused: list[str | None],
    settings_for: Any,
    serve: Any,
    memory_file: Any,
    write_memory: Any,
) -> None:
    settings = settings_for(**keys)
    write_memory(settings, "secret-task-name", memory_file(seed=6))

    async def scenario() -> None:
        async with serve(settings) as (app, client):
            reader = PREDICT_KEY if "predict_api_key" in keys else None
            predicted = await client.post(
                "/v1/tasks/secret-task-name/predict",
                json={"inputs": ["fine"]},
                headers=bearer(reader) if reader else {},
            )
            assert predicted.status_code == 200, predicted.text
            for key in allowed:
                response = await client.get("/metrics", headers=bearer(key) if key else {})
                assert response.status_code == 200, (key, response.text)
                assert 'task="secret-task-name"' in response.text
            for key in refused:
                response = await client.get("/metrics", headers=bearer(key) if key else {})
                assert response.status_code == 401, (key, response.text)
                assert response.json()["error"]["type"] == "authentication_required"
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert "secret-task-name" not in response.text
            if "predict_api_key" in keys:  # the metrics key opens /metrics only
                listing = await client.get("/v1/tasks", headers=bearer(METRICS_KEY))
                assert listing.status_code == 401
            operation = app.openapi()["paths"]["/metrics"]["get"]
            assert ("401" in operation["responses"]) == bool(refused)
            assert bool(operation.get("security")) == bool(refused)

    asyncio.run(scenario())


def test_task_labels_are_capped_by_metrics_max_task_labels(
    settings_for: Any, serve: Any, memory_file: Any, write_memory: Any
) -> None:
    settings = settings_for(metrics_max_task_labels=2)
    tasks = ["t-a", "t-b", "t-c", "t-d"]
    for seed, task in enumerate(tasks):
        write_memory(settings, task, memory_file(seed=10 + seed))

    async def scenario() -> str:
        async with serve(settings) as (_, client):
            for task in [*tasks, "t-a", "t-d"]:  # the first two seen keep their label for good
                response = await client.post(f"/v1/tasks/{task}/predict", json={"inputs": ["fine"]})
                assert response.status_code == 200, response.text
            for invented in ("no-such-1", "no-such-2"):
                response = await client.post(f"/v1/tasks/{invented}/predict", json={"inputs": ["x"]})
                assert response.status_code == 404
            return (await client.get("/metrics")).text

    exposition = asyncio.run(scenario())
    counts: dict[tuple[str, str], float] = {}
    labels: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if "task" in sample.labels:
                labels.add(sample.labels["task"])
            if sample.name == "spartan_requests_total":
                counts[(sample.labels["task"], sample.labels["outcome"])] = sample.value
    assert labels == {"t-a", "t-b", OTHER_TASKS, UNKNOWN_TASK}, labels
    assert counts[("t-a", "ok")] == 2
    assert counts[("t-b", "ok")] == 1
    assert counts[(OTHER_TASKS, "ok")] == 3  # t-c, t-d, t-d
    assert counts[(UNKNOWN_TASK, "not_found")] == 2

"""The HTTP edge through the real app (real MiniLM, lifespan and batcher): texts that cannot be encoded
are refused before they are queued, multipart is recognised in any case, /metrics has its own key and
a bounded set of task labels."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

pytestmark = pytest.mark.model

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

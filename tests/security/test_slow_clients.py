"""Slow clients cannot hold the service: a body that does not arrive within SPARTAN_BODY_TIMEOUT_S is
answered 408, for predictions and uploads alike, and the service goes on serving."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytestmark = pytest.mark.model


def stalling_body(first: bytes, stall_s: float) -> Any:
    async def chunks() -> AsyncIterator[bytes]:
        yield first
        await asyncio.sleep(stall_s)  # the client stops sending half-way
        yield b"}"

    return chunks()


@pytest.mark.parametrize(
    ("method", "path", "first"),
    [
        ("POST", "/v1/tasks/sentiment/predict", b'{"inputs": ["a fine'),
        ("PUT", "/v1/tasks/slow/memory", b"\x10\x00\x00\x00\x00\x00\x00\x00{"),
    ],
)
def test_a_stalled_body_gets_408_in_time_and_the_service_goes_on(
    method: str, path: str, first: bytes, settings_for: Any, serve: Any, memory_file: Any, write_memory: Any
) -> None:
    settings = settings_for(body_timeout_s=0.5)
    write_memory(settings, "sentiment", memory_file(seed=5))

    async def scenario() -> None:
        async with serve(settings) as (_, client):
            started = time.monotonic()
            stalled = await client.request(method, path, content=stalling_body(first, 5.0))
            waited = time.monotonic() - started
            assert stalled.status_code == 408, stalled.text
            assert stalled.json()["error"]["type"] == "body_timeout"
            assert "SPARTAN_BODY_TIMEOUT_S" in stalled.json()["error"]["message"]
            assert waited < 3, waited  # answered at the deadline, not when the client gave up
            ok = await client.post("/v1/tasks/sentiment/predict", json={"inputs": ["a fine film"]})
            assert ok.status_code == 200
            assert (await client.get("/v1/tasks/slow")).status_code == 404  # nothing was stored

    asyncio.run(scenario())

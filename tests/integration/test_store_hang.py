"""A memory store that freezes (SeaweedFS stopped with SIGSTOP: connections open, nothing answers),
through the API on the real backbone: every request is answered within its deadline, resident tasks
keep serving, /readyz and spartan_store_up say the store is down, and it comes back by itself.

Before the store calls were bounded, a cold prediction got its 503 after 40 s, an unknown task after
80 s and an upload after 40 s, with /readyz saying nothing.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from typing import Any

import pytest

pytestmark = pytest.mark.model

TEXTS = ["a gripping, beautifully acted film"]
STORE_TIMEOUT_S, REQUEST_TIMEOUT_S = 1.0, 5.0


def s3_settings(seaweed: Any, prefix: str) -> dict[str, Any]:
    env = seaweed.settings_env(seaweed.bucket, prefix)
    return {key.removeprefix("SPARTAN_").lower(): value for key, value in env.items()}


async def timed(request: Any) -> tuple[float, Any]:
    started = time.monotonic()
    response = await request
    return time.monotonic() - started, response


def test_a_frozen_store_costs_no_request_its_deadline(
    seaweed: Any, memory_file: Any, settings_for: Any, serve: Any
) -> None:
    prefix = f"{uuid.uuid4().hex[:12]}/"
    client = seaweed.client()
    for number, task in enumerate(("alpha", "beta", "gamma")):
        client.put_object(
            Bucket=seaweed.bucket, Key=f"{prefix}{task}.safetensors", Body=memory_file(seed=number)
        )
    settings = settings_for(
        **s3_settings(seaweed, prefix),
        store_timeout_s=STORE_TIMEOUT_S,
        s3_timeout_s=0.5,
        request_timeout_s=REQUEST_TIMEOUT_S,
    )
    upload = memory_file(seed=9)

    async def scenario() -> None:
        async with serve(settings) as (_, api):
            assert (await api.post("/v1/tasks/alpha/predict", json={"inputs": TEXTS})).status_code == 200
            assert (await api.get("/readyz")).json()["store"] == "up"
            seaweed.send(signal.SIGSTOP)
            try:
                # Two cold tasks at once, an unknown task and an upload: none waits on the other.
                answers = await asyncio.gather(
                    timed(api.post("/v1/tasks/beta/predict", json={"inputs": TEXTS})),
                    timed(api.post("/v1/tasks/gamma/predict", json={"inputs": TEXTS})),
                    timed(api.post("/v1/tasks/nope/predict", json={"inputs": TEXTS})),
                    timed(api.put("/v1/tasks/delta/memory", content=upload)),
                )
                for seconds, response in answers:
                    assert response.status_code == 503, response.text
                    assert response.json()["error"]["type"] == "store_unavailable"
                    assert seconds < REQUEST_TIMEOUT_S, f"{seconds:.1f} s: past the request deadline"
                print("frozen store: answered in", ", ".join(f"{s:.2f} s" for s, _ in answers))
                seconds, resident = await timed(api.post("/v1/tasks/alpha/predict", json={"inputs": TEXTS}))
                assert resident.status_code == 200  # what is resident serves, store or not
                ready = await api.get("/readyz")
                assert ready.status_code == 200
                assert ready.json()["store"] == "down"
                assert "spartan_store_up 0.0" in (await api.get("/metrics")).text
            finally:
                seaweed.send(signal.SIGCONT)
            # Back: the next call after the probe interval finds it answering (bounded retry loop).
            deadline = time.monotonic() + 30
            while (await api.post("/v1/tasks/beta/predict", json={"inputs": TEXTS})).status_code != 200:
                assert time.monotonic() < deadline, "the store never came back"
                await asyncio.sleep(0.2)  # pacing a retry loop, not synchronising threads
            assert (await api.get("/readyz")).json()["store"] == "up"
            assert (await api.put("/v1/tasks/delta/memory", content=upload)).status_code in (200, 201)

    asyncio.run(scenario())

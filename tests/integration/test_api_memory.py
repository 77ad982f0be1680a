"""Task memories through the API (plumbing: the tiny random backbone): upload, replace, hot swap under
load, every kind of bad upload, delete, listing, auth of writes, store polling, probes and metrics."""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import torch
from api_fixtures import HeldRunner
from safetensors.torch import save as save_safetensors

from app.registry.store import LocalFolderStore
from app.spartan.memfile import memory_tensors, spec_metadata
from app.spartan.memory import TaskMemory

TEXTS = ["a gripping, beautifully acted film", "dull and far too long", "an unexpected delight"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def crafted(
    memory: TaskMemory,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
    drop: str | None = None,
) -> bytes:
    """A memory file with some tensors or metadata replaced, or one tensor dropped."""
    contents = {**memory_tensors(memory), **(tensors or {})}
    if drop is not None:
        del contents[drop]
    return save_safetensors(contents, metadata={**spec_metadata(memory.spec), **(metadata or {})})


def pickled(memory: TaskMemory) -> bytes:
    buffer = io.BytesIO()
    torch.save(memory.state_dict(), buffer)
    return buffer.getvalue()


INVALID, MISMATCH, TOO_LARGE = (422, "memory_invalid"), (409, "backbone_mismatch"), (413, "payload_too_large")


def bad_uploads(memory: TaskMemory, good: bytes) -> list[tuple[str, bytes, tuple[int, str], str]]:
    """(case, body, (status, error type), a phrase the message must contain)."""
    tensors = memory_tensors(memory)
    nan = tensors["layers.1.child_values"].clone()
    nan[0, 0, 0] = float("nan")
    half = tensors["head.dense.bias"].half()
    parents, hidden = memory.spec.num_parents, memory.spec.hidden_size
    return [
        ("empty", b"", INVALID, "empty file"),
        ("not safetensors", b"hello, I am a text file and not a memory", INVALID, "header"),
        ("pickle", pickled(memory), INVALID, "pickle"),
        ("truncated", good[: len(good) // 2], INVALID, "truncated"),
        ("missing tensor", crafted(memory, drop="head.out.bias"), INVALID, "missing tensors: head.out.bias"),
        ("extra tensor", crafted(memory, tensors={"layers.0.bias": torch.zeros(3)}), INVALID, "unexpected"),
        ("wrong shape", crafted(memory, tensors={"layers.0.parent_keys": torch.zeros(parents + 1, hidden)}),
         INVALID, f"expected shape [{parents}, {hidden}]"),
        ("wrong dtype", crafted(memory, tensors={"head.dense.bias": half}), INVALID, "expected dtype F32"),
        ("non-finite", crafted(memory, tensors={"layers.1.child_values": nan}), INVALID, "non-finite"),
        ("format version", crafted(memory, metadata={"format_version": "99"}), INVALID, "unsupported format"),
        ("wrong backbone", crafted(memory, metadata={"backbone_fingerprint": "f" * 64}), MISMATCH,
         "trained for backbone"),
        ("wrong width", crafted(memory, metadata={"hidden_size": str(2 * hidden)}), MISMATCH, "width"),
        ("too large", b"\0" * 3_000_001, TOO_LARGE, "3000000 bytes"),
    ]  # fmt: skip


async def stream(size: int, chunk: int = 65536) -> AsyncIterator[bytes]:
    for start in range(0, size, chunk):
        yield b"\0" * min(chunk, size - start)


def probabilities(payload: dict[str, Any]) -> list[list[float]]:
    return [[p["scores"][label] for label in sorted(p["scores"])] for p in payload["predictions"]]


async def predict(client: Any, task: str, texts: list[str] = TEXTS) -> dict[str, Any]:
    response = await client.post(
        f"/v1/tasks/{task}/predict", json={"inputs": texts, "return_all_scores": True}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_upload_predict_replace_delete(memory_file: Any, settings_for: Any, serve: Any) -> None:
    settings = settings_for()
    v1, v2, v3 = memory_file(seed=21), memory_file(seed=22), memory_file(seed=23)

    async def scenario() -> None:
        async with serve(settings) as (_, client):
            url = "/v1/tasks/reviews/memory"
            created = await client.put(url, content=v1, headers={"Content-Type": "application/octet-stream"})
            assert created.status_code == 201, created.text
            assert created.headers["ETag"] == f'"{sha(v1)}"'
            assert created.json()["status"] == "loaded"
            assert (await predict(client, "reviews"))["version"] == sha(v1)

            conflict = await client.put(url, content=v2)
            assert conflict.status_code == 409
            assert conflict.json()["error"]["type"] == "memory_conflict"
            stale = await client.put(url, content=v2, headers={"If-Match": f'"{"0" * 64}"'})
            assert stale.status_code == 409
            matched = await client.put(url, content=v2, headers={"If-Match": created.headers["ETag"]})
            assert matched.status_code == 200, matched.text
            assert (await predict(client, "reviews"))["version"] == sha(v2)

            multipart = await client.put(f"{url}?replace=true", files={"file": ("reviews.safetensors", v3)})
            assert multipart.status_code == 200, multipart.text
            assert multipart.json()["version"] == sha(v3)
            assert (settings.memory_dir / "reviews.safetensors").read_bytes() == v3

            listing = (await client.get("/v1/tasks")).json()
            assert [t["name"] for t in listing["tasks"]] == ["reviews"]
            info = (await client.get("/v1/tasks/reviews")).json()
            assert info["version"] == sha(v3)
            assert info["labels"] == ["negative", "positive"]
            assert info["requests"] == {"ok": 2}
            assert info["memory_bytes"] > 0

            assert (await client.delete("/v1/tasks/reviews")).status_code == 204
            assert (await client.post("/v1/tasks/reviews/predict", json={"inputs": ["x"]})).status_code == 404
            assert (await client.get("/v1/tasks/reviews")).status_code == 404
            assert (await client.delete("/v1/tasks/reviews")).status_code == 404
            assert not (settings.memory_dir / "reviews.safetensors").exists()
            assert (await client.get("/v1/tasks")).json()["loaded_bytes"] == 0

    asyncio.run(scenario())


def test_every_bad_upload_gets_its_4xx_and_the_old_version_keeps_serving(
    make_memory: Any, memory_file: Any, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    settings = settings_for(max_upload_bytes=3_000_000)
    good = memory_file(seed=31)
    memory = make_memory(seed=32)
    write_memory(settings, "reviews", good)

    async def scenario() -> None:
        async with serve(settings) as (_, client):
            before = await predict(client, "reviews")
            for case, body, (status, kind), phrase in bad_uploads(memory, good):
                response = await client.put("/v1/tasks/reviews/memory?replace=true", content=body)
                assert response.status_code == status, (case, response.text)
                error = response.json()["error"]
                assert error["type"] == kind, (case, error)
                assert phrase in error["message"], (case, error)
                after = await predict(client, "reviews")
                assert after == before, case
                assert (await client.get("/v1/tasks/reviews")).json()["version"] == sha(good), case
            chunked = await client.put("/v1/tasks/reviews/memory?replace=true", content=stream(3_000_001))
            assert chunked.status_code == 413, chunked.text  # no Content-Length: counted while streaming
            no_file = await client.put("/v1/tasks/reviews/memory?replace=true", files={"other": ("x", b"y")})
            assert no_file.status_code == 422
            assert "no file part" in no_file.json()["error"]["message"]
            assert (settings.memory_dir / "reviews.safetensors").read_bytes() == good
            files = sorted(
                p.name for p in settings.memory_dir.iterdir() if p.name != LocalFolderStore.LOCK_NAME
            )
            assert files == ["reviews.safetensors"]

    asyncio.run(scenario())


def test_replacing_under_load_each_response_carries_the_version_that_produced_it(
    memory_file: Any, settings_for: Any, serve: Any
) -> None:
    # Small batches, no waiting, and the worker held while the queue is built: 30 requests are still
    # queued (behind the held batch) when the swap happens, 10 more come after it.
    settings = settings_for(max_batch_size=2, max_wait_ms=0)
    v1, v2 = memory_file(seed=41), memory_file(seed=42)
    batches: list[tuple[float, tuple[str, ...]]] = []

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any], float]:
        async with serve(settings) as (app, client):
            assert (await client.put("/v1/tasks/reviews/memory", content=v1)).status_code == 201
            reference = {sha(v1): await predict(client, "reviews")}
            app.state.services.batcher.add_listener(lambda r: batches.append((time.monotonic(), r.versions)))
            held = HeldRunner.install(app)
            first = [asyncio.ensure_future(predict(client, "reviews")) for _ in range(30)]
            await held.until_accepted(30)
            swapped = await client.put("/v1/tasks/reviews/memory?replace=true", content=v2)
            swapped_at = time.monotonic()
            assert swapped.status_code == 200, swapped.text
            second = [asyncio.ensure_future(predict(client, "reviews")) for _ in range(10)]
            await held.until_accepted(40)
            held.release()
            results = await asyncio.gather(*first, *second)
            reference[sha(v2)] = await predict(client, "reviews")
            return results[:30], results[30:], reference, swapped_at

    first, second, reference, swapped_at = asyncio.run(scenario())
    assert {r["version"] for r in first} == {sha(v1)}
    assert {r["version"] for r in second} == {sha(v2)}
    for response in first + second:
        expected = probabilities(reference[response["version"]])
        for got, want in zip(probabilities(response), expected, strict=True):
            assert got == pytest.approx(want, abs=1e-5)
    assert any(at > swapped_at and sha(v1) in versions for at, versions in batches), (
        "no request queued before the swap ran after it: the test did not exercise a swap in flight"
    )


def test_writes_need_the_admin_key_or_the_dev_flag(memory_file: Any, settings_for: Any, serve: Any) -> None:
    data = memory_file(seed=51)

    async def scenario() -> None:
        async with serve(settings_for(allow_unauthenticated_writes=False)) as (_, client):
            refused = await client.put("/v1/tasks/reviews/memory", content=data)
            assert refused.status_code == 403
            assert "SPARTAN_ADMIN_API_KEY" in refused.json()["error"]["message"]
        async with serve(settings_for(admin_api_key="s3cret-0123456789abc")) as (_, client):
            url = "/v1/tasks/reviews/memory"
            assert (await client.put(url, content=data)).status_code == 401
            wrong = {"Authorization": "Bearer s3cret-0123456789ab"}  # one character short
            assert (await client.put(url, content=data, headers=wrong)).status_code == 401
            right = {"Authorization": "Bearer s3cret-0123456789abc"}
            assert (await client.put(url, content=data, headers=right)).status_code == 201
            assert (await client.delete("/v1/tasks/reviews")).status_code == 401
            assert (await client.delete("/v1/tasks/reviews", headers=right)).status_code == 204
            bad_name = await client.put("/v1/tasks/..hidden/memory", content=data, headers=right)
            assert bad_name.status_code == 422

    asyncio.run(scenario())


def test_files_dropped_in_the_store_are_served_without_restart(
    memory_file: Any, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    settings = settings_for(store_poll_interval_s=0.05)
    v1, v2 = memory_file(seed=61), memory_file(seed=62)

    async def wait_for_version(client: Any, version: str) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            response = await client.get("/v1/tasks/dropped")
            if response.status_code == 200 and response.json()["version"] == version:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"version {version} never showed up")

    async def scenario() -> None:
        async with serve(settings) as (_, client):
            write_memory(settings, "dropped", v1)
            await wait_for_version(client, sha(v1))
            assert (await predict(client, "dropped"))["version"] == sha(v1)
            tmp = settings.memory_dir / ".dropped.tmp"
            tmp.write_bytes(v2)
            tmp.replace(settings.memory_dir / "dropped.safetensors")
            await wait_for_version(client, sha(v2))
            assert (await predict(client, "dropped"))["version"] == sha(v2)

    asyncio.run(scenario())


def test_listing_shows_pinned_and_invalid_tasks(
    memory_file: Any, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    settings = settings_for(pinned_tasks=["pinned"])
    write_memory(settings, "pinned", memory_file(seed=81))
    cold = memory_file(seed=82)
    write_memory(settings, "cold", cold)
    write_memory(settings, "broken", memory_file(seed=83)[:5000])

    async def scenario() -> tuple[dict[str, Any], httpx.Response]:
        async with serve(settings) as (_, client):
            listing = (await client.get("/v1/tasks")).json()
            broken = await client.post("/v1/tasks/broken/predict", json={"inputs": ["x"]})
            return listing, broken

    listing, broken = asyncio.run(scenario())
    tasks = {task["name"]: task for task in listing["tasks"]}
    assert (tasks["pinned"]["status"], tasks["pinned"]["pinned"]) == ("loaded", True)
    assert (tasks["cold"]["status"], tasks["cold"]["pinned"]) == ("on_disk", False)
    assert tasks["cold"]["version"] == sha(cold)
    assert tasks["broken"]["status"] == "invalid"
    assert "truncated" in tasks["broken"]["error"]
    assert listing["loaded"] == 1
    assert broken.status_code == 503
    assert broken.json()["error"]["type"] == "task_unavailable"
    assert "truncated" in broken.json()["error"]["message"]


def test_probes_and_metrics(memory_file: Any, settings_for: Any, serve: Any, write_memory: Any) -> None:
    settings = settings_for()
    write_memory(settings, "reviews", memory_file(seed=71))

    async def scenario() -> tuple[str, list[int]]:
        async with serve(settings) as (app, client):
            backbone = app.state.services.encoder.backbone
            fingerprint = backbone.fingerprint[:16]
            runtime = app.state.services.encoder.runtime
            build = (
                f'spartan_build_info{{backbone="{backbone.name}",backbone_fingerprint="{fingerprint}",'
                f'runtime="{runtime}"'
            )
            assert build in (await client.get("/metrics")).text
            await predict(client, "reviews")
            await client.put("/v1/tasks/other/memory", content=memory_file(seed=72))
            text = (await client.get("/metrics")).text
            statuses = [(await client.get("/healthz")).status_code, (await client.get("/readyz")).status_code]
            app.state.services.batcher.stop()  # a dead batch worker must fail readiness, not liveness
            not_ready = await client.get("/readyz")
            assert "batch worker is not running" in not_ready.json()["reasons"]
            statuses += [(await client.get("/healthz")).status_code, not_ready.status_code]
            return text, statuses

    text, statuses = asyncio.run(scenario())
    assert statuses == [200, 200, 200, 503]
    for series in [
        'spartan_request_duration_seconds_bucket{le="0.001",task="reviews"}',
        'spartan_queue_wait_seconds_count{task="reviews"}',
        'spartan_inference_duration_seconds_count{task="reviews"}',
        "spartan_batch_size_bucket",
        "spartan_batch_tasks_bucket",
        "spartan_queue_depth ",
        'spartan_requests_total{outcome="ok",task="reviews"} 1.0',
        'spartan_memory_loads_total{outcome="ok",source="store"} 1.0',
        'spartan_memory_loads_total{outcome="ok",source="upload"} 1.0',
        "spartan_memory_evictions_total",
        "spartan_memory_load_seconds_bucket",
        "spartan_memories_loaded 2.0",
        "spartan_memory_bytes ",
        "spartan_tasks_registered 2.0",
        "spartan_batch_failures_total",
    ]:
        assert series in text, series


def test_uploads_beyond_the_bytes_in_flight_get_429_and_the_budget_frees(
    memory_file: Any, settings_for: Any, serve: Any
) -> None:
    """An upload still streaming its body holds its reservation; the next one that would exceed the
    budget is refused at once (429 + Retry-After, nothing read); once the first is done, uploads fit."""
    data = memory_file(seed=11)
    settings = settings_for(max_upload_bytes_in_flight=int(1.5 * len(data)))
    release = asyncio.Event()
    first_chunk_sent = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield data[:1024]
        first_chunk_sent.set()
        await release.wait()
        yield data[1024:]

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with serve(settings) as (_, client):
            headers = {"content-length": str(len(data))}
            first = asyncio.ensure_future(
                client.put("/v1/tasks/first/memory", content=slow_body(), headers=headers)
            )
            await asyncio.wait_for(first_chunk_sent.wait(), 30)
            refused = await client.put("/v1/tasks/second/memory", content=data)
            release.set()
            done = await first
            after = await client.put("/v1/tasks/second/memory", content=data)
            return refused, done, after

    refused, done, after = asyncio.run(scenario())
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["type"] == "overloaded"
    assert "IN_FLIGHT" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert done.status_code == 201, done.text
    assert after.status_code == 201, after.text

"""The memory store misbehaving, through the API on the real backbone: a full or read-only store
(real tmpfs mounts: tests run as root, who ignores permissions), memories whose values are finite
but huge, labels that would print invisibly, and a store that stops answering."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from mounts import mounted, remount_read_only
from safetensors.torch import save as save_safetensors

from app.spartan.memfile import memory_tensors, memory_to_bytes, spec_metadata

pytestmark = pytest.mark.model

TEXTS = ["a gripping, beautifully acted film", "dull and far too long"]


def error_of(response: Any) -> tuple[int, str, str]:
    body = response.json()["error"]
    return response.status_code, body["type"], body["message"]


def test_a_read_only_store_starts_serves_and_refuses_writes_with_503(
    memory_file: Any, settings_for: Any, serve: Any, write_memory: Any, tmp_path: Any
) -> None:
    # `docker run --read-only` with the default store: the service used to fail at start creating
    # its lock file. Now it serves what the store holds, and writes are a clear 503.
    settings = settings_for()
    good = memory_file(seed=1)

    async def scenario() -> None:
        async with serve(settings) as (_, client):
            predicted = await client.post("/v1/tasks/alpha/predict", json={"inputs": TEXTS})
            assert predicted.status_code == 200, predicted.text
            for response in (
                await client.put("/v1/tasks/beta/memory", content=good),
                await client.put("/v1/tasks/alpha/memory?replace=true", content=memory_file(seed=2)),
                await client.delete("/v1/tasks/alpha"),
            ):
                status, kind, message = error_of(response)
                assert (status, kind) == (503, "store_read_only"), response.text
                assert "read-only" in message
            assert (await client.get("/v1/tasks/alpha")).json()["version"] is not None
            assert (await client.post("/v1/tasks/alpha/predict", json={"inputs": TEXTS})).status_code == 200

    with mounted(settings.memory_dir, "size=4m"):
        write_memory(settings, "alpha", good)
        remount_read_only(settings.memory_dir)
        asyncio.run(scenario())
        assert sorted(p.name for p in settings.memory_dir.iterdir()) == ["alpha.safetensors"]


def test_a_full_store_refuses_an_upload_with_507_and_keeps_serving(
    memory_file: Any, settings_for: Any, serve: Any, write_memory: Any
) -> None:
    settings = settings_for()
    small = memory_file(seed=1)

    async def scenario() -> None:
        async with serve(settings) as (_, client):
            response = await client.put("/v1/tasks/beta/memory", content=memory_file(seed=2))
            status, kind, message = error_of(response)
            assert (status, kind) == (507, "store_full"), response.text
            assert "no space left" in message
            assert "nothing was written" in message
            assert (await client.get("/v1/tasks/beta")).status_code == 404
            assert (await client.post("/v1/tasks/alpha/predict", json={"inputs": TEXTS})).status_code == 200

    # Room for one memory (about 2.5 MB) and the lock file, not for a second one.
    with mounted(settings.memory_dir, f"size={len(small) + 512 * 1024}"):
        write_memory(settings, "alpha", small)
        asyncio.run(scenario())
        names = sorted(p.name for p in settings.memory_dir.iterdir())
        assert names == [".spartan.lock", "alpha.safetensors"]  # no temp file left behind


def test_uploads_with_huge_values_or_invisible_labels_are_refused_with_422(
    make_memory: Any, settings_for: Any, serve: Any
) -> None:
    memory = make_memory(seed=3)
    tensors = memory_tensors(memory)
    tensors["head.out.weight"] = torch.full_like(
        tensors["head.out.weight"], torch.finfo(torch.float32).max / 4
    )
    huge = save_safetensors(tensors, metadata=spec_metadata(memory.spec))
    bidi = memory_to_bytes(make_memory(seed=3, labels=("negative", "positive\u202e")))
    zero_width = memory_to_bytes(make_memory(seed=3, labels=("nega\u200btive", "positive")))

    async def scenario() -> None:
        async with serve(settings_for()) as (_, client):
            for body, phrase in ((huge, "non-finite outputs"), (bidi, "U+202E"), (zero_width, "U+200B")):
                status, kind, message = error_of(await client.put("/v1/tasks/alpha/memory", content=body))
                assert (status, kind) == (422, "memory_invalid")
                assert phrase in message
            assert (await client.get("/v1/tasks/alpha")).status_code == 404

    asyncio.run(scenario())

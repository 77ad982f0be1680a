"""Every hostile memory file of the corpus (tests/security/hostile.py), uploaded to one service on the
real backbone: each is refused with its exact 4xx and a precise message in the one error shape, the
task keeps serving its previous version, and the store holds exactly what it held before."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from hostile import Hostile, hostile_corpus

from app.registry.store import LocalFolderStore
from app.settings import Settings

pytestmark = pytest.mark.model

TEXTS = ["a gripping, beautifully acted film", "dull and far too long"]
REPO_ROOT = Path(__file__).resolve().parents[2]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store_files(settings: Settings) -> dict[str, bytes]:
    """Every file in the store folder (temp files included) but the lock file the store keeps there."""
    folder = settings.memory_dir
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != LocalFolderStore.LOCK_NAME}


async def upload(client: httpx.AsyncClient, task: str, case: Hostile, *, replace: bool) -> httpx.Response:
    url = f"/v1/tasks/{task}/memory" + ("?replace=true" if replace else "")
    if case.multipart:
        return await client.put(url, files={"file": ("memory.safetensors", case.data)})
    return await client.put(url, content=case.data)


async def predict(client: httpx.AsyncClient, task: str) -> Any:
    response = await client.post(
        f"/v1/tasks/{task}/predict", json={"inputs": TEXTS, "return_all_scores": True}
    )
    return (
        response.json() if response.status_code == 200 else f"{response.status_code}: {response.text[:200]}"
    )


def refusal_problems(response: httpx.Response, case: Hostile, settings: Settings) -> list[str]:
    """What is wrong with the service's answer to a hostile upload (nothing: an empty list)."""
    if response.status_code != case.status:
        return [f"status {response.status_code}, expected {case.status}: {response.text[:300]}"]
    try:
        body = response.json()
    except ValueError:
        return [f"body is not JSON: {response.text[:300]}"]
    error = body.get("error") if isinstance(body, dict) else None
    if set(body) != {"error"} or not isinstance(error, dict) or set(error) != {"type", "message", "details"}:
        return [f"body is not {{'error': {{type, message, details}}}}: {body}"]
    problems = []
    if error["type"] != case.error_type:
        problems.append(f"type {error['type']!r}, expected {case.error_type!r}")
    if case.phrase not in error["message"]:
        problems.append(f"message {error['message']!r} lacks {case.phrase!r}")
    for internal in ("Traceback", 'File "', "site-packages", str(REPO_ROOT), str(settings.memory_dir.parent)):
        if internal in response.text:
            problems.append(f"body shows {internal!r}: {response.text[:300]}")
    return problems


async def damage_done(client: httpx.AsyncClient, settings: Settings, v1: bytes, before: Any) -> list[str]:
    """How the service or its store differs from "reviews at version 1, nothing else" (nothing: [])."""
    damage = []
    if (after := await predict(client, "reviews")) != before:
        damage.append(f"reviews no longer predicts as version 1 did: {str(after)[:200]}")
    info = (await client.get("/v1/tasks/reviews")).json()
    if [info.get(key) for key in ("version", "loaded_version", "error")] != [sha(v1), sha(v1), None]:
        damage.append(f"reviews is now {str(info)[:300]}")
    if (await client.get("/v1/tasks/fresh")).status_code != 404:
        damage.append("task fresh exists after a refused create")
    files = store_files(settings)
    if files != {"reviews.safetensors": v1}:
        damage.append(f"the store holds {sorted(files)}, not version 1 of reviews alone")
    return damage


def test_every_hostile_memory_is_refused_and_changes_nothing(
    memory_file: Any, settings_for: Any, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    v1 = memory_file(seed=7)
    limit = len(v1) + 64 * 1024  # room for the largest variant; "1 byte over" stays cheap
    corpus = hostile_corpus(v1, limit)
    settings = settings_for(max_upload_bytes=limit)

    async def scenario() -> list[str]:
        failures: list[str] = []
        async with serve(settings) as (_, client):
            created = await client.put("/v1/tasks/reviews/memory", content=v1)
            assert created.status_code == 201, created.text
            before = await predict(client, "reviews")
            assert before["version"] == sha(v1)
            for case in corpus:
                for task, replace in (("reviews", True), ("fresh", False)):
                    response = await upload(client, task, case, replace=replace)
                    how = "replacing reviews" if replace else "creating fresh"
                    failures += [
                        f"{case.name} ({how}): {p}" for p in refusal_problems(response, case, settings)
                    ]
                damage = await damage_done(client, settings, v1, before)
                failures += [f"{case.name}: {d}" for d in damage]
                if damage:  # put version 1 back, so that one regression does not fail every later case
                    await client.delete("/v1/tasks/fresh")
                    await client.put("/v1/tasks/reviews/memory?replace=true", content=v1)
            listing = (await client.get("/v1/tasks")).json()
            if [task["name"] for task in listing["tasks"]] != ["reviews"]:
                failures.append(f"the task listing changed: {listing}")
        return failures

    failures = asyncio.run(scenario())
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)
    assert len(corpus) >= 24
    with capsys.disabled():
        print(
            f"\nhostile memory corpus: {len(corpus)} kinds, all rejected with 4xx, "
            "previous version kept, store untouched"
        )

"""Training jobs through the API on the tiny random backbone, with the real worker process (it loads the
same tiny backbone folder): submit (JSON rows, CSV, multipart files), follow (GET, list, Server-Sent
Events), the installed memory serving, cancel, and every refusal before anything trains (422 with the
row and reason, 409, 413, 415, 401, 404)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

ADMIN = "training-jobs-admin-key-0123456789"
FINAL = {"succeeded", "failed", "cancelled"}
FAST = {"epochs": "2", "batch_size": "8", "max_length": "32"}


def rows(count: int = 40) -> list[dict[str, Any]]:
    words = {"positive": ["good", "great", "fine"], "negative": ["dull", "bad", "awful"]}
    found = []
    for i in range(count):
        label = "positive" if i % 2 else "negative"
        found.append({"text": f"the film was {words[label][i % 3]} {i}", "label": label})
    return found


@pytest.fixture
def tiny_settings(settings_for: Callable[..., Any], tiny_backbone_dir: Path) -> Callable[..., Any]:
    def make(**overrides: Any) -> Any:
        return settings_for(**{"backbone": str(tiny_backbone_dir), "training_nice": 0, **overrides})

    return make


async def until_done(client: httpx.AsyncClient, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = (await client.get(f"/v1/training-jobs/{job_id}")).json()
        if job["state"] in FINAL:
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


async def until_running(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """Until the job's worker has said it is loading (it has lowered its priority by then)."""
    for _ in range(600):
        job = (await client.get(f"/v1/training-jobs/{job_id}")).json()
        if job["state"] == "running" and job["worker_pid"] and job["progress"]["epochs"]:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} never ran")


def test_a_job_from_json_rows_trains_installs_and_serves(tiny_settings: Any, serve: Any) -> None:
    async def scenario() -> None:
        async with serve(tiny_settings()) as (_, client):
            response = await client.post("/v1/tasks/films/training-jobs", params=FAST, json={"rows": rows()})
            assert response.status_code == 202, response.text
            job = response.json()
            assert response.headers["location"] == f"/v1/training-jobs/{job['id']}"
            assert job["state"] == "queued"
            assert job["examples"] == {"train": 32, "dev": 4, "test": 4}
            assert job["config"]["epochs"] == 2
            assert job["labels"] == ["negative", "positive"]
            done = await until_done(client, job["id"])
            assert done["state"] == "succeeded", done["error"]
            assert [e["epoch"] for e in done["epochs"]] == [1, 2]
            assert set(done["epochs"][-1]["dev"]) >= {"accuracy"}  # the last epoch is always scored
            assert done["best_epoch"] in (1, 2)
            assert set(done["test"]) >= {"accuracy", "macro_f1"}
            assert done["progress"]["step"] == done["progress"]["steps"] == 2 * 4
            assert done["progress"]["examples_per_s"] > 0

            task = (await client.get("/v1/tasks/films")).json()
            assert task["version"] == done["version"]
            predicted = await client.post("/v1/tasks/films/predict", json={"inputs": ["the film was good"]})
            assert predicted.status_code == 200
            assert predicted.json()["version"] == done["version"]
            assert predicted.json()["predictions"][0]["label"] in {"negative", "positive"}

            listed = (await client.get("/v1/training-jobs", params={"task": "films"})).json()["jobs"]
            assert [j["id"] for j in listed] == [job["id"]]
            assert (await client.get("/v1/training-jobs", params={"state": "failed"})).json()["jobs"] == []

            stream = await client.get(f"/v1/training-jobs/{job['id']}/events")
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [block.split("\n") for block in stream.text.strip().split("\n\n")]
            assert [lines[0] for lines in events] == ["event: job", "event: end"]
            assert json.loads(events[0][1].removeprefix("data: "))["state"] == "succeeded"

            again = await client.delete(f"/v1/training-jobs/{job['id']}")
            assert again.status_code == 409
            assert again.json()["error"]["type"] == "job_finished"

            metrics = (await client.get("/metrics")).text
            assert 'spartan_training_jobs_finished_total{state="succeeded"} 1.0' in metrics
            assert "spartan_training_examples_per_second_count 1.0" in metrics

            retrained = await client.post("/v1/tasks/films/training-jobs", params=FAST, json={"rows": rows()})
            assert retrained.status_code == 409  # the task exists now: replace or If-Match, as uploads
            assert retrained.json()["error"]["type"] == "memory_conflict"
            replaced = await client.post(
                "/v1/tasks/films/training-jobs", params=FAST, json={"rows": rows()},
                headers={"if-match": f'"{done["version"]}"'},
            )  # fmt: skip
            assert replaced.status_code == 202, replaced.text
            assert replaced.json()["if_match"] == done["version"]
            await until_done(client, replaced.json()["id"])

    asyncio.run(scenario())


def test_files_csv_and_multipart_with_a_test_file(tiny_settings: Any, serve: Any) -> None:
    table = "text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows())
    held_out = "".join(json.dumps(r) + "\n" for r in rows(10))

    async def scenario() -> None:
        async with serve(tiny_settings()) as (_, client):
            cut = {**FAST, "dev_fraction": "0.25", "test_fraction": "0"}
            csv_job = await client.post(
                "/v1/tasks/from-csv/training-jobs",
                params=cut,
                content=table,
                headers={"content-type": "text/csv"},
            )
            assert csv_job.status_code == 202, csv_job.text
            assert csv_job.json()["examples"] == {"train": 30, "dev": 10, "test": 0}
            files = {"file": ("train.csv", table, "text/csv"), "test_file": ("held-out.jsonl", held_out)}
            multipart = await client.post("/v1/tasks/from-files/training-jobs", params=FAST, files=files)
            assert multipart.status_code == 202, multipart.text
            assert multipart.json()["examples"] == {"train": 36, "dev": 4, "test": 10}
            first = await until_done(client, csv_job.json()["id"])
            assert first["state"] == "succeeded", first["error"]
            assert first["test"] == {}
            second = await until_done(client, multipart.json()["id"])
            assert second["state"] == "succeeded", second["error"]

    asyncio.run(scenario())


def test_bad_submissions_are_refused_before_anything_trains(tiny_settings: Any, serve: Any) -> None:
    async def scenario() -> None:
        async with serve(tiny_settings(max_training_bytes=4096)) as (app, client):
            bad = [*rows(6), {"text": "the film", "label": None}]
            refused = await client.post("/v1/tasks/t/training-jobs", json={"rows": bad})
            assert refused.status_code == 422
            error = refused.json()["error"]
            assert error["type"] == "training_data_invalid"
            assert error["message"] == "train row 7: no label"
            assert error["details"] == [{"split": "train", "row": 7, "line": None, "reason": "missing_label"}]
            one_class = await client.post("/v1/tasks/t/training-jobs", json={"rows": rows(6)[::2]})
            assert one_class.json()["error"]["details"][0]["reason"] == "one_class"
            jsonl = '{"text": "a", "label": "x"}\n{"text": "", "label": "y"}\n'
            empty = await client.post(
                "/v1/tasks/t/training-jobs", content=jsonl, headers={"content-type": "application/x-ndjson"}
            )
            assert empty.json()["error"]["message"] == "train row 2 (line 2): empty text"
            options = await client.post(
                "/v1/tasks/t/training-jobs", params={"epochs": "0"}, json={"rows": rows()}
            )
            assert (options.status_code, options.json()["error"]["type"]) == (422, "invalid_request")
            top_k = await client.post(
                "/v1/tasks/t/training-jobs", params={"num_parents": "4", "top_k": "8"}, json={"rows": rows()}
            )
            assert top_k.json()["error"]["details"][0]["reason"] == "bad_options"
            plain = await client.post(
                "/v1/tasks/t/training-jobs", content="text", headers={"content-type": "text/plain"}
            )
            assert (plain.status_code, plain.json()["error"]["type"]) == (415, "unsupported_media_type")
            large = await client.post("/v1/tasks/t/training-jobs", json={"rows": rows(200)})
            assert (large.status_code, large.json()["error"]["type"]) == (413, "payload_too_large")
            name = await client.post("/v1/tasks/..bad/training-jobs", json={"rows": rows()})
            assert name.status_code == 422
            missing = await client.get("/v1/training-jobs/20261201-101500-3fa2c1d0")
            assert (missing.status_code, missing.json()["error"]["type"]) == (404, "job_not_found")
            assert (await client.get("/v1/training-jobs/nope")).status_code == 404
            assert (await client.get("/v1/training-jobs")).json() == {"jobs": []}
            assert app.state.services.jobs.records.ids() == []  # nothing was even queued

    asyncio.run(scenario())


def test_writes_need_the_admin_key(tiny_settings: Any, serve: Any) -> None:
    async def scenario() -> None:
        settings = tiny_settings(admin_api_key=ADMIN, allow_unauthenticated_writes=False)
        async with serve(settings) as (_, client):
            anonymous = await client.post("/v1/tasks/t/training-jobs", json={"rows": rows()})
            assert anonymous.status_code == 401
            cancel = await client.delete("/v1/training-jobs/20261201-101500-3fa2c1d0")
            assert cancel.status_code == 401
            assert (await client.get("/v1/training-jobs")).status_code == 200  # reads follow the listings

    asyncio.run(scenario())


def worker_facts(pid: int) -> tuple[int, dict[str, str]]:
    """The niceness and the environment of a running process."""
    nice = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return nice, dict(pair.decode().split("=", 1) for pair in pairs if b"=" in pair)


def test_cancel_a_running_job_and_a_full_queue(
    tiny_settings: Any, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPARTAN_ADMIN_API_KEY", ADMIN)  # in the service's environment, never the worker's

    async def scenario() -> None:
        async with serve(tiny_settings(max_queued_jobs=1, training_nice=7)) as (_, client):
            long = {**FAST, "epochs": "1000"}
            first = (
                await client.post("/v1/tasks/a/training-jobs", params=long, json={"rows": rows()})
            ).json()
            second = (
                await client.post("/v1/tasks/b/training-jobs", params=long, json={"rows": rows()})
            ).json()
            full = await client.post("/v1/tasks/c/training-jobs", params=long, json={"rows": rows()})
            assert full.status_code == 429
            assert full.json()["error"]["type"] == "job_queue_full"
            assert int(full.headers["retry-after"]) >= 1
            running = await until_running(client, first["id"])
            nice, env = worker_facts(running["worker_pid"])
            assert nice == os.nice(0) + 7  # its own, lower, CPU priority
            assert env["OMP_NUM_THREADS"] == "1"  # its own thread budget (SPARTAN_TRAINING_THREADS)
            assert not [name for name in env if name.startswith("SPARTAN_")]  # no keys, no settings
            assert (await client.get(f"/v1/training-jobs/{second['id']}")).json()["state"] == "queued"
            cancelled = await client.delete(f"/v1/training-jobs/{second['id']}")
            assert (cancelled.status_code, cancelled.json()["state"]) == (200, "cancelled")
            stopped = await client.delete(f"/v1/training-jobs/{running['id']}")
            assert stopped.status_code == 200, stopped.text
            assert stopped.json()["state"] == "cancelled"
            assert stopped.json()["error"] == "cancelled while it ran; nothing was installed"
            assert (await client.get("/v1/tasks/a")).status_code == 404

    asyncio.run(scenario())

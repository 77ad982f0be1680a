"""Training jobs through the Python client and `spartan jobs ...` against a real `spartan serve` process
on the tiny backbone (its worker processes load the same folder): submit, follow, show, list, cancel,
and refusals with their exit codes (0 succeeded, 1 refused or the job failed)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from client_services import ADMIN_KEY, PREDICT_KEY, Service, service_fixture  # noqa: F401  (the fixture)
from typer.testing import CliRunner

from app import client as sc
from app.cli import cli

KEYS = {"SPARTAN_ADMIN_API_KEY": ADMIN_KEY, "SPARTAN_PREDICT_API_KEY": PREDICT_KEY}
FAST = {"epochs": 1, "batch_size": 8, "max_length": 32}


def rows(count: int = 24) -> list[dict[str, str]]:
    return [{"text": f"the film was {'good' if i % 2 else 'dull'} {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(count)]  # fmt: skip


@pytest.fixture
def run(service: Service, monkeypatch: pytest.MonkeyPatch):
    def invoke(*args: str, env: dict[str, str] | None = None):
        for name in KEYS:
            monkeypatch.delenv(name, raising=False)
        return CliRunner().invoke(cli, list(args), env={"SPARTAN_URL": service.url, **(env or KEYS)})

    return invoke


def test_the_client_submits_follows_and_lists_jobs(service: Service) -> None:
    with sc.Client(service.url, admin_key=ADMIN_KEY, predict_key=PREDICT_KEY) as client:
        job = client.submit_job("client-job", rows(), **FAST)
        assert job.state == "queued"
        seen = [update.state for update in client.follow_job(job.id)]
        assert seen[-1] == "succeeded"
        done = client.get_job(job.id)
        assert done.version == client.get_task("client-job").version
        assert [j.id for j in client.list_jobs(task="client-job").jobs] == [job.id]
        with pytest.raises(sc.JobFinished):
            client.cancel_job(job.id)
        with pytest.raises(sc.TrainingDataInvalid) as refused:
            client.submit_job("bad", [{"text": "only one", "label": "x"}, {"text": "row", "label": "x"}])
        assert refused.value.details is not None
        assert refused.value.details[0]["reason"] == "one_class"
        with pytest.raises(sc.MemoryConflict):
            client.submit_job("client-job", rows(), **FAST)
        with pytest.raises(TypeError, match="unknown training options"):
            client.submit_job("x", rows(), epoch=3)

    async def follow_async() -> str:
        async with sc.AsyncClient(service.url, admin_key=ADMIN_KEY) as client:
            job = await client.submit_job("client-job", rows(), replace=True, **FAST)
            return (await client.wait_job(job.id)).state

    assert asyncio.run(follow_async()) == "succeeded"


def test_spartan_jobs_submit_follow_show_list_cancel(run, tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows()))
    followed = run("jobs", "submit", "cli-job", str(train), "--epochs", "1", "--batch-size", "8", "--follow")
    assert followed.exit_code == 0, followed.output
    last = followed.output.strip().splitlines()[-1]
    assert " succeeded: task cli-job version " in last
    job_id = last.split()[0]

    shown = json.loads(run("jobs", "show", job_id, "--json").output)
    assert shown["state"] == "succeeded"
    assert shown["examples"] == {"train": 20, "dev": 2, "test": 2}
    table = run("jobs", "show", job_id).output.splitlines()
    assert table[1].split() == ["EPOCH", "TRAIN", "LOSS", "DEV", "SECONDS"]
    listed = run("jobs", "list", "--task", "cli-job").output.splitlines()
    assert listed[0].split()[:3] == ["JOB", "TASK", "STATE"]
    assert listed[1].split()[:3] == [job_id, "cli-job", "succeeded"]
    assert run("jobs", "follow", job_id).exit_code == 0

    finished = run("jobs", "cancel", job_id)
    assert finished.exit_code == 1
    assert "409 job_finished" in finished.output
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\na good film,pos\n,neg\n")
    refused = run("jobs", "submit", "cli-bad", str(bad))
    assert refused.exit_code == 1
    assert "422 training_data_invalid: train row 2 (line 3): empty text" in refused.output
    missing = run("jobs", "submit", "cli-bad", str(tmp_path / "absent.csv"))
    assert missing.exit_code == 2
    queued = run("jobs", "submit", "cli-later", str(train), "--epochs", "50", "--json")
    assert queued.exit_code == 0, queued.output
    later = json.loads(queued.output)["id"]
    cancelled = run("jobs", "cancel", later)
    assert cancelled.exit_code == 0, cancelled.output
    assert cancelled.output.startswith(f"{later} cancelled: cancelled")
    assert run("jobs", "follow", later).exit_code == 1  # the job did not succeed


def test_a_benchmark_can_start_a_training_job_and_stop_it(service: Service) -> None:
    """What bench_service_load.py --under-training does around its service windows."""
    from benchmarks import harness

    job_id = harness.start_training_job(service.url, rows(), admin_key=ADMIN_KEY, epochs=1000, batch_size=8)
    with sc.Client(service.url, admin_key=ADMIN_KEY) as client:
        job = client.get_job(job_id)
        assert job.state == "running"
        assert job.progress.step > 0
    stopped = harness.stop_training_job(service.url, job_id, admin_key=ADMIN_KEY)
    assert stopped["state"] == "cancelled"
    assert harness.stop_training_job(service.url, job_id, admin_key=ADMIN_KEY)["state"] == "cancelled"

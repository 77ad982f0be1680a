"""Training jobs end to end on a real `spartan serve` process with the real MiniLM (fp32, one thread for
serving and one for the job's own process): 200 examples of the movie dataset trained through
`spartan jobs submit --follow`, the new task's served labels equal `spartan eval`'s on the same memory
file, and the job's test score equals eval's; a job with bad data (422), a full queue (429), cancelled
jobs, a job process killed with -9, and a service killed with -9 and restarted."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from procs import ROOT, Replica, wait_until

from app import client as sc

pytestmark = [pytest.mark.model, pytest.mark.slow]

ADMIN_KEY = "e2e-training-admin-key-0123456789"
REPLICA = "e2e-replica"
LONG = {"epochs": 50}  # a job that is still running when the test is done with it


@pytest.fixture(scope="module")
def movie_files(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, Path]:
    """200 training examples of the movie dataset (few-shot sample, seed 1) and 64 of its test split."""
    from app.training.datasets import few_shot, load_named

    data = load_named("movie", cache_dir)
    folder = tmp_path_factory.mktemp("movie")
    train, test = folder / "train.jsonl", folder / "test.jsonl"
    for path, examples in ((train, few_shot(data, 200, seed=1).train), (test, data.test[:64])):
        path.write_text("".join(json.dumps({"text": ex.text, "label": ex.label}) + "\n" for ex in examples))
    return train, test


def replica_env(memories: Path) -> dict[str, str]:
    return {
        "SPARTAN_MEMORY_DIR": str(memories),
        "SPARTAN_ADMIN_API_KEY": ADMIN_KEY,
        "SPARTAN_ALLOW_UNAUTHENTICATED_WRITES": "false",
        "SPARTAN_STORE_POLL_INTERVAL_S": "0",
        "SPARTAN_PRECISION": "fp32",  # served labels compared with eval's at the same precision
        "SPARTAN_TRAINING_THREADS": "1",
        "SPARTAN_MAX_RUNNING_JOBS": "1",
        "SPARTAN_MAX_QUEUED_JOBS": "1",
        "SPARTAN_REPLICA_NAME": REPLICA,
    }


@dataclass
class Service:
    url: str
    memories: Path  # the service's local store


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("jobs-e2e")
    replica = Replica("jobs", replica_env(workdir / "memories"), workdir).start_ready()
    yield Service(replica.url, workdir / "memories")
    replica.stop()


def admin(url: str) -> sc.Client:
    return sc.Client(url, admin_key=ADMIN_KEY, timeout_s=120)


def spartan(*args: str, url: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    settings = {
        "SPARTAN_URL": url,
        "SPARTAN_ADMIN_API_KEY": ADMIN_KEY,
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **settings},
    )  # fmt: skip


def wait_job(client: sc.Client, job_id: str, done: Callable[[Any], bool], timeout_s: float = 120) -> Any:
    found: list[Any] = []

    def check() -> bool:
        found[:] = [client.get_job(job_id)]
        return done(found[0])

    wait_until(check, timeout_s, f"job {job_id}", every_s=0.2)
    return found[0]


def training(job: Any) -> bool:
    return job.state == "running" and job.worker_pid is not None and job.progress.step > 0


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state == "Z"  # exited, not reaped yet


def test_a_job_trains_200_movie_examples_and_serves_what_spartan_eval_scores(
    service: Service, movie_files: tuple[Path, Path], tmp_path: Path
) -> None:
    train, test = movie_files
    started = time.monotonic()
    followed = spartan(
        "jobs", "submit", "reviews", str(train), "--test-file", str(test), "--epochs", "2", "--follow",
        "--json", url=service.url,
    )  # fmt: skip
    assert followed.returncode == 0, followed.stdout + followed.stderr
    updates = [json.loads(line) for line in followed.stdout.splitlines()]
    job = updates[-1]
    seconds = time.monotonic() - started
    assert job["state"] == "succeeded", job["error"]
    assert "running" in {u["state"] for u in updates}  # followed while it ran
    assert job["examples"] == {"train": 180, "dev": 20, "test": 64}
    assert [e["epoch"] for e in job["epochs"]] == [1, 2]
    assert job["test"]["accuracy"] > 0.6  # 200 examples: well above chance (the few-shot figure is ~0.8)
    memory_file = service.memories / "reviews.safetensors"
    assert hashlib.sha256(memory_file.read_bytes()).hexdigest() == job["version"]

    texts = [json.loads(line)["text"] for line in test.read_text().splitlines()]
    with admin(service.url) as client:
        answer = client.predict("reviews", texts)
    assert answer.version == job["version"]
    served = [p.label for p in answer.predictions]

    predictions = tmp_path / "eval.jsonl"
    scored = spartan(
        "eval", str(memory_file), "--test-file", str(test), "--predictions", str(predictions),
        "--threads", "1", env={"SPARTAN_PRECISION": "fp32"},
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    evaluated = [json.loads(line)["predicted"] for line in predictions.read_text().splitlines()]
    assert served == evaluated  # exact labels, row by row
    assert json.loads(scored.stdout)["accuracy"] == pytest.approx(job["test"]["accuracy"], abs=1e-9)
    print(f"\nfew-shot job: 200 movie examples, 2 epochs, {seconds:.1f} s from submit to installed")


def test_bad_data_is_refused_with_its_row_and_nothing_is_queued(service: Service) -> None:
    rows = [{"text": "a gripping film", "label": "positive"}, {"text": "dull", "label": "negative"}]
    response = httpx.post(
        f"{service.url}/v1/tasks/bad/training-jobs", json={"rows": [*rows, {"text": "no label"}]},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )  # fmt: skip
    assert response.status_code == 422
    assert response.json()["error"]["details"] == [
        {"split": "train", "row": 3, "line": None, "reason": "missing_label"}
    ]
    with admin(service.url) as client:
        with pytest.raises(sc.TrainingDataInvalid, match="one class"):
            client.submit_job("bad", [rows[0], rows[0]])
        assert client.list_jobs(task="bad").jobs == []


def test_a_full_queue_is_429_and_queued_and_running_jobs_cancel(
    service: Service, movie_files: tuple[Path, Path]
) -> None:
    train, _ = movie_files
    with admin(service.url) as client:
        running = client.submit_job("cancel-running", train, **LONG)
        queued = client.submit_job("cancel-queued", train, **LONG)
        with pytest.raises(sc.JobQueueFull) as refused:
            client.submit_job("refused", train, **LONG)
        assert refused.value.status == 429
        assert refused.value.retry_after is not None
        assert refused.value.retry_after >= 1
        assert client.cancel_job(queued.id).state == "cancelled"
        record = wait_job(client, running.id, training)
        cancelled = client.cancel_job(running.id)
        assert cancelled.state == "cancelled"
        assert cancelled.error == "cancelled while it ran; nothing was installed"
        wait_until(lambda: gone(record.worker_pid), 10, "the cancelled job's process gone")
        names = {t.name for t in client.list_tasks().tasks}
        assert not names & {"cancel-running", "cancel-queued", "refused"}


def test_a_job_process_killed_with_sigkill_fails_the_job_and_writes_nothing(
    service: Service, movie_files: tuple[Path, Path]
) -> None:
    train, _ = movie_files
    with admin(service.url) as client:
        job = client.submit_job("crashed", train, **LONG)
        record = wait_job(client, job.id, training)
        os.kill(record.worker_pid, 9)
        failed = wait_job(client, job.id, lambda j: j.state != "running", timeout_s=30)
        assert failed.state == "failed"
        assert failed.error_type == "worker_died"
        assert "signal 9 (SIGKILL)" in failed.error
        assert "crashed" not in {t.name for t in client.list_tasks().tasks}
    assert not list(service.memories.glob("crashed*"))
    assert not list(service.memories.glob(".*.tmp"))


def test_a_restart_marks_the_job_it_was_running_failed(
    tmp_path: Path, movie_files: tuple[Path, Path]
) -> None:
    train, _ = movie_files
    memories = tmp_path / "memories"
    first = Replica("before", replica_env(memories), tmp_path).start_ready()
    try:
        with admin(first.url) as client:
            job = client.submit_job("restarted", train, **LONG)
            record = wait_job(client, job.id, training)
    finally:
        first.kill9()
    wait_until(lambda: gone(record.worker_pid), 10, "the job's process gone with its service")
    second = Replica("after", replica_env(memories), tmp_path).start_ready()
    try:
        with admin(second.url) as client:
            settled = client.get_job(job.id)
            assert settled.state == "failed"
            assert settled.error_type == "interrupted"
            assert f"interrupted by a restart of replica {REPLICA} while it ran" in settled.error
            assert [j.id for j in client.list_jobs(state="failed").jobs] == [job.id]
            assert "restarted" not in {t.name for t in client.list_tasks().tasks}
    finally:
        second.stop()

"""The training-job manager with a stand-in worker process (tests/fake_worker.py: the protocol, no torch):
state transitions, the install through the registry, the bounded queue (429), cancel, a crashed or
killed worker, replace semantics, records of other replicas and of a restarted one, pruning."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import build_memory

from app.errors import JobFinished, JobNotFound, JobQueueFull, MemoryConflict
from app.jobs.manager import JobManager, JobsConfig
from app.jobs.options import JobOptions
from app.jobs.records import FINAL, JobRecord, LocalJobRecords, new_job_id
from app.metrics import Metrics
from app.registry.registry import Registry
from app.registry.store import LocalFolderStore
from app.spartan.memfile import memory_to_bytes
from app.training.datasets import Example, TaskData

FAKE_WORKER = Path(__file__).resolve().parents[1] / "fake_worker.py"
DATA = TaskData(
    "t", "classification", ("negative", "positive"),
    [Example("a good film", "positive"), Example("a dull film", "negative")] * 4, [], [],
)  # fmt: skip


class World:
    def __init__(self, tmp_path: Path, encoder: Any) -> None:
        self.tmp_path = tmp_path
        self.store = LocalFolderStore(tmp_path / "memories")
        self.registry = Registry(self.store, encoder.identity(), metrics=Metrics())
        self.records = LocalJobRecords(tmp_path / "memories" / "jobs")
        self.trained = memory_to_bytes(build_memory(encoder, seed=11))
        self.other = memory_to_bytes(build_memory(encoder, seed=12))
        (tmp_path / "trained.safetensors").write_bytes(self.trained)
        self.managers: list[JobManager] = []

    def manager(
        self, mode: str = "ok", *, replica: str = "r1", max_running: int = 1, max_queued: int = 4,
        max_records: int = 50, start: bool = True,
    ) -> JobManager:  # fmt: skip
        config = JobsConfig(
            replica=replica, max_running=max_running, max_queued=max_queued, threads=1, nice=0,
            backbone="unused", cache_dir=self.tmp_path, max_records=max_records, heartbeat_s=0.1,
        )  # fmt: skip
        command = [sys.executable, str(FAKE_WORKER), mode, str(self.tmp_path / "trained.safetensors")]
        manager = JobManager(self.registry, self.records, config, Metrics(), command=command)
        if start:
            manager.start()
        self.managers.append(manager)
        return manager


@pytest.fixture
def world(tmp_path: Path, tiny_encoder: Any) -> Iterator[World]:
    built = World(tmp_path, tiny_encoder)
    yield built
    for manager in built.managers:
        manager.close()


def wait_for(manager: JobManager, job_id: str, done: Callable[[JobRecord], bool], timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = manager.get(job_id)
        if done(record):
            return record
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never got there: {manager.get(job_id)}")


def finished(record: JobRecord) -> bool:
    return record.state in FINAL


def stepping(record: JobRecord) -> bool:
    return record.state == "running" and record.worker_pid is not None and record.progress.step > 0


def test_a_job_runs_reports_progress_and_installs_its_memory_through_the_registry(world: World) -> None:
    manager = world.manager()
    queued = manager.submit("reviews", DATA, JobOptions(epochs=2))
    assert queued.state == "queued"
    assert world.records.read(queued.id) is not None  # on record before the answer
    done = wait_for(manager, queued.id, finished)
    assert done.state == "succeeded", done.error
    assert done.version == world.registry.info("reviews").version
    assert done.produced_version == done.version
    assert [e.epoch for e in done.epochs] == [1, 2]
    assert done.best_epoch == 2
    assert done.test == {"accuracy": 0.75}
    assert done.progress.step == 4
    assert done.progress.steps == 4
    assert done.examples == {"train": 8, "dev": 0, "test": 0}
    assert done.config["epochs"] == 2
    stored = world.records.read(queued.id)
    assert stored is not None
    assert stored.state == "succeeded"
    assert stored.revision == done.revision
    exposition = manager.metrics.exposition().decode()
    assert 'spartan_training_jobs_finished_total{state="succeeded"} 1.0' in exposition
    assert 'spartan_training_jobs{state="running"} 0.0' in exposition
    assert "spartan_training_job_duration_seconds_count" in exposition
    assert "spartan_training_examples_per_second_count 1.0" in exposition


def test_the_queue_is_bounded_and_a_job_beyond_it_is_told_when_to_retry(world: World) -> None:
    manager = world.manager("hang", max_running=1, max_queued=1)
    first = manager.submit("a", DATA, JobOptions())
    wait_for(manager, first.id, stepping)
    second = manager.submit("b", DATA, JobOptions())
    with pytest.raises(JobQueueFull) as refused:
        manager.submit("c", DATA, JobOptions())
    assert refused.value.retry_after >= 1
    assert "SPARTAN_MAX_QUEUED_JOBS" in str(refused.value)
    assert manager.get(second.id).state == "queued"
    assert manager.cancel(second.id).state == "cancelled"
    assert manager.submit("c", DATA, JobOptions()).state == "queued"  # room again


def test_cancel_a_queued_and_a_running_job_and_not_a_finished_one(world: World) -> None:
    manager = world.manager("hang")
    running = manager.submit("a", DATA, JobOptions())
    queued = manager.submit("b", DATA, JobOptions())
    record = wait_for(manager, running.id, stepping)
    assert manager.cancel(queued.id).error == "cancelled before it started"
    cancelled = manager.cancel(running.id)
    assert cancelled.state == "cancelled"
    assert cancelled.cancel_requested
    assert record.worker_pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(record.worker_pid, 0)  # the worker is gone (and reaped)
    with pytest.raises(JobFinished):
        manager.cancel(running.id)
    with pytest.raises(JobNotFound):
        manager.get(new_job_id())
    with pytest.raises(JobNotFound):
        manager.get("../../etc/passwd")
    assert world.registry.list() == []  # nothing was installed


def test_a_worker_killed_with_sigkill_fails_its_job_clearly_and_installs_nothing(world: World) -> None:
    manager = world.manager("hang")
    job = manager.submit("a", DATA, JobOptions())
    record = wait_for(manager, job.id, stepping)
    assert record.worker_pid is not None
    os.kill(record.worker_pid, signal.SIGKILL)
    failed = wait_for(manager, job.id, finished)
    assert failed.state == "failed"
    assert failed.error_type == "worker_died"
    assert "signal 9 (SIGKILL)" in (failed.error or "")
    assert "nothing was installed" in (failed.error or "")
    assert world.registry.list() == []
    assert not list(world.store.root.glob("*.safetensors"))


@pytest.mark.parametrize(
    ("mode", "kind", "message"),
    [
        ("crash", "worker_died", "status 7"),
        ("error", "training_failed", "training failed: labels not among the task's classes"),
    ],
)
def test_a_worker_that_fails_fails_its_job(world: World, mode: str, kind: str, message: str) -> None:
    manager = world.manager(mode)
    failed = wait_for(manager, manager.submit("a", DATA, JobOptions()).id, finished)
    assert (failed.state, failed.error_type) == ("failed", kind)
    assert message in (failed.error or "")


def test_lines_that_are_not_events_are_ignored(world: World) -> None:
    manager = world.manager("garbage")
    assert wait_for(manager, manager.submit("a", DATA, JobOptions()).id, finished).state == "succeeded"


def test_replace_semantics_are_the_uploads(world: World) -> None:
    world.registry.put("taken", world.other)
    version = world.registry.info("taken").version
    manager = world.manager()
    with pytest.raises(MemoryConflict, match="already exists"):
        manager.submit("taken", DATA, JobOptions())
    with pytest.raises(MemoryConflict, match="If-Match"):
        manager.submit("taken", DATA, JobOptions(), if_match="0" * 64)
    with pytest.raises(MemoryConflict, match="does not exist"):
        manager.submit("new", DATA, JobOptions(), if_match="*")
    job = manager.submit("taken", DATA, JobOptions(), if_match=version)
    done = wait_for(manager, job.id, finished)
    assert done.state == "succeeded", done.error
    assert world.registry.info("taken").version == done.version != version


def test_a_task_created_while_the_job_ran_is_not_overwritten(world: World) -> None:
    """Checked at submission and again by the install: an upload that got there first wins."""
    manager = world.manager("gated")
    job = manager.submit("race", DATA, JobOptions())
    wait_for(manager, job.id, stepping)
    world.registry.put("race", world.other)  # an upload lands while the job trains
    version = world.registry.info("race").version
    (world.tmp_path / "trained.safetensors.go").touch()  # the worker may finish now
    failed = wait_for(manager, job.id, finished)
    assert (failed.state, failed.error_type) == ("failed", "memory_conflict")
    assert "the trained memory was not installed" in (failed.error or "")
    assert failed.produced_version is not None
    assert world.registry.info("race").version == version != failed.produced_version


def test_one_job_per_task_at_a_time_on_a_replica(world: World) -> None:
    manager = world.manager("hang")
    job = manager.submit("a", DATA, JobOptions())
    with pytest.raises(MemoryConflict, match=job.id):
        manager.submit("a", DATA, JobOptions(), replace=True)


def stored_record(world: World, **fields: Any) -> JobRecord:
    now = time.time()
    values: dict[str, Any] = {
        "id": new_job_id(now), "task": "t", "state": "running", "created_at": now, "replica": "r1",
        "instance": "previous", "heartbeat_at": now, "task_type": "classification", "started_at": now,
        **fields,
    }  # fmt: skip
    record = JobRecord(**values)
    world.records.write(record)
    return record


def test_a_restart_marks_the_jobs_it_left_running_failed_and_says_so(world: World) -> None:
    running = stored_record(world)
    queued = stored_record(world, state="queued", started_at=None)
    elsewhere = stored_record(world, replica="r2")  # another replica's live job: not ours to settle
    world.registry.put("installed", world.trained)
    finishing = stored_record(
        world, task="installed", produced_version=world.registry.info("installed").version
    )
    manager = world.manager()
    for record, was in ((running, "while it ran"), (queued, "before it started")):
        settled = world.records.read(record.id)
        assert settled is not None
        assert settled.state == "failed"
        assert settled.error_type == "interrupted"
        assert f"interrupted by a restart of replica r1 {was}" in (settled.error or "")
        assert manager.get(record.id).state == "failed"
    other = world.records.read(elsewhere.id)
    assert other is not None
    assert other.state == "running"
    assert manager.get(elsewhere.id).state == "running"  # its heartbeat is fresh
    done = world.records.read(finishing.id)
    assert done is not None
    assert (done.state, done.version) == ("succeeded", finishing.produced_version)


def test_a_job_whose_replica_stopped_updating_it_is_shown_interrupted(world: World) -> None:
    stale = stored_record(world, replica="gone", heartbeat_at=time.time() - 3600)
    manager = world.manager()
    shown = manager.get(stale.id)
    assert shown.state == "failed"
    assert "replica gone stopping" in (shown.error or "")
    stored = world.records.read(stale.id)
    assert stored is not None
    assert stored.state == "running"  # never written by a replica that does not run it
    assert [r.id for r in manager.list(state="failed")] == [stale.id]


def test_a_cancel_asked_of_another_replica_reaches_the_one_running_the_job(world: World) -> None:
    runner = world.manager("hang", replica="r1")
    job = runner.submit("a", DATA, JobOptions())
    wait_for(runner, job.id, stepping)
    other = world.manager(replica="r2")
    asked = other.cancel(job.id)
    assert asked.cancel_requested
    assert asked.state == "running"
    assert wait_for(other, job.id, finished, timeout_s=20).state == "cancelled"


def test_old_finished_records_are_pruned(world: World) -> None:
    manager = world.manager(max_records=2)
    ids = []
    for task in ("a", "b", "c"):
        job = manager.submit(task, DATA, JobOptions(epochs=1))
        wait_for(manager, job.id, finished)
        ids.append(job.id)
    time.sleep(0.2)
    assert world.records.ids() == sorted(ids)[-2:]
    assert [r.id for r in manager.list()] == sorted(ids, reverse=True)[:2]

"""Training-job records on both stores (a local folder, a real S3-compatible server): whole records,
ids oldest first, cancel markers, deletes; never mistaken for a task, nor a task for them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mounts import mounted, remount_read_only  # tests/ is on sys.path (rootdir conftest)

from app.errors import JobNotFound, StoreReadOnly
from app.jobs.factory import open_job_records
from app.jobs.records import JobRecord, JobRecords, LocalJobRecords, new_job_id
from app.jobs.s3records import S3JobRecords
from app.registry.s3store import S3Store
from app.registry.store import LocalFolderStore, MemoryStore
from app.settings import Settings


@pytest.fixture(params=["local", "s3"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[JobRecords, MemoryStore]]:
    """Job records and the memory store they live beside."""
    if request.param == "local":
        yield LocalJobRecords(tmp_path / "memories" / "jobs"), LocalFolderStore(tmp_path / "memories")
        return
    seaweed = request.getfixturevalue("seaweed")
    prefix = f"{uuid.uuid4().hex[:12]}/memories/"
    client = seaweed.client()
    yield S3JobRecords(client, seaweed.bucket, prefix), S3Store(client, seaweed.bucket, prefix)


def record(job_id: str, **fields: Any) -> JobRecord:
    now = time.time()
    return JobRecord(id=job_id, task="jobs", state="queued", created_at=now, replica="r", instance="i",
                     heartbeat_at=now, task_type="classification", **fields)  # fmt: skip


def test_records_are_written_whole_listed_in_order_and_deleted(stores: Any) -> None:
    records, _ = stores
    assert records.ids() == []
    older, newer = new_job_id(time.time() - 10), new_job_id()
    records.write(record(newer))
    records.write(record(older, labels=["a", "b"]))
    assert records.ids() == [older, newer]
    got = records.read(older)
    assert got is not None
    assert got.labels == ["a", "b"]
    records.write(got.model_copy(update={"state": "running", "revision": 1}))
    again = records.read(older)
    assert again is not None
    assert (again.state, again.revision) == ("running", 1)
    assert records.read(new_job_id()) is None
    records.delete(newer)
    records.delete(newer)  # absent: no error
    assert records.ids() == [older]


def test_cancel_markers(stores: Any) -> None:
    records, _ = stores
    job_id = new_job_id()
    records.write(record(job_id))
    assert not records.cancel_requested(job_id)
    records.request_cancel(job_id)
    assert records.cancel_requested(job_id)
    assert records.ids() == [job_id]  # a marker is not a record
    records.delete(job_id)
    assert not records.cancel_requested(job_id)


def test_records_and_tasks_never_collide(stores: Any) -> None:
    records, memories = stores
    job_id = new_job_id()
    records.write(record(job_id))  # its task is called "jobs", like the records' folder
    memories.write("jobs", b"a memory", expected=None)
    assert set(memories.scan()) == {"jobs"}
    assert records.ids() == [job_id]
    for bad in ("../jobs", "x", f"{job_id}/..", f"{job_id}.json"):
        with pytest.raises(JobNotFound):
            records.read(bad)


def test_the_settings_put_the_records_beside_the_memories(tmp_path: Path, seaweed: Any) -> None:
    local = open_job_records(Settings(memory_dir=tmp_path / "m"))
    assert isinstance(local, LocalJobRecords)
    assert local.root == tmp_path / "m" / "jobs"
    env = seaweed.settings_env(seaweed.bucket, prefix="team/memories/")
    remote = open_job_records(Settings(**{key.removeprefix("SPARTAN_").lower(): value
                                          for key, value in env.items()}))  # fmt: skip
    assert isinstance(remote, S3JobRecords)
    assert remote.prefix == "team/memories/jobs/"


def test_a_read_only_store_refuses_records_with_the_stores_error(tmp_path: Path) -> None:
    with mounted(tmp_path / "memories", "size=1m") as folder:
        remount_read_only(folder)
        records = LocalJobRecords(folder / "jobs")
        assert records.ids() == []
        with pytest.raises(StoreReadOnly, match="read-only"):
            records.write(record(new_job_id()))

"""Training-job records: what a job is and how it went, kept in the memory store so that every replica
(and a restarted one) can answer for it.

A record is one small JSON object per job, `jobs/<id>.json` beside the task memories: in the local
store the folder `<SPARTAN_MEMORY_DIR>/jobs/`, in the S3 store the keys `<SPARTAN_S3_PREFIX>jobs/`
(s3records.py). Neither is ever taken for a task: a task is a `<name>.safetensors` file directly in the
store, a name has no '/' (app/registry/names.py), and a job id is a timestamp and a random suffix of
its own shape (`JOB_ID_RE`), checked wherever an id comes in, so it can never name another path.

Only the replica that runs a job writes its record (whole, atomically: a reader sees the old or the
new one). A cancel asked of another replica is a separate marker object, `jobs/<id>.cancel`, that the
running replica looks for; so no two writers ever race on one record.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from app.errors import JobNotFound
from app.fsutil import fsync_folder, write_atomically
from app.registry.store import write_refused

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE: frozenset[str] = frozenset({"queued", "running"})
FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

JOB_ID_RE = re.compile(r"\d{8}-\d{6}-[0-9a-f]{8}")
JOBS_FOLDER = "jobs"
RECORD_SUFFIX = ".json"
CANCEL_SUFFIX = ".cancel"


_TICKS = 1 << 24  # per second, in an id: 60 ns
_last_tick = 0
_tick_lock = threading.Lock()


def new_job_id(now: float | None = None) -> str:
    """`YYYYMMDD-HHMMSS-<8 hex>` (UTC): 6 hex of the second's fraction, then a random byte. Ids made
    here strictly increase (so they sort by creation); another replica's differ by the random byte."""
    global _last_tick
    with _tick_lock:
        tick = max(int((time.time() if now is None else now) * _TICKS), _last_tick + 1)
        _last_tick = tick
    seconds, fraction = divmod(tick, _TICKS)
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(seconds))}-{fraction:06x}{secrets.token_hex(1)}"


def validate_job_id(job_id: str) -> str:
    if not JOB_ID_RE.fullmatch(job_id):
        shown = job_id if len(job_id) <= 40 else job_id[:40] + "..."
        raise JobNotFound(f"no training job {shown!r} (a job id looks like 20261201-101500-3fa2c1d0)")
    return job_id


class JobProgress(BaseModel):
    epoch: int = 0  # the epoch in progress (or the last one finished)
    epochs: int = 0
    step: int = 0  # optimizer steps done, over every epoch
    steps: int = 0  # optimizer steps the job will take
    loss: float | None = None  # training loss, mean of the latest steps
    elapsed_s: float = 0.0  # since training started (after the backbone loaded)
    eta_s: float | None = None
    examples_per_s: float | None = None


class EpochSummary(BaseModel):
    epoch: int
    train_loss: float
    dev: dict[str, float] = Field(default_factory=dict)
    seconds: float


class JobRecord(BaseModel):
    """One job, as stored. Times are Unix seconds."""

    id: str
    task: str
    state: JobState
    created_at: float
    replica: str  # the replica that accepted the job and runs it
    instance: str  # that replica's process (a restart is a new instance)
    heartbeat_at: float  # the running replica rewrites active records at least this often
    replace: bool = False
    if_match: str | None = None
    task_type: Literal["classification", "regression"]
    labels: list[str] = Field(default_factory=list)
    text_pairs: bool = False
    examples: dict[str, int] = Field(default_factory=dict)  # rows per split: train, dev, test
    config: dict[str, Any] = Field(default_factory=dict)
    started_at: float | None = None
    finished_at: float | None = None
    worker_pid: int | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    epochs: list[EpochSummary] = Field(default_factory=list)
    best_epoch: int | None = None
    dev: dict[str, float] = Field(default_factory=dict)
    test: dict[str, float] = Field(default_factory=dict)
    produced_version: str | None = None  # sha256 of the memory trained, known before its install
    version: str | None = None  # the memory version installed (succeeded jobs)
    error: str | None = None
    error_type: str | None = None
    cancel_requested: bool = False
    revision: int = 0  # +1 on every change

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


class JobRecords(Protocol):
    """Where job records live: a folder, or keys of a bucket."""

    @property
    def location(self) -> str: ...

    def write(self, record: JobRecord) -> None:
        """Store the record whole and atomically (a reader sees the previous one or this one)."""
        ...

    def read(self, job_id: str) -> JobRecord | None:
        """The stored record, or None if there is none."""
        ...

    def ids(self) -> list[str]:
        """Every stored job id, oldest first."""
        ...

    def delete(self, job_id: str) -> None:
        """Remove the record and its cancel marker (no error if absent)."""
        ...

    def request_cancel(self, job_id: str) -> None:
        """Leave the marker that asks the replica running the job to cancel it."""
        ...

    def cancel_requested(self, job_id: str) -> bool: ...


def parse_record(data: bytes) -> JobRecord:
    return JobRecord.model_validate_json(data)


class LocalJobRecords:
    """Records as `<root>/<id>.json` files (root: `<memory_dir>/jobs`), cancel markers as `<id>.cancel`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def location(self) -> str:
        return str(self.root.resolve())

    def _path(self, job_id: str, suffix: str = RECORD_SUFFIX) -> Path:
        return self.root / f"{validate_job_id(job_id)}{suffix}"

    def write(self, record: JobRecord) -> None:
        with _refused_as(record.task):
            write_atomically(self._path(record.id), record.model_dump_json().encode())

    def read(self, job_id: str) -> JobRecord | None:
        try:
            return parse_record(self._path(job_id).read_bytes())
        except FileNotFoundError:
            return None

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        found = (name.removesuffix(RECORD_SUFFIX) for name in names if name.endswith(RECORD_SUFFIX))
        return sorted(job_id for job_id in found if JOB_ID_RE.fullmatch(job_id))

    def delete(self, job_id: str) -> None:
        with _refused_as("*"):
            for suffix in (RECORD_SUFFIX, CANCEL_SUFFIX):
                self._path(job_id, suffix).unlink(missing_ok=True)
            if self.root.is_dir():
                fsync_folder(self.root)

    def request_cancel(self, job_id: str) -> None:
        with _refused_as("*"):
            write_atomically(self._path(job_id, CANCEL_SUFFIX), b"cancel\n")

    def cancel_requested(self, job_id: str) -> bool:
        return self._path(job_id, CANCEL_SUFFIX).exists()


@contextmanager
def _refused_as(task: str) -> Iterator[None]:
    """A full or read-only store: the registry's own errors (507, 503), nothing left behind."""
    try:
        yield
    except OSError as err:
        if (refused := write_refused(task, err)) is not None:
            raise refused from err
        raise

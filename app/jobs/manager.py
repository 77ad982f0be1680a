"""One replica's training jobs: accept, queue (bounded), run each in its own process, follow it, install
what it trained through the upload path, and keep every job's record in the store.

Threads (none of them trains; training is the worker process's, app/jobs/worker.py):
* `max_running_jobs` supervisors: each takes the oldest queued job, starts its worker process, reads
  its events (protocol.py) into the job's record, and at the end installs the memory with
  `Registry.put` (full validation, compare-and-swap store write, hot swap), exactly as an upload;
* one heartbeat: rewrites this replica's active records every HEARTBEAT_S (so other replicas can tell
  a live job from one whose replica died), retries records whose last write failed, and looks for
  cancel markers that other replicas left for jobs running here.

A job ends `succeeded` (with the version it installed), `failed` (with the reason: bad data found by
the trainer, the process killed or crashed, the install refused, a restart) or `cancelled`. Nothing
partial is ever installed: the worker writes only into its own folder, and the registry writes the
store atomically or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import app
from app.errors import (
    JobFinished,
    JobNotFound,
    JobQueueFull,
    MemoryConflict,
    NotReady,
    SpartanError,
    StoreUnavailable,
    TaskNotFound,
)
from app.jobs.options import JobOptions
from app.jobs.protocol import MEMORY_FILE, encode_data, parse_event, write_job
from app.jobs.records import FINAL, EpochSummary, JobRecord, JobRecords, new_job_id, validate_job_id
from app.metrics import Metrics
from app.registry.records import check_replace
from app.registry.registry import Registry
from app.settings import Settings
from app.training.datasets import TaskData
from app.training.trainer import TrainConfig

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0  # active records are rewritten at least this often
STALE_AFTER_S = 60.0  # an active record not rewritten for this long belongs to a replica that is gone
PERSIST_EVERY_S = 1.0  # progress of a running job reaches the store at most this often
CANCEL_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this
CLOSE_WAIT_S = 10.0
QUEUE_RETRY_AFTER_S = 30.0  # Retry-After of a full queue when no running job has an ETA yet
_EOF = object()


@dataclass(frozen=True)
class JobsConfig:
    """What the manager needs of the settings."""

    replica: str
    max_running: int
    max_queued: int
    threads: int
    nice: int
    backbone: str
    cache_dir: Path
    max_records: int
    heartbeat_s: float = HEARTBEAT_S

    @classmethod
    def from_settings(cls, settings: Settings) -> JobsConfig:
        return cls(
            replica=settings.replica,
            max_running=settings.max_running_jobs,
            max_queued=settings.max_queued_jobs,
            threads=settings.training_threads,
            nice=settings.training_nice,
            backbone=settings.backbone,
            cache_dir=settings.cache_dir,
            max_records=settings.max_job_records,
        )


@dataclass
class _Job:
    record: JobRecord
    data: TaskData | None  # handed to the worker when the job starts, then dropped
    config: TrainConfig
    process: subprocess.Popen[str] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    persisted: int = -1  # the revision last written to the store
    training_since: float | None = None  # monotonic: the worker's `started`


def worker_command() -> list[str]:
    return [sys.executable, "-m", "app.jobs.worker"]


def error_type(error: BaseException) -> str:
    """MemoryConflict -> memory_conflict: the type the API answers the same error with."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower()


def signal_name(returncode: int) -> str:
    try:
        return f"signal {-returncode} ({signal.Signals(-returncode).name})"
    except ValueError:
        return f"signal {-returncode}"


class JobManager:
    def __init__(
        self,
        registry: Registry,
        records: JobRecords,
        config: JobsConfig,
        metrics: Metrics | None = None,
        *,
        command: list[str] | None = None,
    ) -> None:
        self.registry = registry
        self.records = records
        self.config = config
        self.metrics = metrics or Metrics()
        self.command = command or worker_command()
        self.instance = uuid.uuid4().hex[:12]
        self._jobs: dict[str, _Job] = {}  # this instance's jobs (active, and recently finished)
        self._queue: deque[str] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._persist_lock = threading.Lock()
        self._closing = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Settle what a previous run of this replica left unfinished, then start taking jobs."""
        try:
            self.recover()
        except StoreUnavailable as err:  # serving must not wait on it: records are settled later
            log.warning("training jobs: cannot read the job records at start (%s)", err)
        for number in range(self.config.max_running):
            self._spawn(self._supervise, f"spartan-jobs-{number}")
        self._spawn(self._heartbeat, "spartan-jobs-heartbeat")

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        """Stop: queued jobs fail, running ones are stopped and fail ("the service shut down")."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.record.state == "queued":
                self._finish(job, "failed", "interrupted: the service shut down before the job started",
                             "interrupted")  # fmt: skip
            elif job.record.state == "running" and job.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    job.process.terminate()
        for job in jobs:
            job.done.wait(CLOSE_WAIT_S)
        self._stop.set()
        for thread in self._threads:
            thread.join(CLOSE_WAIT_S)
        self._threads.clear()

    def recover(self) -> None:
        """Jobs of this replica that a previous process left queued or running end here, saying so."""
        for job_id in self.records.ids():
            record = self.records.read(job_id)
            if record is None or not record.active or record.replica != self.config.replica:
                continue
            if record.instance == self.instance:
                continue
            settled = self._settle_interrupted(record, "a restart of replica " + self.config.replica)
            self.records.write(settled)
            log.warning("training job %s (task %s): %s", record.id, record.task, settled.error)
        self._prune()

    def _settle_interrupted(self, record: JobRecord, cause: str) -> JobRecord:
        """An active record whose process is gone: succeeded if the memory it trained is what the store
        holds for its task (it was installed just before the end), else failed."""
        now = time.time()
        changes: dict[str, Any] = {"finished_at": now, "heartbeat_at": now, "revision": record.revision + 1}
        if (
            record.produced_version is not None
            and self._current_version(record.task) == record.produced_version
        ):
            changes.update(state="succeeded", version=record.produced_version)
        else:
            was = "before it started" if record.state == "queued" else "while it ran"
            changes.update(
                state="failed",
                error=f"interrupted by {cause} {was}; nothing was installed (submit it again)",
                error_type="interrupted",
            )
        return record.model_copy(update=changes)

    # ------------------------------------------------------------------------------------ requests

    def submit(
        self,
        task: str,
        data: TaskData,
        options: JobOptions,
        *,
        replace: bool = False,
        if_match: str | None = None,
    ) -> JobRecord:
        """Queue a job (its data already checked); its record is in the store before this returns."""
        num_layers = self.registry.identity.num_layers
        config = options.train_config(num_layers)
        now = time.time()
        record = JobRecord(
            id=new_job_id(now), task=task, state="queued", created_at=now, replica=self.config.replica,
            instance=self.instance, heartbeat_at=now, replace=replace, if_match=if_match,
            task_type=data.task_type, labels=list(data.labels), text_pairs=data.has_pairs,
            examples={"train": len(data.train), "dev": len(data.dev), "test": len(data.test)},
            config=options.described(num_layers),
        )  # fmt: skip
        job = _Job(record, data, config)
        with self._lock:
            self._admit(task)
            self._jobs[record.id] = job
        try:
            check_replace(task, self._current_version(task), replace, if_match)
            self.records.write(record)
        except BaseException:
            with self._lock:
                del self._jobs[record.id]
            raise
        job.persisted = record.revision
        with self._lock:
            self._queue.append(record.id)
            self._wake.notify()
        self._update_gauges()
        log.info("training job %s: task %s, %d training rows, queued", record.id, task, len(data.train))
        return record.model_copy(deep=True)

    def _admit(self, task: str) -> None:
        """Refuse a job beyond the queue, or a second one for a task with a job in progress here."""
        if self._closing:
            raise NotReady("the service is stopping: it takes no training jobs")
        active = [job.record for job in self._jobs.values() if job.record.active]
        if len(active) >= self.config.max_running + self.config.max_queued:
            raise JobQueueFull(
                f"this replica holds {len(active)} training jobs, as many as it takes "
                f"(SPARTAN_MAX_RUNNING_JOBS {self.config.max_running} + SPARTAN_MAX_QUEUED_JOBS "
                f"{self.config.max_queued}): retry later",
                retry_after=self._retry_after(active),
            )
        for other in active:
            if other.task == task:
                raise MemoryConflict(
                    f"training job {other.id} for task {task!r} is {other.state}: cancel it or wait for it"
                )

    def _retry_after(self, active: list[JobRecord]) -> float:
        etas = [r.progress.eta_s for r in active if r.state == "running" and r.progress.eta_s is not None]
        return min(600.0, max(1.0, min(etas))) if etas else QUEUE_RETRY_AFTER_S

    def get(self, job_id: str) -> JobRecord:
        """The job's record: this replica's own copy if it runs it, else the store's (JobNotFound)."""
        validate_job_id(job_id)
        own = self.peek(job_id)
        if own is not None:
            return own
        record = self.records.read(job_id)
        if record is None:
            raise JobNotFound(f"no training job {job_id!r}")
        return self._view(record)

    def peek(self, job_id: str) -> JobRecord | None:
        """This instance's copy of a job it holds, without any I/O; None otherwise."""
        with self._lock:
            job = self._jobs.get(job_id)
            return job.record.model_copy(deep=True) if job is not None else None

    def list(self, *, task: str | None = None, state: str | None = None, limit: int = 50) -> list[JobRecord]:
        """Newest first, of every replica (the store's records) and this one's own."""
        with self._lock:
            ids = set(self._jobs)
        ids.update(self.records.ids())
        found: list[JobRecord] = []
        for job_id in sorted(ids, reverse=True):
            own = self.peek(job_id)
            record = own if own is not None else self.records.read(job_id)
            if record is None:
                continue
            record = self._view(record)
            if (task is None or record.task == task) and (state is None or record.state == state):
                found.append(record)
                if len(found) >= limit:
                    break
        return found

    def _view(self, record: JobRecord) -> JobRecord:
        """A stored record as it stands now: an active one whose replica stopped rewriting it (gone,
        or restarted without settling it yet) is shown failed, interrupted. Never written back."""
        if not record.active or record.instance == self.instance:
            return record
        age = time.time() - record.heartbeat_at
        restarted_here = record.replica == self.config.replica
        if not restarted_here and age < STALE_AFTER_S:
            return record
        cause = (
            f"a restart of replica {record.replica}"
            if restarted_here
            else f"replica {record.replica} stopping (its last update was {age:.0f} s ago)"
        )
        return self._settle_interrupted(record, cause).model_copy(update={"revision": record.revision})

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job. A job another replica runs is asked to stop (a marker in
        the store it looks for within HEARTBEAT_S); this answers with its record as it is."""
        validate_job_id(job_id)
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            record = self.get(job_id)
            if not record.active:
                raise JobFinished(f"training job {job_id} has already {record.state}: nothing to cancel")
            self.records.request_cancel(job_id)
            return record.model_copy(update={"cancel_requested": True})
        process: subprocess.Popen[str] | None = None
        with self._lock:
            state = job.record.state
            if state in FINAL:
                raise JobFinished(f"training job {job_id} has already {state}: nothing to cancel")
            if state == "running":
                self._change(job, cancel_requested=True)
                process = job.process
        if state == "queued":
            with self._lock, contextlib.suppress(ValueError):
                self._queue.remove(job_id)
            self._finish(job, "cancelled", "cancelled before it started", "cancelled")
        elif process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        job.done.wait(CANCEL_GRACE_S + 5.0)
        return self.peek(job_id) or job.record

    # ------------------------------------------------------------------------------------ running

    def _supervise(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                job = self._jobs[self._queue.popleft()]
                if job.record.state != "queued":
                    continue
                self._change(job, state="running", started_at=time.time())
            self._update_gauges()
            try:
                self._run(job)
            except Exception:  # the supervisor outlives any one job
                log.exception("training job %s failed unexpectedly", job.record.id)
                self._finish(
                    job, "failed", "the job failed unexpectedly; see the service log", "internal_error"
                )
            finally:
                self._prune()

    def _run(self, job: _Job) -> None:
        record = job.record
        folder = Path(tempfile.mkdtemp(prefix=f"spartan-job-{record.id}-"))
        try:
            assert job.data is not None
            write_job(folder, {
                "job_id": record.id, "backbone": self.config.backbone,
                "cache_dir": str(self.config.cache_dir), "threads": self.config.threads,
                "nice": self.config.nice, "config": asdict(job.config), "data": encode_data(job.data),
                "parent": os.getpid(),
            })  # fmt: skip
            job.data = None  # the worker has it now
            self._persist(job)
            process = subprocess.Popen(
                [*self.command, str(folder)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                env=self._worker_env(), text=True, encoding="utf-8",
                start_new_session=True,  # a terminal's Ctrl-C is the service's to handle, not the job's
            )  # fmt: skip
            with self._lock:
                job.process = process
                self._change(job, worker_pid=process.pid)
            log.info("training job %s: worker process %d started", record.id, process.pid)
            with process:  # its pipe is closed and the process reaped, however this ends
                outcome = self._follow(job, process)
                returncode = process.wait()
            self._conclude(job, folder, outcome, returncode)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _worker_env(self) -> dict[str, str]:
        # The worker reads no settings and needs no secret: keys and store credentials stay here.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARTAN_", "AWS_"))}
        threads = str(self.config.threads)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
        root = str(Path(app.__file__).resolve().parents[1])  # the worker runs this same checkout
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        return env

    def _follow(self, job: _Job, process: subprocess.Popen[str]) -> dict[str, Any] | None:
        """Read the worker's events until its stdout closes; its `done` or `error` event, if any."""
        events: queue.Queue[Any] = queue.Queue()
        assert process.stdout is not None
        reader = threading.Thread(
            target=_read_events, args=(process.stdout, events), name="spartan-jobs-reader", daemon=True
        )
        reader.start()
        outcome: dict[str, Any] | None = None
        terminated_at: float | None = None
        last_write = 0.0
        while True:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                event = None
            if event is _EOF:
                break
            if event is not None:
                self._apply(job, event)
                if event["event"] in ("done", "error"):
                    outcome = event
            now = time.monotonic()
            if (job.record.cancel_requested or self._closing) and terminated_at is None and outcome is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
                terminated_at = now
            if terminated_at is not None and now - terminated_at > CANCEL_GRACE_S and process.poll() is None:
                process.kill()
            if now - last_write >= PERSIST_EVERY_S:
                self._persist(job)
                last_write = now
        reader.join(5.0)
        return outcome

    def _apply(self, job: _Job, event: dict[str, Any]) -> None:
        """One worker event into the job's record."""
        kind = event["event"]
        with self._lock:
            progress = job.record.progress.model_copy()
            if kind == "started":
                job.training_since = time.monotonic()
                progress.epochs, progress.steps = int(event["epochs"]), int(event["steps"])
                progress.epoch = 1
            elif kind == "step" and job.training_since is not None:
                progress.step = int(event["step"])
                if event.get("loss") is not None:
                    progress.loss = float(event["loss"])
                per_epoch = max(1, progress.steps // max(1, progress.epochs))
                progress.epoch = min(progress.epochs, (progress.step - 1) // per_epoch + 1)
                elapsed = time.monotonic() - job.training_since
                progress.elapsed_s = elapsed
                remaining = max(0, progress.steps - progress.step)
                progress.eta_s = elapsed / progress.step * remaining if progress.step else None
                batch = int(job.record.config.get("batch_size", 1))
                progress.examples_per_s = progress.step * batch / elapsed if elapsed > 0 else None
            elif kind == "epoch":
                summary = EpochSummary(
                    epoch=int(event["epoch"]), train_loss=float(event["train_loss"]),
                    dev={k: float(v) for k, v in dict(event["dev"]).items()}, seconds=float(event["seconds"]),
                )  # fmt: skip
                self._change(job, epochs=[*job.record.epochs, summary])
            self._change(job, progress=progress)

    def _conclude(self, job: _Job, folder: Path, outcome: dict[str, Any] | None, returncode: int) -> None:
        record = job.record
        if outcome is not None and outcome["event"] == "done" and returncode == 0:
            if self._closing:
                self._finish(job, "failed", "interrupted: the service shut down before the trained memory "
                             "was installed; nothing was installed", "interrupted")  # fmt: skip
                return
            self._install(job, folder / MEMORY_FILE, outcome["report"])
        elif record.cancel_requested:
            self._finish(job, "cancelled", "cancelled while it ran; nothing was installed", "cancelled")
        elif self._closing:
            self._finish(job, "failed", "interrupted: the service shut down while the job ran; nothing was "
                         "installed", "interrupted")  # fmt: skip
        elif outcome is not None and outcome["event"] == "error":
            self._finish(job, "failed", f"training failed: {outcome.get('message')}", "training_failed")
        else:
            how = signal_name(returncode) if returncode < 0 else f"status {returncode}"
            self._finish(job, "failed", f"the training process ended ({how}) before it finished; nothing "
                         "was installed", "worker_died")  # fmt: skip

    def _install(self, job: _Job, memory_path: Path, report: dict[str, Any]) -> None:
        """The trained memory through the upload path: validated, compare-and-swap written, swapped in."""
        record = job.record
        data = memory_path.read_bytes()
        epochs = [
            EpochSummary(epoch=e["epoch"], train_loss=e["train_loss"], dev=e["dev"], seconds=e["seconds"])
            for e in report.get("epochs", [])
        ]
        seconds = float(report.get("seconds_total") or 0.0)
        with self._lock:
            self._change(
                job, epochs=epochs, best_epoch=report.get("best_epoch"), dev=report.get("dev", {}),
                test=report.get("test", {}), produced_version=hashlib.sha256(data).hexdigest(),
            )  # fmt: skip
        self._persist(job)  # the version it will install is on record before the store changes
        try:
            put = self.registry.put(record.task, data, replace=record.replace, if_match=record.if_match)
        except SpartanError as err:
            self._finish(job, "failed", f"the trained memory was not installed: {err}", error_type(err))
            return
        if seconds > 0 and epochs:
            self.metrics.training_examples_per_second.observe(
                record.examples["train"] * len(epochs) / seconds
            )
        version = put.info.version or ""
        self._finish(job, "succeeded", None, None, version=version)
        log.info("training job %s: task %s installed, version %s", record.id, record.task, version[:12])

    def _finish(self, job: _Job, state: str, error: str | None, kind: str | None, **changes: Any) -> None:
        with self._lock:
            if job.record.state in FINAL:
                return
            now = time.time()
            self._change(job, state=state, error=error, error_type=kind, finished_at=now, **changes)
            started = job.record.started_at or job.record.created_at
            job.process = None
        self.metrics.training_jobs_finished.labels(state).inc()
        self.metrics.training_job_duration.labels(state).observe(max(0.0, now - started))
        self._update_gauges()
        self._persist(job)
        job.done.set()
        if error is not None:  # a cancel was asked for; a failure is news
            level = logging.INFO if state == "cancelled" else logging.WARNING
            log.log(level, "training job %s (task %s): %s: %s", job.record.id, job.record.task, state, error)

    # ------------------------------------------------------------------------------------ records

    def _change(self, job: _Job, **changes: Any) -> None:
        """Change the record (`_lock` held): every change is a new revision."""
        now = time.time()
        job.record = job.record.model_copy(
            update={**changes, "revision": job.record.revision + 1, "heartbeat_at": now}
        )

    def _persist(self, job: _Job, *, heartbeat: bool = False) -> None:
        """Write the record if it changed (or, for a heartbeat, anyway); a failed write is retried by
        the heartbeat, the job goes on."""
        with self._persist_lock:
            with self._lock:
                if heartbeat and job.record.active:
                    job.record = job.record.model_copy(update={"heartbeat_at": time.time()})
                elif job.record.revision == job.persisted:
                    return
                snapshot = job.record.model_copy(deep=True)
            try:
                self.records.write(snapshot)
            except SpartanError as err:
                log.warning("training job %s: its record was not saved (%s); retrying", snapshot.id, err)
                return
            job.persisted = snapshot.revision

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            with self._lock:
                jobs = list(self._jobs.values())
            for job in jobs:
                try:
                    asked = job.record.active and not job.record.cancel_requested
                    if asked and self.records.cancel_requested(job.record.id):
                        threading.Thread(target=self.cancel, args=(job.record.id,), daemon=True).start()
                    self._persist(job, heartbeat=job.record.active)
                except Exception:  # the heartbeat outlives a flaky store
                    log.exception("training job %s: heartbeat failed", job.record.id)

    def _prune(self) -> None:
        """Keep at most max_records finished records, in the store and in memory (oldest go first).
        A record of a replica that stopped updating it counts as finished here (see `_view`)."""
        try:
            ids = self.records.ids()
            for job_id in ids[: max(0, len(ids) - self.config.max_records)]:
                record = self.records.read(job_id)
                if record is None or not self._view(record).active:
                    self.records.delete(job_id)
        except SpartanError as err:
            log.warning("training jobs: old records not pruned (%s)", err)
        with self._lock:
            finished = [job_id for job_id, job in self._jobs.items() if not job.record.active]
            for job_id in sorted(finished)[: max(0, len(finished) - self.config.max_records)]:
                if self._jobs[job_id].persisted == self._jobs[job_id].record.revision:
                    del self._jobs[job_id]

    def _current_version(self, task: str) -> str | None:
        try:
            return self.registry.info(task).version
        except TaskNotFound:
            return None

    def _update_gauges(self) -> None:
        with self._lock:
            states = [job.record.state for job in self._jobs.values()]
        for state in ("queued", "running"):
            self.metrics.training_jobs.labels(state).set(states.count(state))


def _read_events(stream: IO[str], events: queue.Queue[Any]) -> None:
    """The worker's stdout, one event per line; a line that is not one is logged, not trusted."""
    try:
        for line in stream:
            event = parse_event(line)
            if event is None:
                if line.strip():
                    log.warning("training worker printed a line that is not an event: %.200s", line.rstrip())
                continue
            events.put(event)
    finally:
        events.put(_EOF)

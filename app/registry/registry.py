"""Task name -> task memory: discover files in the store, load lazily, swap atomically, evict by LRU.

Concurrency model:
* `_lock` guards the index (`_tasks`), the LRU order and the byte counters; it is held only for short
  bookkeeping, never while reading or validating a file.
* each task has its own lock, held while its file is read, validated and swapped in, so two requests
  for a cold task load it once, and a slow load of one task never blocks another.
* lock order is always task lock -> `_lock`.
* one live state per name: a state is only removed from the index (deleted) with its lock held, and
  whoever waited for that lock sees it is dead and starts again on the current state (`_locked_state`),
  so a write racing a delete never installs into a state nobody indexes (byte accounting stays exact).

A memory is validated completely before it replaces anything: a bad upload or a bad file dropped in the
store leaves the old version serving. Requests keep a reference to the memory they resolved, so a
swap, an eviction or a delete never changes a request in flight (its memory is freed when it is done).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from app.errors import (
    MemoryConflict,
    MemoryInvalid,
    StoreConflict,
    StoreUnavailable,
    TaskNotFound,
    TaskUnavailable,
)
from app.metrics import Metrics
from app.registry.guard import GuardedStore
from app.registry.names import validate_task_name
from app.registry.store import MemoryStore, StoredFile
from app.spartan.memfile import (
    BackboneIdentity,
    check_backbone,
    check_tensor_entries,
    load_memory,
    parse_spec,
    read_header,
)
from app.spartan.memory import MemorySpec, TaskMemory, TaskType

log = logging.getLogger(__name__)

TaskStatus = Literal["loaded", "on_disk", "invalid"]

# Told (task, memory) when a memory is installed, (task, None) when the task is unregistered.
MemoryListener = Callable[[str, TaskMemory | None], None]


@dataclass(frozen=True)
class FileFacts:
    """What one version of a stored file is: read once per stamp (hash + header checks, no tensors)."""

    stored: StoredFile
    version: str
    spec: MemorySpec | None
    error: str | None = None  # why this file cannot be served


@dataclass(frozen=True)
class TaskInfo:
    """A task as the registry reports it."""

    name: str
    status: TaskStatus
    version: str | None  # sha256 of the stored file
    loaded_version: str | None  # sha256 of the resident memory (differs while a bad new file is ignored)
    task_type: TaskType | None
    labels: tuple[str, ...]
    text_pairs: bool | None
    max_length: int | None
    file_bytes: int | None
    memory_bytes: int
    pinned: bool
    load_seconds: float | None
    error: str | None
    requests: dict[str, int]
    spec: MemorySpec | None = None  # of the resident memory, else of the stored file (None if unreadable)


@dataclass(frozen=True)
class PutResult:
    created: bool
    info: TaskInfo


@dataclass
class _Task:
    name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    file: FileFacts | None = None  # None: a placeholder (an upload in progress), not registered
    memory: TaskMemory | None = None
    memory_bytes: int = 0
    load_seconds: float | None = None
    deleted: bool = False
    requests: Counter[str] = field(default_factory=Counter)


def memory_nbytes(memory: TaskMemory) -> int:
    """Bytes a memory keeps resident while it serves, inference caches included. Counted up front,
    so the LRU budget holds before the first request."""
    return memory.resident_bytes()


@functools.cache
def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)  # glibc only


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so that a deleted memory really leaves the RSS.

    Without it glibc keeps the pages of freed tensors for reuse: right for LRU churn (the next load
    reuses them), wrong after a delete, when the operator expects the process to shrink.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Registry:
    """The registry of task memories over one `MemoryStore`, for one served backbone."""

    def __init__(
        self,
        store: MemoryStore,
        identity: BackboneIdentity,
        *,
        max_loaded: int = 256,
        max_loaded_bytes: int = 2 * 1024**3,
        pinned: Iterable[str] = (),
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.identity = identity
        self.max_loaded = max_loaded
        self.max_loaded_bytes = max_loaded_bytes
        self.metrics = metrics or Metrics()
        self._pinned = {validate_task_name(name) for name in pinned}
        self._tasks: dict[str, _Task] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident tasks, least recently used first
        self._loaded_bytes = 0
        self._lock = threading.RLock()
        self._poll_stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._listeners: list[MemoryListener] = []
        if isinstance(store, GuardedStore):
            store.bind_metrics(self.metrics)

    @property
    def store_up(self) -> bool:
        """False while the store does not answer (a call failed or timed out, until one answers)."""
        return self.store.up if isinstance(self.store, GuardedStore) else True

    def add_listener(self, listener: MemoryListener) -> None:
        """Called with (task, memory) after a memory is installed (first load, reload after eviction,
        upload, changed file) and with (task, None) after the task is unregistered (deleted, file gone).
        It runs in the thread that made the change, with the task's lock held: keep it quick."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------------------------ serving

    def resolve_loaded(self, task: str) -> TaskMemory | None:
        """The resident memory of `task`, without any I/O; None if it must be loaded first."""
        with self._lock:
            state = self._tasks.get(task)
            if state is None or state.memory is None:
                return None
            self._lru.move_to_end(task)
            return state.memory

    def resolve(self, task: str) -> TaskMemory:
        """The memory serving `task`, loading it from the store if needed (blocking: call off the loop)."""
        validate_task_name(task)
        memory = self.resolve_loaded(task)
        if memory is not None:
            return memory
        state = self._registered(task)
        with state.lock:
            if state.deleted:
                raise TaskNotFound(f"task {task!r} was deleted")
            memory = self.resolve_loaded(task)
            return memory if memory is not None else self._load(state)

    def record_request(self, task: str, outcome: str) -> None:
        with self._lock:
            state = self._tasks.get(task)
            if state is not None:
                state.requests[outcome] += 1

    # ------------------------------------------------------------------------------------ writes

    def put(self, task: str, data: bytes, *, replace: bool = False, if_match: str | None = None) -> PutResult:
        """Validate, store atomically, swap in. Nothing changes unless every step before it succeeded.

        Uploading the bytes the task already has is a no-op success (so retries are safe). Replacing
        an existing task needs `replace` or `if_match` equal to its current version ("*" matches any
        existing version); otherwise MemoryConflict. The store write is conditional on the stored
        file this check saw: a writer elsewhere (another replica) that got there first makes this
        one fail with StoreConflict instead of being overwritten silently.
        """
        validate_task_name(task)
        started = time.perf_counter()
        try:
            memory = load_memory(data, self.identity)
        except MemoryInvalid:
            self.metrics.memory_loads.labels("upload", "invalid").inc()
            raise
        seconds = time.perf_counter() - started
        with self._locked_state(task) as state:
            assert state is not None
            current = self._current_facts(state)
            if current is not None and current.version == memory.version and current.error is None:
                # The same bytes again (a client's or the proxy's retry): nothing to write; succeed.
                if state.memory is None or state.memory.version != memory.version:
                    self._install(state, memory, current, seconds, source="upload")
                with self._lock:
                    return PutResult(created=False, info=self._info(state))
            check_replace(task, current.version if current else None, replace, if_match)
            try:
                stored = self.store.write(task, data, expected=current.stored.stamp if current else None)
            except StoreConflict:
                self.metrics.store_conflicts.inc()
                raise
            facts = FileFacts(stored, memory.version, memory.spec)
            self._install(state, memory, facts, seconds, source="upload")
            with self._lock:
                info = self._info(state)
        log.info(
            "task %s: %s version %s", task, "replaced with" if current else "created", memory.version[:12]
        )
        return PutResult(created=current is None, info=info)

    def delete(self, task: str) -> None:
        """Remove the task's file and its resident memory (freed once requests in flight are done)."""
        validate_task_name(task)
        state = self._registered(task)
        with state.lock:
            if state.deleted:
                raise TaskNotFound(f"task {task!r} was deleted")
            self.store.delete(task)
            self._unregister(state)
        release_freed_memory()  # requests in flight may still hold the memory: theirs is freed later
        log.info("task %s: deleted", task)

    def pin(self, task: str) -> None:
        """Load `task` now and never evict it."""
        with self._lock:
            self._pinned.add(validate_task_name(task))
        self.resolve(task)

    # ------------------------------------------------------------------------------------ reading

    def info(self, task: str) -> TaskInfo:
        validate_task_name(task)
        state = self._registered(task)
        with self._lock:
            return self._info(state)

    def list(self) -> list[TaskInfo]:
        with self._lock:
            states = [s for s in self._tasks.values() if s.file is not None]
            return [self._info(s) for s in sorted(states, key=lambda s: s.name)]

    @property
    def loaded_count(self) -> int:
        return len(self._lru)

    @property
    def loaded_bytes(self) -> int:
        return self._loaded_bytes

    # ------------------------------------------------------------------------------------ store sync

    def refresh(self) -> None:
        """Bring the index in line with the store: new, changed and removed files.

        Cheap when nothing changed (one metadata scan). A changed file of a resident task is loaded
        and swapped in at once if valid; if not, the old version keeps serving and the error is shown.
        """
        listing = self.store.scan()
        with self._lock:
            known = {name: s.file.stored.stamp if s.file else None for name, s in self._tasks.items()}
        changed = [name for name, stored in listing.items() if known.get(name) != stored.stamp]
        removed = [name for name, stamp in known.items() if stamp is not None and name not in listing]
        for name in changed + removed:
            try:
                self._sync(name)
            except Exception:  # one unreadable file must not stop the others from syncing
                log.exception("task %s: cannot sync with the store", name)
        self._update_gauges()

    def refresh_when_reachable(self, timeout_s: float, retry_every_s: float = 1.0) -> None:
        """The first refresh at start: an object store that is still starting (compose, a new cluster)
        gets `timeout_s` to answer before the service gives up (StoreUnavailable)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if removed := self.store.recover():
                    log.warning("removed %d partial file(s) a crashed upload left in the store", removed)
                self.refresh()
                return
            except StoreUnavailable as err:
                if time.monotonic() >= deadline:
                    raise
                log.warning("memory store %s not reachable yet (%s); retrying", self.store.location, err)
                time.sleep(retry_every_s)

    def start_polling(self, interval_s: float) -> None:
        if interval_s <= 0 or self._poller is not None:
            return
        self._poll_stop.clear()
        self._poller = threading.Thread(
            target=self._poll, args=(interval_s,), name="spartan-store-poller", daemon=True
        )
        self._poller.start()

    def stop_polling(self) -> None:
        self._poll_stop.set()
        if self._poller is not None:
            self._poller.join(timeout=10)
            self._poller = None

    def load_pinned(self) -> None:
        for task in sorted(self._pinned):
            try:
                self.resolve(task)
            except (TaskNotFound, TaskUnavailable) as err:
                log.warning("pinned task %s is not served: %s", task, err)

    # ------------------------------------------------------------------------------------ internals

    def _poll(self, interval_s: float) -> None:
        while not self._poll_stop.wait(interval_s):
            started = time.perf_counter()
            try:
                self.refresh()
            except StoreUnavailable as err:  # a store that is down: said once per poll, no traceback
                self.metrics.store_polls.labels("error").inc()
                log.warning("memory store poll failed: %s", err)
            except Exception:  # the poller must outlive a flaky store
                self.metrics.store_polls.labels("error").inc()
                log.exception("memory store poll failed")
            else:
                self.metrics.store_polls.labels("ok").inc()
            self.metrics.store_poll_duration.observe(time.perf_counter() - started)

    def _registered(self, task: str) -> _Task:
        """The task's state; a file added to the store since the last poll is picked up here."""
        with self._lock:
            state = self._tasks.get(task)
        if state is not None and state.file is not None:
            return state
        self._sync(task, wait=True)
        with self._lock:
            state = self._tasks.get(task)
        if state is None or state.file is None:
            raise TaskNotFound(f"no memory is registered for task {task!r}")
        return state

    @contextmanager
    def _locked_state(self, task: str, *, wait: bool = True) -> Iterator[_Task | None]:
        """The task's one live state (a placeholder if new), its lock held; None if `wait` is False
        and the lock is taken. A state deleted while we waited for its lock is dead: start again."""
        while True:
            with self._lock:
                state = self._tasks.setdefault(task, _Task(task))
            if not state.lock.acquire(blocking=wait):
                yield None
                return
            if not state.deleted:
                break
            state.lock.release()
        try:
            yield state
        finally:
            state.lock.release()

    def _current_facts(self, state: _Task) -> FileFacts | None:
        """The facts of the task's stored file now (described if new to us); None if there is none."""
        stored = self.store.stat(state.name)
        if stored is None:
            return None
        if state.file is not None and state.file.stored.stamp == stored.stamp:
            return state.file
        data, stored = self.store.read(state.name)
        return self.describe(data, stored)

    def _sync(self, task: str, *, wait: bool = False) -> None:
        """Re-read one task's file if it changed; unregister it if it is gone."""
        # The poller skips a task whose lock is held (a load or an upload); the next poll catches up.
        with self._locked_state(task, wait=wait) as state:
            if state is None:
                return
            try:
                stored = self.store.stat(task)
                if stored is None:
                    self._unregister(state)
                    return
                if state.file is not None and state.file.stored.stamp == stored.stamp:
                    return
                data, stored = self.store.read(task)
                facts = self.describe(data, stored)
                if state.memory is None:
                    with self._lock:
                        state.file = facts
                else:
                    self._reload(state, data, facts)
            except TaskNotFound:
                self._unregister(state)

    def _reload(self, state: _Task, data: bytes, facts: FileFacts) -> None:
        """A resident task's file changed in the store: swap in the new version only if it is valid."""
        started = time.perf_counter()
        try:
            memory = load_memory(data, self.identity)
        except MemoryInvalid as err:
            self.metrics.memory_loads.labels("store", "invalid").inc()
            log.warning("task %s: new file rejected, version %s keeps serving: %s",
                        state.name, state.memory.version[:12] if state.memory else "-", err)  # fmt: skip
            with self._lock:
                state.file = FileFacts(facts.stored, facts.version, facts.spec, str(err))
            return
        self._install(state, memory, facts, time.perf_counter() - started, source="store")
        log.info("task %s: reloaded from the store, version %s", state.name, memory.version[:12])

    def _load(self, state: _Task) -> TaskMemory:
        """Read, validate and install a cold task (its lock held)."""
        stored = self.store.stat(state.name)
        if state.file is not None and state.file.error and stored == state.file.stored:
            raise TaskUnavailable(
                f"task {state.name!r}: its stored memory file is invalid: {state.file.error}"
            )
        started = time.perf_counter()
        data, stored = self.store.read(state.name)
        try:
            memory = load_memory(data, self.identity)
        except MemoryInvalid as err:
            self.metrics.memory_loads.labels("store", "invalid").inc()
            with self._lock:
                state.file = FileFacts(stored, hashlib.sha256(data).hexdigest(), None, str(err))
            raise TaskUnavailable(f"task {state.name!r}: its stored memory file is invalid: {err}") from err
        facts = FileFacts(stored, memory.version, memory.spec)
        self._install(state, memory, facts, time.perf_counter() - started, source="store")
        return memory

    def _install(
        self, state: _Task, memory: TaskMemory, facts: FileFacts, seconds: float, source: str
    ) -> None:
        nbytes = memory_nbytes(memory)
        with self._lock:
            # Only into the live state (its lock held): never resurrect a deleted one beside it.
            assert self._tasks.get(state.name) is state, f"stale state of task {state.name}"
            if state.memory is not None:
                self._loaded_bytes -= state.memory_bytes
            state.memory, state.memory_bytes, state.file = memory, nbytes, facts
            state.load_seconds = seconds
            self._loaded_bytes += nbytes
            self._lru[state.name] = None
            self._lru.move_to_end(state.name)
            self._evict_over_capacity(keep=state.name)
        self.metrics.memory_loads.labels(source, "ok").inc()
        self.metrics.memory_load_seconds.observe(seconds)
        self._update_gauges()
        self._notify(state.name, memory)

    def _notify(self, task: str, memory: TaskMemory | None) -> None:
        for listener in self._listeners:
            try:
                listener(task, memory)
            except Exception:  # a listener is an observer: it never breaks a load or a delete
                log.exception("registry listener failed for task %s", task)

    def _evict_over_capacity(self, keep: str) -> None:
        """Drop least recently used, unpinned memories until both capacities hold (`_lock` held)."""
        for name in list(self._lru):
            if len(self._lru) <= self.max_loaded and self._loaded_bytes <= self.max_loaded_bytes:
                return
            if name == keep or name in self._pinned:
                continue
            self._drop_memory(self._tasks[name])
            self.metrics.memory_evictions.inc()
            log.debug("task %s: evicted (LRU)", name)
        if len(self._lru) > self.max_loaded or self._loaded_bytes > self.max_loaded_bytes:
            log.warning(
                "memory capacity exceeded by pinned or in-use tasks: %d memories, %d bytes resident",
                len(self._lru),
                self._loaded_bytes,
            )

    def _drop_memory(self, state: _Task) -> None:
        if state.memory is not None:
            self._loaded_bytes -= state.memory_bytes
        state.memory, state.memory_bytes = None, 0
        self._lru.pop(state.name, None)

    def _unregister(self, state: _Task) -> None:
        with self._lock:
            self._drop_memory(state)
            state.deleted = True
            if self._tasks.get(state.name) is state:
                del self._tasks[state.name]
        self._update_gauges()
        self._notify(state.name, None)

    def _update_gauges(self) -> None:
        with self._lock:
            registered = sum(1 for s in self._tasks.values() if s.file is not None)
            loaded, nbytes = len(self._lru), self._loaded_bytes
        self.metrics.tasks_registered.set(registered)
        self.metrics.memories_loaded.set(loaded)
        self.metrics.memory_bytes.set(nbytes)

    def describe(self, data: bytes, stored: StoredFile) -> FileFacts:
        """Hash and header-level checks of a stored file (tensors are only read when it is loaded)."""
        version = hashlib.sha256(data).hexdigest()
        try:
            header = read_header(data)
            spec = parse_spec(header.get("__metadata__"))
            check_backbone(spec, self.identity)
            check_tensor_entries(header, spec)
        except MemoryInvalid as err:
            return FileFacts(stored, version, None, str(err))
        return FileFacts(stored, version, spec)

    def _info(self, state: _Task) -> TaskInfo:
        facts, memory = state.file, state.memory
        spec = memory.spec if memory is not None else (facts.spec if facts else None)
        status: TaskStatus = "loaded" if memory else ("invalid" if facts and facts.error else "on_disk")
        return TaskInfo(
            name=state.name,
            status=status,
            version=facts.version if facts else None,
            loaded_version=memory.version if memory else None,
            task_type=spec.task_type if spec else None,
            labels=spec.labels if spec and spec.task_type == "classification" else (),
            text_pairs=spec.text_pairs if spec else None,
            max_length=spec.max_length if spec else None,
            file_bytes=facts.stored.size if facts else None,
            memory_bytes=state.memory_bytes,
            pinned=state.name in self._pinned,
            load_seconds=state.load_seconds,
            error=facts.error if facts else None,
            requests=dict(state.requests),
            spec=spec,
        )


def check_replace(task: str, current: str | None, replace: bool, if_match: str | None) -> None:
    """Refuse to overwrite silently: an existing task needs replace=True or a matching If-Match."""
    if if_match is not None:
        if current is None:
            raise MemoryConflict(f"task {task!r} does not exist, so If-Match {if_match!r} cannot match")
        if if_match != "*" and if_match != current:
            raise MemoryConflict(
                f"task {task!r} is at version {current}, not {if_match} (If-Match): it changed meanwhile"
            )
        return
    if current is not None and not replace:
        raise MemoryConflict(
            f"task {task!r} already exists (version {current}); "
            "replace it with ?replace=true or If-Match: <current version>"
        )

"""Task name -> task memory: discover files in the store, load lazily, swap atomically, evict by LRU.

The registry coordinates; each job has its module: the records and how they are reported
(records.py), the LRU (lru.py), building memories and the cold-load threads (loading.py), store
sync and polling (sync.py), handing freed memory back to the OS (memtrim.py).

Concurrency model:
* `_lock` guards the index (`_tasks`), the LRU and the records' fields; it is held only for short
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

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from app.errors import StoreConflict, TaskNotFound, TaskUnavailable
from app.metrics import Metrics
from app.registry.guard import GuardedStore
from app.registry.loading import ColdLoads, FileRefused, Loaded, MemoryLoader
from app.registry.lru import LRUCache
from app.registry.memtrim import release_freed_memory
from app.registry.names import validate_task_name
from app.registry.records import (
    FileFacts,
    PutResult,
    TaskInfo,
    TaskRecord,
    check_replace,
    memory_nbytes,
    task_info,
)
from app.registry.store import MemoryStore, StoredFile
from app.registry.sync import StorePoller, refresh_when_reachable, stale_tasks
from app.settings import Settings, setting_default
from app.spartan.memfile import BackboneIdentity
from app.spartan.memory import TaskMemory

log = logging.getLogger(__name__)

# Told (task, memory) when a memory is installed, (task, None) when the task is unregistered.
MemoryListener = Callable[[str, TaskMemory | None], None]


@dataclass(frozen=True)
class RegistryConfig:
    """The registry's knobs. Built from Settings (`from_settings`); its defaults are the Settings'."""

    max_loaded: int = setting_default("max_loaded_memories")  # LRU capacity, count (pinned included)
    max_loaded_bytes: int = setting_default("max_loaded_bytes")  # LRU capacity, resident bytes
    pinned: tuple[str, ...] = ()  # loaded at start, never evicted
    cold_load_threads: int = setting_default("cold_load_threads")

    @classmethod
    def from_settings(cls, settings: Settings) -> RegistryConfig:
        return cls(
            max_loaded=settings.max_loaded_memories,
            max_loaded_bytes=settings.max_loaded_bytes,
            pinned=tuple(settings.pinned_tasks),
            cold_load_threads=settings.cold_load_threads,
        )


class Registry:
    """The registry of task memories over one `MemoryStore`, for one served backbone."""

    def __init__(
        self,
        store: MemoryStore,
        identity: BackboneIdentity,
        config: RegistryConfig | None = None,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        config = config or RegistryConfig()
        self.store = store
        self.identity = identity
        self.metrics = metrics or Metrics()
        self._tasks: dict[str, TaskRecord] = {}
        self._lru = LRUCache[str](
            config.max_loaded,
            config.max_loaded_bytes,
            self._evicted,
            pinned=(validate_task_name(name) for name in config.pinned),
        )
        self._lock = threading.RLock()
        self._loader = MemoryLoader(store, identity, self.metrics)
        self._cold_loads = ColdLoads(self.resolve, config.cold_load_threads)
        self._poller = StorePoller(self.refresh, self.metrics)
        self._listeners: list[MemoryListener] = []
        if isinstance(store, GuardedStore):
            store.bind_metrics(self.metrics)

    @property
    def max_loaded(self) -> int:
        return self._lru.max_entries

    @property
    def max_loaded_bytes(self) -> int:
        return self._lru.max_bytes

    @property
    def store_up(self) -> bool:
        """False while the store does not answer (a call failed or timed out, until one answers)."""
        return self.store.up if isinstance(self.store, GuardedStore) else True

    def add_listener(self, listener: MemoryListener) -> None:
        """Called with (task, memory) after a memory is installed (first load, reload after eviction,
        upload, changed file) and with (task, None) after the task is unregistered (deleted, file gone).
        It runs in the thread that made the change, with the task's lock held: keep it quick."""
        self._listeners.append(listener)

    def close(self) -> None:
        """Stop polling and the cold-load threads (loads under way finish first)."""
        self.stop_polling()
        self._cold_loads.close()

    # ------------------------------------------------------------------------------------ serving

    def resolve_loaded(self, task: str) -> TaskMemory | None:
        """The resident memory of `task`, without any I/O; None if it must be loaded first."""
        with self._lock:
            state = self._tasks.get(task)
            if state is None or state.memory is None:
                return None
            self._lru.touch(task)
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

    def resolve_in_background(self, task: str) -> concurrent.futures.Future[TaskMemory]:
        """`resolve(task)` on the cold-load threads. Callers for a task already loading share its
        future; a slow load of one task leaves the other threads to other tasks."""
        return self._cold_loads.submit(task)

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
        memory, seconds = self._loader.upload(data)
        with self._locked_state(task) as state:
            assert state is not None
            current = self._current_facts(state)
            if current is not None and current.version == memory.version and current.error is None:
                # The same bytes again (a client's or the proxy's retry): nothing to write; succeed.
                if state.memory is None or state.memory.version != memory.version:
                    self._install(state, Loaded(memory, current, seconds), source="upload")
                with self._lock:
                    return PutResult(created=False, info=self._info(state))
            check_replace(task, current.version if current else None, replace, if_match)
            try:
                stored = self.store.write(task, data, expected=current.stored.stamp if current else None)
            except StoreConflict:
                self.metrics.store_conflicts.inc()
                raise
            facts = FileFacts(stored, memory.version, memory.spec)
            self._install(state, Loaded(memory, facts, seconds), source="upload")
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
            self._lru.pin(validate_task_name(task))
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
        return self._lru.nbytes

    def describe(self, data: bytes, stored: StoredFile) -> FileFacts:
        """Hash and header-level checks of a stored file (tensors are only read when it is loaded)."""
        return self._loader.describe(data, stored)

    # ------------------------------------------------------------------------------------ store sync

    def refresh(self) -> None:
        """Bring the index in line with the store: new, changed and removed files.

        Cheap when nothing changed (one metadata scan). A changed file of a resident task is loaded
        and swapped in at once if valid; if not, the old version keeps serving and the error is shown.
        """
        listing = self.store.scan()
        with self._lock:
            known = {name: s.file.stored.stamp if s.file else None for name, s in self._tasks.items()}
        for name in stale_tasks(listing, known):
            try:
                self._sync(name)
            except Exception:  # one unreadable file must not stop the others from syncing
                log.exception("task %s: cannot sync with the store", name)
        self._update_gauges()

    def refresh_when_reachable(self, timeout_s: float, retry_every_s: float = 1.0) -> None:
        """The first refresh at start: an object store that is still starting (compose, a new cluster)
        gets `timeout_s` to answer before the service gives up (StoreUnavailable)."""
        refresh_when_reachable(self.store, self.refresh, timeout_s, retry_every_s)

    def start_polling(self, interval_s: float) -> None:
        self._poller.start(interval_s)

    def stop_polling(self) -> None:
        self._poller.stop()

    def load_pinned(self) -> None:
        for task in sorted(self._lru.pinned):
            try:
                self.resolve(task)
            except (TaskNotFound, TaskUnavailable) as err:
                log.warning("pinned task %s is not served: %s", task, err)

    # ------------------------------------------------------------------------------------ internals

    def _registered(self, task: str) -> TaskRecord:
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
    def _locked_state(self, task: str, *, wait: bool = True) -> Iterator[TaskRecord | None]:
        """The task's one live state (a placeholder if new), its lock held; None if `wait` is False
        and the lock is taken. A state deleted while we waited for its lock is dead: start again."""
        while True:
            with self._lock:
                state = self._tasks.setdefault(task, TaskRecord(task))
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

    def _current_facts(self, state: TaskRecord) -> FileFacts | None:
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

    def _reload(self, state: TaskRecord, data: bytes, facts: FileFacts) -> None:
        """A resident task's file changed in the store: swap in the new version only if it is valid."""
        try:
            loaded = self._loader.changed(data, facts)
        except FileRefused as refused:
            log.warning("task %s: new file rejected, version %s keeps serving: %s",
                        state.name, state.memory.version[:12] if state.memory else "-", refused)  # fmt: skip
            with self._lock:
                state.file = refused.facts
            return
        self._install(state, loaded, source="store")
        log.info("task %s: reloaded from the store, version %s", state.name, loaded.memory.version[:12])

    def _load(self, state: TaskRecord) -> TaskMemory:
        """Read, validate and install a cold task (its lock held)."""
        stored = self.store.stat(state.name)
        if state.file is not None and state.file.error and stored == state.file.stored:
            raise TaskUnavailable(
                f"task {state.name!r}: its stored memory file is invalid: {state.file.error}"
            )
        try:
            loaded = self._loader.cold(state.name)
        except FileRefused as refused:
            with self._lock:
                state.file = refused.facts
            raise TaskUnavailable(
                f"task {state.name!r}: its stored memory file is invalid: {refused}"
            ) from refused
        self._install(state, loaded, source="store")
        return loaded.memory

    def _install(self, state: TaskRecord, loaded: Loaded, source: str) -> None:
        memory, nbytes = loaded.memory, memory_nbytes(loaded.memory)
        with self._lock:
            # Only into the live state (its lock held): never resurrect a deleted one beside it.
            assert self._tasks.get(state.name) is state, f"stale state of task {state.name}"
            state.memory, state.memory_bytes, state.file = memory, nbytes, loaded.facts
            state.load_seconds = loaded.seconds
            self._lru.put(state.name, nbytes)  # may evict others (`_evicted`), never this one
            if self._lru.over_capacity:
                log.warning(
                    "memory capacity exceeded by pinned or in-use tasks: %d memories, %d bytes resident",
                    len(self._lru),
                    self._lru.nbytes,
                )
        self.metrics.memory_loads.labels(source, "ok").inc()
        self.metrics.memory_load_seconds.observe(loaded.seconds)
        self._update_gauges()
        self._notify(state.name, memory)

    def _evicted(self, task: str) -> None:
        """The LRU let `task` go (`_lock` held): forget its memory (requests holding it keep it)."""
        state = self._tasks[task]
        state.memory, state.memory_bytes = None, 0
        self.metrics.memory_evictions.inc()
        log.debug("task %s: evicted (LRU)", task)

    def _notify(self, task: str, memory: TaskMemory | None) -> None:
        for listener in self._listeners:
            try:
                listener(task, memory)
            except Exception:  # a listener is an observer: it never breaks a load or a delete
                log.exception("registry listener failed for task %s", task)

    def _unregister(self, state: TaskRecord) -> None:
        with self._lock:
            self._lru.remove(state.name)
            state.memory, state.memory_bytes = None, 0
            state.deleted = True
            if self._tasks.get(state.name) is state:
                del self._tasks[state.name]
        self._update_gauges()
        self._notify(state.name, None)

    def _update_gauges(self) -> None:
        with self._lock:
            registered = sum(1 for s in self._tasks.values() if s.file is not None)
            loaded, nbytes = len(self._lru), self._lru.nbytes
        self.metrics.tasks_registered.set(registered)
        self.metrics.memories_loaded.set(loaded)
        self.metrics.memory_bytes.set(nbytes)

    def _info(self, state: TaskRecord) -> TaskInfo:
        return task_info(state, pinned=self._lru.is_pinned(state.name))

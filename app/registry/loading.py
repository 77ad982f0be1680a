"""Loading task memories: bytes (an upload, or a file in the store) -> a memory validated completely,
and the threads cold loads run on.

`MemoryLoader` builds and times memories and counts the files it refuses; it never touches the
registry's records (the registry installs what it returns). `ColdLoads` runs cold loads on a few
threads of their own, one load per task at a time.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.errors import MemoryInvalid
from app.metrics import Metrics
from app.registry.records import FileFacts, describe_file
from app.registry.store import MemoryStore, StoredFile
from app.spartan.memfile import BackboneIdentity, load_memory
from app.spartan.memory import TaskMemory
from app.threads import started_pool


@dataclass(frozen=True)
class Loaded:
    """A memory ready to install, the facts of the file it was built from, and how long that took."""

    memory: TaskMemory
    facts: FileFacts
    seconds: float


class FileRefused(Exception):
    """A stored file that cannot serve: `facts` says which version it is and why (`facts.error`)."""

    def __init__(self, facts: FileFacts) -> None:
        super().__init__(facts.error)
        self.facts = facts


class MemoryLoader:
    """Builds validated memories for one backbone from an upload or from the store."""

    def __init__(self, store: MemoryStore, identity: BackboneIdentity, metrics: Metrics) -> None:
        self.store = store
        self.identity = identity
        self.metrics = metrics

    def describe(self, data: bytes, stored: StoredFile) -> FileFacts:
        return describe_file(data, stored, self.identity)

    def upload(self, data: bytes) -> tuple[TaskMemory, float]:
        """The memory an upload holds and the seconds its validation took; MemoryInvalid if bad."""
        started = time.perf_counter()
        try:
            memory = load_memory(data, self.identity)
        except MemoryInvalid:
            self.metrics.memory_loads.labels("upload", "invalid").inc()
            raise
        return memory, time.perf_counter() - started

    def cold(self, task: str) -> Loaded:
        """Read the task's file and build its memory (the seconds include the read); FileRefused if
        the file is bad, with its hash as its version."""
        started = time.perf_counter()
        data, stored = self.store.read(task)
        try:
            memory = load_memory(data, self.identity)
        except MemoryInvalid as err:
            self.metrics.memory_loads.labels("store", "invalid").inc()
            version = hashlib.sha256(data).hexdigest()
            raise FileRefused(FileFacts(stored, version, None, str(err))) from err
        return Loaded(memory, FileFacts(stored, memory.version, memory.spec), time.perf_counter() - started)

    def changed(self, data: bytes, facts: FileFacts) -> Loaded:
        """Build the memory of a changed file already read and described (`facts`); FileRefused if it
        is bad, with the described facts and the reason."""
        started = time.perf_counter()
        try:
            memory = load_memory(data, self.identity)
        except MemoryInvalid as err:
            self.metrics.memory_loads.labels("store", "invalid").inc()
            raise FileRefused(FileFacts(facts.stored, facts.version, facts.spec, str(err))) from err
        return Loaded(memory, facts, time.perf_counter() - started)


class ColdLoads:
    """Runs `resolve(task)` for cold tasks on `threads` threads of their own, off the caller's.

    A slow load (a hung read, a large file) holds one thread, so the cold loads of other tasks go on
    beside it. Callers asking for a task whose load is already under way get that load's future:
    however many requests wait for one slow task, it takes one thread, not all of them.

    Each thread that loads keeps its own malloc arena with the loads' freed buffers: one thread kept
    RSS within ~1.1x of the resident memories, two within 1.23x (400 tasks). The threads are started
    together on the first cold load (a pool that grows later looks like a thread leak).
    """

    def __init__(self, resolve: Callable[[str], TaskMemory], threads: int) -> None:
        self._resolve = resolve
        self._threads = threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loading: dict[str, concurrent.futures.Future[TaskMemory]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, task: str) -> concurrent.futures.Future[TaskMemory]:
        """The future of `task`'s load: the one under way, or a new one."""
        with self._lock:
            if self._closed:
                raise RuntimeError("cold loads are closed")
            future = self._loading.get(task)
            if future is not None:
                return future
            if self._pool is None:
                self._pool = started_pool(self._threads, "spartan-loader")
            future = self._pool.submit(self._resolve, task)
            self._loading[task] = future
        # Outside the lock: a load already done runs the callback here, and it takes the lock.
        future.add_done_callback(functools.partial(self._forget, task))
        return future

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._loading)

    def close(self) -> None:
        """Cancel the loads not started, wait for those running (each bounded by the store timeout)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _forget(self, task: str, future: concurrent.futures.Future[TaskMemory]) -> None:
        with self._lock:
            if self._loading.get(task) is future:
                del self._loading[task]

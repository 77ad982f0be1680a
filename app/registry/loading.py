"""Loading task memories: bytes (an upload, or a file in the store) -> a memory validated completely.

`MemoryLoader` builds and times memories and counts the files it refuses; it never touches the
registry's records (the registry installs what it returns).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from app.errors import MemoryInvalid
from app.metrics import Metrics
from app.registry.records import FileFacts, describe_file
from app.registry.store import MemoryStore, StoredFile
from app.spartan.memfile import BackboneIdentity, load_memory
from app.spartan.memory import TaskMemory


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

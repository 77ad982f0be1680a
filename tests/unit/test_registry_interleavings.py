"""Concurrent uploads, deletes and loads of one task, in random interleavings (hypothesis stateful
testing with real threads): whatever the order, the registry keeps one record per task name, its
byte accounting equals the sum of the resident memories, and it agrees with the store once quiet.

Each step releases a random burst of operations at once (a barrier), so their store calls and lock
waits interleave; the invariants are checked after every burst.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from test_registry import IDENTITY, sha, tiny_memory

from app.errors import MemoryConflict, TaskNotFound
from app.metrics import Metrics
from app.registry.registry import Registry
from app.registry.store import LocalFolderStore

TASKS = ("alpha",)
FILES = (tiny_memory(1), tiny_memory(2), tiny_memory(3))
OPERATIONS = st.tuples(
    st.sampled_from(("put", "replace", "delete", "resolve", "refresh")),
    st.sampled_from(TASKS),
    st.sampled_from(range(len(FILES))),
)
# What a racing client may rightly be told: the task was deleted first, or changed under its check.
EXPECTED_REFUSALS = (TaskNotFound, MemoryConflict)


class YieldingStore(LocalFolderStore):
    """A local store that hands the CPU to another thread around every call, so that the threads of a
    burst interleave at every store call (the registry's race windows) instead of running in turn."""

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if name not in ("scan", "stat", "read", "write", "delete") or not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            os.sched_yield()  # releases the GIL: whichever thread waits runs first
            try:
                return attribute(*args, **kwargs)
            finally:
                os.sched_yield()

        return call


class ConcurrentWrites(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="spartan-interleave-"))
        self.registry = Registry(YieldingStore(self.folder), IDENTITY, metrics=Metrics())

    def operation(self, kind: str, task: str, file: int) -> Callable[[], object]:
        registry = self.registry
        return {
            "put": lambda: registry.put(task, FILES[file]),
            "replace": lambda: registry.put(task, FILES[file], replace=True),
            "delete": lambda: registry.delete(task),
            "resolve": lambda: registry.resolve(task),
            "refresh": registry.refresh,
        }[kind]

    @rule(burst=st.lists(OPERATIONS, min_size=3, max_size=6))
    def run_at_once(self, burst: list[tuple[str, str, int]]) -> None:
        start = threading.Barrier(len(burst))
        unexpected: list[BaseException] = []

        def run(action: Callable[[], object]) -> None:
            start.wait()
            try:
                action()
            except EXPECTED_REFUSALS:
                pass
            except BaseException as err:  # reported by the assertion below
                unexpected.append(err)

        threads = [threading.Thread(target=run, args=(self.operation(*op),)) for op in burst]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not unexpected, unexpected

    @invariant()
    def accounting_equals_the_resident_memories(self) -> None:
        registry = self.registry
        with registry._lock:
            states = dict(registry._tasks)
            resident = {name for name, state in states.items() if state.memory is not None}
            assert all(state.name == name for name, state in states.items())
            assert registry.loaded_bytes == sum(state.memory_bytes for state in states.values())
            assert set(registry._lru) == resident

    @invariant()
    def once_quiet_the_registry_agrees_with_the_store(self) -> None:
        self.registry.refresh()
        on_disk = {path.stem: sha(path.read_bytes()) for path in self.folder.glob("*.safetensors")}
        listed = {info.name: info.version for info in self.registry.list()}
        assert listed == on_disk
        for task, version in on_disk.items():
            assert self.registry.resolve(task).version == version

    def teardown(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


ConcurrentWrites.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_concurrent_writes_keep_one_record_and_exact_accounting = ConcurrentWrites.TestCase

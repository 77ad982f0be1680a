"""The cold-load threads alone: one load per task at a time, other tasks beside a stuck one, a failed
load not remembered, and a clean close. The loads are fakes that block on events: no sleeps."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from app.registry.loading import ColdLoads
from app.spartan.memory import MemorySpec, TaskMemory

WAIT_S = 10.0  # generous: only reached if the behaviour under test is broken


class Loads:
    """A fake `resolve`: counts calls per task; tasks in `stuck` block until `release` is set."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.stuck: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.failing: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, task: str) -> TaskMemory:
        with self._lock:
            self.calls[task] += 1
        if task in self.stuck:
            self.entered.set()
            assert self.release.wait(WAIT_S)
        if task in self.failing:
            raise LookupError(f"no {task}")
        memory = TaskMemory(MemorySpec(num_layers=1, hidden_size=4, num_parents=2, num_children=1, top_k=1))
        memory.version = task
        return memory


@pytest.fixture
def loads() -> Loads:
    return Loads()


def test_requests_for_a_task_already_loading_share_its_load(loads: Loads) -> None:
    cold = ColdLoads(loads, threads=2)
    loads.stuck.add("alpha")
    try:
        futures = [cold.submit("alpha") for _ in range(5)]
        assert loads.entered.wait(WAIT_S)
        assert len({id(future) for future in futures}) == 1
        loads.release.set()
        assert futures[0].result(WAIT_S).version == "alpha"
        assert loads.calls["alpha"] == 1
    finally:
        loads.release.set()
        cold.close()


def test_a_stuck_load_does_not_hold_up_other_tasks(loads: Loads) -> None:
    cold = ColdLoads(loads, threads=2)
    loads.stuck.add("alpha")
    try:
        stuck = [cold.submit("alpha") for _ in range(3)]  # more requests than threads
        assert loads.entered.wait(WAIT_S)
        assert cold.submit("beta").result(WAIT_S).version == "beta"
        assert cold.submit("gamma").result(WAIT_S).version == "gamma"
        assert not any(future.done() for future in stuck)
    finally:
        loads.release.set()
        cold.close()


def test_a_finished_load_is_forgotten_so_the_next_request_loads_again(loads: Loads) -> None:
    cold = ColdLoads(loads, threads=1)
    loads.failing.add("alpha")
    try:
        with pytest.raises(LookupError, match="no alpha"):
            cold.submit("alpha").result(WAIT_S)
        loads.failing.clear()
        assert cold.submit("alpha").result(WAIT_S).version == "alpha"  # the failure was not cached
        assert loads.calls["alpha"] == 2
        assert cold.in_flight == 0
    finally:
        cold.close()


def test_the_threads_start_together_on_the_first_load_and_close_ends_them(loads: Loads) -> None:
    def loader_threads() -> set[threading.Thread]:
        return {thread for thread in threading.enumerate() if thread.name.startswith("spartan-loader")}

    others = loader_threads()  # of registries other tests left to the collector
    cold = ColdLoads(loads, threads=3)
    assert loader_threads() - others == set()  # none until a cold load is asked for
    cold.submit("alpha").result(WAIT_S)
    ours = loader_threads() - others
    assert len(ours) == 3
    cold.close()
    assert not any(thread.is_alive() for thread in ours)
    with pytest.raises(RuntimeError, match="closed"):
        cold.submit("alpha")

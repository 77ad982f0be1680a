"""A store that stops answering: every call is given up after the store timeout, a down store is not
waited on again (one probe at a time), resident tasks keep serving, and it comes back by itself.

The hang is real (a read blocked on an event, as a frozen server or a stuck mount blocks it); no
sleeps: the test waits on events, and each bound is the timeout plus generous slack for a busy CI.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_registry import IDENTITY, tiny_memory, write

from app.errors import StoreUnavailable
from app.metrics import Metrics
from app.registry.guard import GuardedStore
from app.registry.registry import Registry
from app.registry.store import LocalFolderStore

TIMEOUT_S = 0.3
SLACK_S = 2.0  # a loaded 2-core CI machine; the failure this guards against took 40 to 80 s


class HangingStore(LocalFolderStore):
    """Calls touching a task in `hung` (or any call, with "*") block until `release` is set."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.hung: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def _maybe_hang(self, task: str) -> None:
        self.calls += 1
        if task in self.hung or "*" in self.hung:
            self.entered.set()
            self.release.wait(timeout=60)

    def scan(self) -> dict[str, Any]:
        self._maybe_hang("")
        return super().scan()

    def stat(self, task: str) -> Any:
        self._maybe_hang(task)
        return super().stat(task)

    def read(self, task: str) -> Any:
        self._maybe_hang(task)
        return super().read(task)


@pytest.fixture
def hanging(tmp_path: Path):
    folder = tmp_path / "memories"
    for number, task in enumerate(("alpha", "beta", "gamma")):
        write(folder, task, tiny_memory(number))
    store = HangingStore(folder)
    yield store
    store.release.set()


def registry_over(store: HangingStore, probe_every_s: float = 60.0) -> Registry:
    registry = Registry(
        GuardedStore(store, TIMEOUT_S, probe_every_s=probe_every_s), IDENTITY, metrics=Metrics()
    )
    registry.refresh()
    return registry


def gauge(registry: Registry, name: str) -> float:
    return registry.metrics.registry.get_sample_value(name) or 0.0


def timed(action: Any) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        action()
    except BaseException as err:
        return time.monotonic() - started, err
    return time.monotonic() - started, None


def test_a_hung_store_is_given_up_on_within_the_timeout_and_reported_down(hanging: HangingStore) -> None:
    registry = registry_over(hanging)
    registry.resolve("alpha")
    hanging.hung.add("*")
    seconds, error = timed(lambda: registry.resolve("beta"))  # cold: needs the store
    assert isinstance(error, StoreUnavailable)
    assert f"did not answer a stat within {TIMEOUT_S:g} s" in str(error)
    assert TIMEOUT_S <= seconds < TIMEOUT_S + SLACK_S
    assert registry.store_up is False
    assert gauge(registry, "spartan_store_up") == 0
    assert gauge(registry, "spartan_store_call_timeouts_total") == 1
    assert registry.resolve("alpha").version  # the resident task still serves, store or not


def test_a_down_store_is_not_waited_on_again_and_comes_back_by_itself(hanging: HangingStore) -> None:
    registry = registry_over(hanging, probe_every_s=0.0)
    hanging.hung.add("*")
    assert isinstance(timed(lambda: registry.resolve("alpha"))[1], StoreUnavailable)  # now down
    hanging.entered.clear()
    probe = threading.Thread(target=lambda: timed(lambda: registry.resolve("beta")))
    probe.start()  # the one call allowed to try the down store: it hangs
    assert hanging.entered.wait(timeout=10)
    calls = hanging.calls
    for task in ("gamma", "unknown"):  # meanwhile every other call fails at once, untried
        seconds, error = timed(lambda task=task: registry.resolve(task))
        assert isinstance(error, StoreUnavailable)
        assert "was not tried" in str(error)
        assert seconds < TIMEOUT_S
    assert hanging.calls == calls
    probe.join()
    hanging.hung.clear()
    hanging.release.set()
    assert registry.resolve("gamma").version  # the next call is the probe: it answers, the store is up
    assert registry.store_up is True
    assert gauge(registry, "spartan_store_up") == 1


def test_an_unknown_task_on_a_hung_store_is_503_within_the_timeout_not_404_later(
    hanging: HangingStore,
) -> None:
    registry = registry_over(hanging)
    hanging.hung.add("*")
    seconds, error = timed(lambda: registry.resolve("delta"))
    assert isinstance(error, StoreUnavailable)
    assert seconds < TIMEOUT_S + SLACK_S
    hanging.hung.clear()
    hanging.release.set()


def test_one_hung_read_does_not_hold_up_the_loads_of_other_tasks(hanging: HangingStore) -> None:
    registry = registry_over(hanging)
    hanging.hung.add("alpha")  # one object hangs (a stuck range, a slow shard); the store answers
    stuck = threading.Thread(target=lambda: timed(lambda: registry.resolve("alpha")))
    stuck.start()
    assert hanging.entered.wait(timeout=10)
    seconds, error = timed(lambda: registry.resolve("beta"))  # while alpha's read still hangs
    assert error is None
    assert seconds < TIMEOUT_S
    stuck.join()


def test_a_store_down_at_start_is_waited_for_then_every_task_registers(hanging: HangingStore) -> None:
    class ComesUp(HangingStore):
        scans = 0

        def scan(self) -> dict[str, Any]:
            self.scans += 1
            if self.scans <= 3:
                raise StoreUnavailable("the memory store cannot be reached (ConnectionRefused)")
            return super().scan()

    store = ComesUp(hanging.root)
    registry = Registry(GuardedStore(store, TIMEOUT_S, probe_every_s=0.0), IDENTITY, metrics=Metrics())
    registry.refresh_when_reachable(timeout_s=30, retry_every_s=0.01)
    assert store.scans == 4
    assert [info.name for info in registry.list()] == ["alpha", "beta", "gamma"]
    assert registry.store_up is True


def test_a_store_that_never_answers_at_start_fails_the_start_with_the_reason(hanging: HangingStore) -> None:
    hanging.hung.add("*")
    registry = Registry(GuardedStore(hanging, TIMEOUT_S, probe_every_s=0.0), IDENTITY, metrics=Metrics())
    seconds, error = timed(lambda: registry.refresh_when_reachable(timeout_s=1.0, retry_every_s=0.01))
    assert isinstance(error, StoreUnavailable)
    assert "did not answer" in str(error)
    assert seconds < 1.0 + TIMEOUT_S + SLACK_S
    assert registry.list() == []  # nothing registered: no half-started service

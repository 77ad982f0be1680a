"""The predictor's own promises: a cold load that hangs costs a request no more than its deadline, and
holds up no other task's cold load."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_registry import IDENTITY, sha, tiny_memory, write

from app.engine.batcher import Batcher, BatchingConfig
from app.engine.inputs import InputLimits
from app.engine.predictor import Predictor
from app.engine.runner import PreparedRow, Row, RowOutput
from app.errors import RequestTimeout
from app.metrics import UNKNOWN_TASK, Metrics
from app.registry.loading import ColdLoads
from app.registry.registry import Registry, RegistryConfig
from app.registry.store import LocalFolderStore
from app.settings import Settings
from app.spartan.memory import TaskMemory


class HangingStore:
    """A resolver whose cold loads block until released (a store that stopped answering)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.loads = ColdLoads(self.resolve, threads=1)

    def resolve_loaded(self, task: str) -> TaskMemory | None:
        return None

    def resolve(self, task: str) -> TaskMemory:
        self.release.wait(30)
        raise LookupError("released")

    def resolve_in_background(self, task: str) -> concurrent.futures.Future[TaskMemory]:
        return self.loads.submit(task)

    def record_request(self, task: str, outcome: str) -> None:
        pass


class NoRunner:
    def prepare(self, rows):  # pragma: no cover - never reached
        raise AssertionError

    def run(self, rows):  # pragma: no cover - never reached
        raise AssertionError


def test_a_hung_cold_load_answers_within_the_request_deadline() -> None:
    config = replace(BatchingConfig.from_settings(Settings()), request_timeout_s=0.5, max_queue_work_s=0.1)
    metrics = Metrics()
    store = HangingStore()
    predictor = Predictor(store, Batcher(NoRunner(), config, metrics), metrics, InputLimits(64, 10_000))
    started = time.monotonic()
    try:
        with pytest.raises(RequestTimeout, match=r"did not load within 0\.5s"):
            asyncio.run(predictor.predict("cold", [("text", None)]))
        assert time.monotonic() - started < 2.0
        counted = {"task": UNKNOWN_TASK, "outcome": "timeout"}
        assert metrics.registry.get_sample_value("spartan_requests_total", counted) == 1.0
    finally:
        store.release.set()
        store.loads.close()


class StuckReads(LocalFolderStore):
    """A local store whose reads of the tasks in `stuck` block until `release` is set (one object
    that does not answer, the store otherwise fine)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.stuck: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.reads: Counter[str] = Counter()

    def read(self, task: str) -> Any:
        if task in self.stuck:
            self.reads[task] += 1
            self.entered.set()
            self.release.wait(timeout=30)
        return super().read(task)


class EveryRowSaysYes:
    """A runner that answers [0.25, 0.75] for every row (the tiny memories' labels are no, yes)."""

    def prepare(self, rows: Sequence[Row]) -> list[PreparedRow]:
        return [PreparedRow(row, len(row.text.split())) for row in rows]

    def run(self, rows: Sequence[PreparedRow]) -> list[RowOutput]:
        return [RowOutput([0.25, 0.75]) for _ in rows]


def test_a_cold_load_stuck_on_one_task_does_not_hold_up_another_tasks(tmp_path: Path) -> None:
    folder = tmp_path / "memories"
    alpha, beta_file = tiny_memory(1), tiny_memory(2)
    write(folder, "alpha", alpha)
    write(folder, "beta", beta_file)
    store = StuckReads(folder)
    metrics = Metrics()
    registry = Registry(store, IDENTITY, RegistryConfig(cold_load_threads=2), metrics=metrics)
    registry.refresh()  # registers both (reads their headers), loads neither
    store.stuck.add("alpha")
    config = replace(BatchingConfig.from_settings(Settings()), request_timeout_s=2.0, max_queue_work_s=0.5)
    batcher = Batcher(EveryRowSaysYes(), config, metrics)
    batcher.start()
    predictor = Predictor(registry, batcher, metrics, InputLimits(64, 10_000))
    text = [("text", None)]

    async def scenario() -> tuple[Any, list[BaseException | Any]]:
        # More requests for the stuck task than there are loader threads: they share one load.
        stuck = [asyncio.create_task(predictor.predict("alpha", text)) for _ in range(4)]
        assert await asyncio.to_thread(store.entered.wait, 10)
        beta = await predictor.predict("beta", text)  # RequestTimeout here if it queued behind alpha
        return beta, await asyncio.gather(*stuck, return_exceptions=True)

    try:
        beta, stuck = asyncio.run(scenario())
        assert beta.version == sha(beta_file)
        assert [p.label for p in beta.predictions] == ["yes"]
        assert all(isinstance(outcome, RequestTimeout) for outcome in stuck), stuck
        assert store.reads["alpha"] == 1  # one load for the four requests
        store.release.set()
        # The load went on past the requests' deadline and serves the next request.
        assert registry.resolve_in_background("alpha").result(timeout=10).version == sha(alpha)
        assert store.reads["alpha"] == 1
    finally:
        store.release.set()
        batcher.stop()
        registry.close()

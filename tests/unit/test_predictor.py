"""The predictor's own promises: a cold load that hangs costs a request no more than its deadline."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest

from app.engine.batcher import Batcher, BatchingConfig
from app.engine.inputs import InputLimits
from app.engine.predictor import Predictor
from app.errors import RequestTimeout
from app.metrics import UNKNOWN_TASK, Metrics
from app.settings import Settings
from app.spartan.memory import TaskMemory


class HangingStore:
    """A resolver whose cold loads block until released (a store that stopped answering)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def resolve_loaded(self, task: str) -> TaskMemory | None:
        return None

    def resolve(self, task: str) -> TaskMemory:
        self.release.wait(30)
        raise LookupError("released")

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
        predictor.close()

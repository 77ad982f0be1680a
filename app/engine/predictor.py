"""A prediction request, end to end: resolve the task's memory, check the inputs, batch, interpret.

The task's memory is resolved once, here, before the request is queued; the version that answers is
the version of that memory object, whatever is uploaded meanwhile. An unknown task is TaskNotFound:
there is never a fallback to the bare backbone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from app.engine.batcher import Batcher, RequestResult
from app.engine.inputs import InputLimits, TextInput, check_fits_task, check_limits
from app.engine.runner import ParentCounts
from app.errors import RequestTimeout, outcome_of
from app.metrics import UNKNOWN_TASK, Metrics
from app.spartan.memory import MemorySpec, Pooling, TaskMemory, TaskType


class MemoryResolver(Protocol):
    """The registry, as the predictor sees it."""

    def resolve_loaded(self, task: str) -> TaskMemory | None: ...

    def resolve_in_background(self, task: str) -> concurrent.futures.Future[TaskMemory]: ...

    def record_request(self, task: str, outcome: str) -> None: ...


@dataclass(frozen=True)
class Prediction:
    label: str | None  # classification: the most probable label
    score: float | None  # its probability
    scores: dict[str, float] | None  # every label's probability, when asked for
    value: float | None  # regression: the predicted value
    routing: list[ParentCounts] | None  # per layer (parent, tokens), when asked for


@dataclass(frozen=True)
class PredictionResult:
    task: str
    version: str  # sha256 of the memory file that produced these predictions
    task_type: TaskType
    pooling: Pooling
    predictions: list[Prediction]


def interpret(spec: MemorySpec, result: RequestResult, *, all_scores: bool) -> list[Prediction]:
    """Each row's numbers (computed in the worker: probabilities, or the value) -> labels and scores."""
    predictions = []
    for row in result.rows:
        if spec.task_type == "regression":
            predictions.append(Prediction(None, None, None, row.outputs[0], row.routing))
            continue
        probabilities = row.outputs
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        scores = dict(zip(spec.labels, probabilities, strict=True)) if all_scores else None
        predictions.append(Prediction(spec.labels[best], probabilities[best], scores, None, row.routing))
    return predictions


class Predictor:
    """Serves prediction requests over the registry and the batcher, and accounts for them."""

    def __init__(
        self, resolver: MemoryResolver, batcher: Batcher, metrics: Metrics, limits: InputLimits
    ) -> None:
        self.resolver = resolver
        self.batcher = batcher
        self.metrics = metrics
        self.limits = limits

    async def predict(
        self,
        task: str,
        inputs: Sequence[TextInput],
        *,
        all_scores: bool = False,
        routing: bool = False,
    ) -> PredictionResult:
        started = time.perf_counter()
        memory: TaskMemory | None = None
        outcome = "ok"
        try:
            check_limits(inputs, self.limits)
            memory = await self._memory(task, self.batcher.config.request_timeout_s)
            check_fits_task(task, memory.spec, inputs)
            result = await self.batcher.submit(task, memory, inputs, record_routing=routing)
        except BaseException as err:
            outcome = outcome_of(err)
            raise
        finally:
            self._account(task, memory, outcome, time.perf_counter() - started)
        label = self.metrics.task_label(task)
        self.metrics.queue_wait.labels(label).observe(result.queue_wait_s)
        self.metrics.inference_duration.labels(label).observe(result.inference_s)
        assert memory is not None  # resolved before queueing: the memory that answered
        spec = memory.spec
        return PredictionResult(
            task=task,
            version=memory.version,
            task_type=spec.task_type,
            pooling=spec.pooling,
            predictions=interpret(spec, result, all_scores=all_scores),
        )

    async def _memory(self, task: str, timeout_s: float) -> TaskMemory:
        memory = self.resolver.resolve_loaded(task)
        if memory is not None:
            return memory
        # A cold task is read and validated from the store: off the event loop, and within the
        # request's deadline (a slow store must not hold the request past it; the load itself goes on
        # and serves the next request). The load is shared with every request for the task: shielded,
        # so that this request's timeout never cancels it for the others.
        load = asyncio.wrap_future(self.resolver.resolve_in_background(task))
        try:
            return await asyncio.wait_for(asyncio.shield(load), timeout_s)
        except TimeoutError:
            raise RequestTimeout(
                f"task {task!r}: its memory did not load within {timeout_s:g}s (the store is slow); "
                "retry later"
            ) from None

    def _account(self, task: str, memory: TaskMemory | None, outcome: str, seconds: float) -> None:
        # Requests for tasks that never resolved share one label: clients cannot grow the label set.
        label = self.metrics.task_label(task) if memory is not None else UNKNOWN_TASK
        self.metrics.requests.labels(label, outcome).inc()
        self.metrics.request_duration.labels(label).observe(seconds)
        if memory is not None:
            self.resolver.record_request(task, outcome)

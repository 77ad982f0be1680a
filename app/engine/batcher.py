"""The dynamic batcher: a bounded queue, and worker threads that run batches of rows of any tasks.

* Requests arrive from the event loop (`submit`) with their memory already resolved, so a hot swap
  never changes a request in flight: the rows carry the memory object itself.
* The worker takes whole requests up to `max_batch_size` rows, fair by task: each batch starts with
  the oldest request of the task served longest ago, then fills with the oldest requests that fit,
  so a small request of one task waits for at most one batch per other busy task, never behind a
  queue of another task's huge ones. It waits at most `max_wait_s` after the oldest request arrived
  for a batch to fill.
* One worker per pass the runner can run at once (the graph's streams; one on the eager path): while
  one worker's pass runs, the next takes and prepares its batch and runs its own pass beside it.
* Rows of one batch are sorted by token length and cut into forward passes where that saves more
  padding than a pass costs (`plan_passes`).
* A failing pass fails only the requests with rows in it, and a row that fails on its own (the
  tokenizer refuses it, or its memory overflows to a non-finite score) fails only its own request; the
  loop itself catches everything per batch, so it cannot die of a bad batch.
* Admission is by cost, not by count: each request's work is estimated in padded tokens when it is
  queued, and a request is refused at once (Overloaded -> 429 with Retry-After) when the queued work
  ahead of it plus its own would take longer than `max_queue_work_s` at the pace measured on recent
  batches, so what is accepted finishes within its deadline. A request that outlives its deadline
  gets RequestTimeout; a cancelled request is skipped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from app.engine.inputs import TextInput
from app.engine.runner import PreparedRow, Row, RowOutput, Runner
from app.errors import InferenceFailed, NonFiniteOutput, NotReady, Overloaded, RequestTimeout, SpartanError
from app.metrics import Metrics
from app.settings import Settings
from app.spartan.memory import TaskMemory

log = logging.getLogger(__name__)

# Above this many rows the exact pass planner (quadratic) gives way to fixed-size chunks.
_EXACT_PLAN_MAX_ROWS = 512
# Cost estimate at admission, before tokenising: English WordPiece/BPE averages ~4-5 characters a token;
# 4 errs towards overestimating the work. Plus the special tokens ([CLS], [SEP]) every row carries.
_CHARS_PER_TOKEN = 4
_SPECIAL_TOKENS = 3
# The pace (seconds per padded token) assumed until the first batches are measured: MiniLM fp32 on
# 2 cores; the moving average replaces it within a few batches.
_INITIAL_SECONDS_PER_TOKEN = 2e-4
# The pace is learnt only from batches at least this large: a batch of a few short rows costs mostly its
# fixed overhead (~10 ms), and counting that per token would overestimate long requests' work by 10x or
# more and refuse work the queue could finish in time.
_MIN_TOKENS_FOR_PACE = 1024
# Fair share: tasks remembered with their last turn before idle ones are dropped.
_TURN_TABLE_SIZE = 1024


def estimated_tokens(inputs: Sequence[TextInput], max_length: int) -> int:
    """The padded-token cost of a request's rows, from their characters, capped at the task's max_length."""
    total = 0
    for text, pair in inputs:
        chars = len(text) + len(pair or "")
        total += min(max_length, chars // _CHARS_PER_TOKEN + _SPECIAL_TOKENS)
    return total


@dataclass(frozen=True)
class RequestResult:
    """What one request gets back: one RowOutput per input, and the memory that produced them (None:
    the bare backbone's embeddings)."""

    memory: TaskMemory | None
    rows: list[RowOutput]
    queue_wait_s: float
    inference_s: float


@dataclass(frozen=True)
class PassRecord:
    """One backbone forward pass of a batch."""

    rows: int
    padded_length: int
    tasks: tuple[str, ...]  # distinct tasks whose rows shared this pass


@dataclass(frozen=True)
class BatchRecord:
    """One batch, as listeners (metrics, tests, benchmarks) see it after it ran."""

    tasks: tuple[str, ...]  # distinct tasks, in order of first appearance
    versions: tuple[str, ...]  # distinct memory versions
    requests: int
    rows: int
    passes: tuple[PassRecord, ...]
    seconds: float
    failed_requests: int


@dataclass(eq=False)
class QueuedRequest:
    """A request in the queue; its future gets the RequestResult or the error."""

    task: str
    memory: TaskMemory | None  # None: bare-backbone rows (sentence embeddings)
    inputs: Sequence[TextInput]
    record_routing: bool
    enqueued_at: float
    deadline: float
    cost_tokens: int = 0  # estimated padded tokens of its rows (admission by cost)
    future: concurrent.futures.Future[RequestResult] = field(default_factory=concurrent.futures.Future)

    @property
    def rows(self) -> int:
        return len(self.inputs)


@dataclass
class _Outcome:
    """A request's progress through its batch's passes."""

    outputs: list[RowOutput | None]
    inference_s: float = 0.0
    error: BaseException | None = None


def plan_passes(lengths: Sequence[int], max_rows: int, overhead_tokens: int) -> list[list[int]]:
    """Split rows into forward passes (lists of row indices) to minimise padded tokens + pass overhead.

    Rows are sorted by length; a pass over sorted rows i..j costs `overhead_tokens + n * longest`.
    Exact dynamic programming over cut points (O(n * max_rows)); fixed chunks for very large inputs.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if len(order) > _EXACT_PLAN_MAX_ROWS:
        return [order[i : i + max_rows] for i in range(0, len(order), max_rows)]
    sorted_lengths = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(max(0, end - max_rows), end):
            cost = best[start] + overhead_tokens + (end - start) * sorted_lengths[end - 1]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    passes: list[list[int]] = []
    end = len(order)
    while end > 0:
        passes.append(order[cut[end] : end])
        end = cut[end]
    return passes[::-1]


@dataclass(frozen=True)
class BatchingConfig:
    """The batcher's knobs. Built from Settings (`from_settings`), the one place their defaults live."""

    max_batch_size: int  # most rows in one forward pass
    max_wait_s: float  # longest the oldest request waits for a batch to fill
    max_queue_rows: int  # most rows waiting
    max_queue_work_s: float  # most estimated seconds of work waiting (admission by cost)
    request_timeout_s: float  # a request's deadline, queueing included
    pass_overhead_tokens: int  # the cost of one more forward pass, in padded tokens (pass planning)
    workers: int = 1  # worker threads: the passes the runner can run at once (not a setting: the engine's)
    stall_after_s: float = 120.0  # not a setting: a batch running this long means a stuck worker

    @classmethod
    def from_settings(cls, settings: Settings, workers: int = 1) -> BatchingConfig:
        return cls(
            workers=workers,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue_rows=settings.max_queue_rows,
            max_queue_work_s=settings.queue_work_budget_s,
            request_timeout_s=settings.request_timeout_s,
            pass_overhead_tokens=settings.pass_overhead_tokens,
        )


class Batcher:
    """Queue + worker thread. `submit` from the event loop; everything else is thread-safe."""

    def __init__(self, runner: Runner, config: BatchingConfig, metrics: Metrics | None = None) -> None:
        self.runner = runner
        self.config = config
        self.metrics = metrics or Metrics()
        self._queue: deque[QueuedRequest] = deque()
        self._round = 0  # batches popped so far
        self._last_turn: dict[str, int] = {}  # task -> the round it last had rows in a batch
        self._queued_rows = 0
        self._queued_tokens = 0
        self._seconds_per_token = _INITIAL_SECONDS_PER_TOKEN  # moving average, for admission
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._busy_since: dict[int, float] = {}  # worker thread id -> when its batch in progress started
        self._batch_seconds = 0.1  # moving average of a batch's duration, for Retry-After
        self._listeners: list[Callable[[BatchRecord], None]] = []
        self.metrics.queue_capacity.set(config.max_queue_rows)

    # --------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._threads:
            return
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"spartan-batcher-{number}", daemon=True)
            for number in range(self.config.workers)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the batches in progress, fail everything still queued with NotReady, join the workers."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._queued_rows = 0
            self._queued_tokens = 0
            self._cond.notify_all()
        for request in pending:
            _fail(request, NotReady("the service is shutting down"))
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        self.metrics.queue_depth.set(0)

    def health(self) -> str | None:
        """None if every worker is alive and making progress; otherwise why not."""
        if not self._threads or not all(thread.is_alive() for thread in self._threads):
            return "batch worker is not running"
        now = time.monotonic()
        if any(now - since > self.config.stall_after_s for since in list(self._busy_since.values())):
            return f"batch worker has been stuck on one batch for over {self.config.stall_after_s:.0f}s"
        return None

    def add_listener(self, listener: Callable[[BatchRecord], None]) -> None:
        """Called in the worker thread after every batch (keep it quick; exceptions are logged)."""
        self._listeners.append(listener)

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    # --------------------------------------------------------------------------------- submitting

    async def submit(
        self,
        task: str,
        memory: TaskMemory | None,
        inputs: Sequence[TextInput],
        *,
        record_routing: bool = False,
        max_length: int = 512,
    ) -> RequestResult:
        """Queue one request and wait for its result (Overloaded, RequestTimeout, InferenceFailed).
        `max_length` bounds the cost estimate of rows without a memory (a memory brings its own)."""
        request = self.enqueue(task, memory, inputs, record_routing=record_routing, max_length=max_length)
        try:
            # Cancelling the wrapper (timeout, client gone) cancels the queued request: it is skipped.
            return await asyncio.wait_for(asyncio.wrap_future(request.future), self.config.request_timeout_s)
        except TimeoutError:
            raise RequestTimeout(
                f"no result within {self.config.request_timeout_s:g}s (queue or inference too slow); "
                "retry later"
            ) from None

    def enqueue(
        self,
        task: str,
        memory: TaskMemory | None,
        inputs: Sequence[TextInput],
        *,
        record_routing: bool = False,
        max_length: int = 512,
    ) -> QueuedRequest:
        now = time.monotonic()
        cost = estimated_tokens(inputs, memory.spec.max_length if memory is not None else max_length)
        request = QueuedRequest(
            task, memory, inputs, record_routing, now, now + self.config.request_timeout_s, cost_tokens=cost
        )
        with self._cond:
            if self._stopping or not self._threads:
                raise NotReady("the batch worker is not running")
            self._admit(request)
            self._queue.append(request)
            self._queued_rows += request.rows
            self._queued_tokens += request.cost_tokens
            self._cond.notify()
        self.metrics.queue_depth.set(self._queued_rows)
        return request

    def _admit(self, request: QueuedRequest) -> None:
        """Refuse (Overloaded) a request the queue cannot finish in time; called under the lock.

        An empty queue takes any request (else one larger than the budget could never run).
        """
        if self._queued_rows + request.rows > self.config.max_queue_rows:
            raise Overloaded(
                f"the queue is full ({self._queued_rows} of {self.config.max_queue_rows} rows waiting)",
                retry_after=self._retry_after(),
            )
        work_s = (self._queued_tokens + request.cost_tokens) * self._seconds_per_token
        if self._queue and work_s > self.config.max_queue_work_s:
            raise Overloaded(
                f"the queue is full: about {work_s:.1f}s of work with this request, at most "
                f"{self.config.max_queue_work_s:g}s are accepted",
                retry_after=self._retry_after(),
            )

    def _retry_after(self) -> float:
        # The time the work queued ahead needs to drain, at the recent pace; at least a second.
        by_rows = self._queued_rows / self.config.max_batch_size * self._batch_seconds / self.config.workers
        by_tokens = self._queued_tokens * self._seconds_per_token
        return max(1.0, by_rows, by_tokens)

    # --------------------------------------------------------------------------------- the worker

    def _loop(self) -> None:
        worker = threading.get_ident()
        while not self._stopping:
            # Per batch, not around the loop: whatever one batch does, the next one runs.
            batch: list[QueuedRequest] = []
            try:
                batch = self._take_batch()
                if batch:
                    self._busy_since[worker] = time.monotonic()
                    self._run_batch(batch)
            except Exception:
                log.exception("batch worker error (the worker goes on)")
                for request in batch:  # nobody may wait forever for a batch that broke
                    _fail(request, InferenceFailed("inference failed for the batch holding this request"))
            finally:
                self._busy_since.pop(worker, None)

    def _take_batch(self) -> list[QueuedRequest]:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return []
            fill_deadline = self._queue[0].enqueued_at + self.config.max_wait_s
            while self._queued_rows < self.config.max_batch_size and not self._stopping:
                remaining = fill_deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = self._pop_batch()
        self.metrics.queue_depth.set(self._queued_rows)
        return batch

    def _pop_batch(self) -> list[QueuedRequest]:
        """Up to max_batch_size rows of whole requests (a larger request runs alone), fair by task.

        The batch starts with the oldest request of the task served longest ago, so one task's huge
        requests cannot starve another task's small ones: each task with work queued gets a turn in
        every round of batches. The batch then fills with the oldest requests that fit, of any task.
        """
        head = self._fair_head()
        order = [head, *(i for i in range(len(self._queue)) if i != head)]
        taken: set[int] = set()
        rows = 0
        for index in order:
            request = self._queue[index]
            if taken and rows + request.rows > self.config.max_batch_size:
                continue
            taken.add(index)
            rows += request.rows
            if rows >= self.config.max_batch_size:
                break
        chosen = [self._queue[i] for i in sorted(taken, key=order.index)]
        self._queue = deque(r for i, r in enumerate(self._queue) if i not in taken)
        self._round += 1
        batch: list[QueuedRequest] = []
        now = time.monotonic()
        for request in chosen:
            self._queued_rows -= request.rows
            self._queued_tokens -= request.cost_tokens
            self._last_turn[request.task] = self._round
            if self._claim(request, now):
                batch.append(request)
        self._forget_idle_tasks()
        return batch

    def _fair_head(self) -> int:
        """The queue position of the oldest request of the task whose last turn is longest ago."""
        best, best_turn = 0, None
        for index, request in enumerate(self._queue):
            turn = self._last_turn.get(request.task, 0)
            if best_turn is None or turn < best_turn:
                best, best_turn = index, turn
        return best

    def _forget_idle_tasks(self) -> None:
        # Turns matter only between tasks with work queued; drop the rest so the table stays small.
        if len(self._last_turn) > _TURN_TABLE_SIZE:
            queued = {request.task for request in self._queue}
            self._last_turn = {t: n for t, n in self._last_turn.items() if t in queued}

    @staticmethod
    def _claim(request: QueuedRequest, now: float) -> bool:
        """Mark a request running; False for one that was cancelled or is already past its deadline."""
        if not request.future.set_running_or_notify_cancel():
            return False
        if now > request.deadline:
            request.future.set_exception(RequestTimeout("the request expired in the queue; retry later"))
            return False
        return True

    def _run_batch(self, batch: list[QueuedRequest]) -> None:
        """Run one batch; every request of it gets a result or an exception, whatever happens."""
        started = time.monotonic()
        outcomes = [_Outcome([None] * request.rows) for request in batch]
        passes: list[PassRecord] = []
        try:
            self._run_passes(batch, outcomes, passes)
        except Exception as err:  # preparation failed: the whole batch fails, the loop goes on
            log.exception("batch of %d requests failed", len(batch))
            self.metrics.batch_failures.inc()
            for outcome in outcomes:
                outcome.error = outcome.error or err
        finally:
            self._complete(batch, outcomes, started)
        seconds = time.monotonic() - started
        padded_tokens = sum(p.rows * p.padded_length for p in passes)
        with self._cond:  # the queue drains at the pace of all workers together
            self._batch_seconds = 0.9 * self._batch_seconds + 0.1 * seconds
            if padded_tokens >= _MIN_TOKENS_FOR_PACE:
                pace = seconds / padded_tokens / self.config.workers
                self._seconds_per_token = 0.8 * self._seconds_per_token + 0.2 * pace
        self._publish(batch, outcomes, passes, seconds)

    def _run_passes(
        self, batch: list[QueuedRequest], outcomes: list[_Outcome], passes: list[PassRecord]
    ) -> None:
        owners = [(r, i) for r, request in enumerate(batch) for i in range(request.rows)]
        rows = [
            Row(request.memory, text, pair, request.record_routing, request.task)
            for request in batch
            for text, pair in request.inputs
        ]
        prepared = self.runner.prepare(rows)
        if len(prepared) != len(rows):
            raise RuntimeError(f"runner prepared {len(prepared)} rows for {len(rows)} inputs")
        runnable = []
        for index, row in enumerate(prepared):
            if row.error is not None:  # this row alone is bad: its request fails, its neighbours run
                outcome = outcomes[owners[index][0]]
                outcome.error = outcome.error or row.error
            else:
                runnable.append(index)
        lengths = [prepared[i].length for i in runnable]
        for planned in plan_passes(lengths, self.config.max_batch_size, self.config.pass_overhead_tokens):
            indices = [runnable[i] for i in planned]
            tasks = tuple(dict.fromkeys(batch[owners[i][0]].task for i in indices))
            passes.append(PassRecord(len(indices), max(prepared[i].length for i in indices), tasks))
            self._run_pass([prepared[i] for i in indices], [owners[i] for i in indices], outcomes)

    def _run_pass(
        self, rows: list[PreparedRow], owners: list[tuple[int, int]], outcomes: list[_Outcome]
    ) -> None:
        """One forward pass; if it fails, only the requests with rows in it fail."""
        started = time.monotonic()
        try:
            results = self.runner.run(rows)
            if len(results) != len(rows):
                raise RuntimeError(f"runner returned {len(results)} outputs for {len(rows)} rows")
        except Exception as err:
            log.exception("forward pass of %d rows failed", len(rows))
            self.metrics.batch_failures.inc()
            for request_index, _ in owners:
                outcomes[request_index].error = outcomes[request_index].error or err
            return
        seconds = time.monotonic() - started
        for (request_index, row_index), result in zip(owners, results, strict=True):
            if not result.finite:
                self.metrics.nonfinite_outputs.inc()
                outcome = outcomes[request_index]
                outcome.error = outcome.error or NonFiniteOutput(
                    f"the task's memory produced a non-finite score for inputs[{row_index}]"
                )
            outcomes[request_index].outputs[row_index] = result
        for request_index in {r for r, _ in owners}:
            outcomes[request_index].inference_s += seconds

    def _complete(self, batch: list[QueuedRequest], outcomes: list[_Outcome], started: float) -> None:
        for request, outcome in zip(batch, outcomes, strict=True):
            if request.future.done():
                continue
            rows = [row for row in outcome.outputs if row is not None]
            if isinstance(outcome.error, SpartanError):  # this request's own: a bad input, a NaN score
                _fail(request, outcome.error)
                continue
            if outcome.error is not None or len(rows) != request.rows:
                _fail(request, InferenceFailed("inference failed for the batch holding this request"))
                continue
            wait = started - request.enqueued_at
            request.future.set_result(RequestResult(request.memory, rows, wait, outcome.inference_s))

    def _publish(
        self, batch: list[QueuedRequest], outcomes: list[_Outcome], passes: list[PassRecord], seconds: float
    ) -> None:
        tasks = tuple(dict.fromkeys(request.task for request in batch))
        record = BatchRecord(
            tasks=tasks,
            versions=tuple(dict.fromkeys(r.memory.version for r in batch if r.memory is not None)),
            requests=len(batch),
            rows=sum(request.rows for request in batch),
            passes=tuple(passes),
            seconds=seconds,
            failed_requests=sum(1 for outcome in outcomes if outcome.error is not None),
        )
        self.metrics.batch_duration.observe(seconds)
        for forward_pass in passes:
            self.metrics.batch_size.observe(forward_pass.rows)
            self.metrics.batch_tasks.observe(len(forward_pass.tasks))
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:  # a listener is an observer: it never breaks serving
                log.exception("batch listener failed")


def _fail(request: QueuedRequest, error: BaseException) -> None:
    if request.future.done():
        return
    if request.future.running() or request.future.set_running_or_notify_cancel():
        request.future.set_exception(error)

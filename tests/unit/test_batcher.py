"""The dynamic batcher with a fake runner: batching, mixing tasks, bucketing, overload, timeouts, failures.

The fake runner's output for a row is [number of words, task marker], so every result can be checked
against the input that produced it, whatever batch and pass it ran in.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import replace

import pytest

from app.engine.batcher import Batcher, BatchingConfig, BatchRecord, estimated_tokens, plan_passes
from app.engine.runner import PreparedRow, Row, RowOutput
from app.errors import InferenceFailed, InvalidInput, NonFiniteOutput, NotReady, Overloaded, RequestTimeout
from app.metrics import Metrics
from app.settings import Settings
from app.spartan.memory import MemorySpec, TaskMemory


def tiny_task(marker: int) -> TaskMemory:
    memory = TaskMemory(MemorySpec(num_layers=1, hidden_size=4, num_parents=2, num_children=1, top_k=1))
    memory.version = f"v{marker}"
    memory.marker = marker  # type: ignore[attr-defined]  # read back by the fake runner
    return memory


class FakeRunner:
    """Counts words; raises on a row "boom"; can hold the first pass until `release()`."""

    def __init__(self, delay_s: float = 0.0, hold: bool = False) -> None:
        self.delay_s = delay_s
        self.seen: list[list[str]] = []
        self._gate = threading.Event()
        self.entered = threading.Event()
        if not hold:
            self._gate.set()
        self.fail_prepare = False

    def release(self) -> None:
        self._gate.set()

    def prepare(self, rows: Sequence[Row]) -> list[PreparedRow]:
        if self.fail_prepare:
            raise RuntimeError("tokenizer exploded")
        return [
            PreparedRow(row, 0, error=InvalidInput("refused"))
            if row.text == "untokenisable"
            else PreparedRow(row, len(row.text.split()))
            for row in rows
        ]

    def run(self, rows: Sequence[PreparedRow]) -> list[RowOutput]:
        self.entered.set()
        self._gate.wait(10)
        self.seen.append([p.row.text for p in rows])
        if any(p.row.text == "boom" for p in rows):
            raise RuntimeError("forward exploded")
        time.sleep(self.delay_s)
        marker = [float(p.row.memory.marker) for p in rows]  # type: ignore[attr-defined]
        return [
            RowOutput([float(p.length), m], finite=p.row.text != "overflow")
            for p, m in zip(rows, marker, strict=True)
        ]


def make_batcher(runner: FakeRunner, **changes) -> tuple[Batcher, list[BatchRecord]]:
    """A started batcher: the service's defaults (from Settings), small and fast, with `changes`."""
    small = {"max_batch_size": 8, "max_wait_s": 0.01, "max_queue_rows": 64, "request_timeout_s": 10.0}
    config = replace(BatchingConfig.from_settings(Settings()), **{**small, **changes})
    batcher = Batcher(runner, config, Metrics())
    records: list[BatchRecord] = []
    batcher.add_listener(records.append)
    batcher.start()
    return batcher, records


def inputs(*texts: str) -> list[tuple[str, str | None]]:
    return [(text, None) for text in texts]


def test_rows_of_different_tasks_share_one_forward_pass() -> None:
    runner = FakeRunner()
    batcher, records = make_batcher(runner, max_wait_s=0.5)
    tasks = {name: tiny_task(marker) for marker, name in enumerate(["a", "b", "c"], start=1)}

    async def scenario() -> list:
        calls = [batcher.submit(name, memory, inputs("one two", "three")) for name, memory in tasks.items()]
        return await asyncio.gather(*calls)

    try:
        results = asyncio.run(scenario())
    finally:
        batcher.stop()
    for (name, memory), result in zip(tasks.items(), results, strict=True):
        assert result.memory is memory, name
        assert [row.outputs for row in result.rows] == [[2.0, memory.marker], [1.0, memory.marker]]  # type: ignore[attr-defined]
    mixed = [p for record in records for p in record.passes if len(p.tasks) == 3]
    assert mixed, records


def test_results_follow_input_order_after_length_sorting() -> None:
    runner = FakeRunner()
    batcher, records = make_batcher(runner, pass_overhead_tokens=0)
    texts = ["w " * n for n in (5, 1, 9, 3, 7)]

    async def scenario():
        return await batcher.submit("a", tiny_task(1), inputs(*texts))

    try:
        result = asyncio.run(scenario())
    finally:
        batcher.stop()
    assert [int(row.outputs[0]) for row in result.rows] == [5, 1, 9, 3, 7]
    assert len(records[0].passes) > 1  # no overhead: one pass per length


def test_passes_never_exceed_max_batch_size_even_for_one_large_request() -> None:
    runner = FakeRunner()
    batcher, records = make_batcher(runner, max_batch_size=4)

    async def scenario():
        return await batcher.submit("a", tiny_task(1), inputs(*["x y"] * 10))

    try:
        result = asyncio.run(scenario())
    finally:
        batcher.stop()
    assert len(result.rows) == 10
    assert all(p.rows <= 4 for record in records for p in record.passes)
    assert sum(p.rows for record in records for p in record.passes) == 10


def test_a_full_queue_is_refused_at_once_with_retry_after() -> None:
    runner = FakeRunner(hold=True)
    batcher, _ = make_batcher(runner, max_batch_size=2, max_queue_rows=4, max_wait_s=0.0)
    memory = tiny_task(1)
    try:
        batcher.enqueue("a", memory, inputs("x", "y"))
        assert runner.entered.wait(5)  # the worker holds the first batch; the queue is empty again
        batcher.enqueue("a", memory, inputs("x", "y"))
        batcher.enqueue("a", memory, inputs("x", "y"))
        with pytest.raises(Overloaded) as refused:
            batcher.enqueue("a", memory, inputs("x"))
        assert refused.value.retry_after >= 1
    finally:
        runner.release()
        batcher.stop()


def test_a_request_that_waits_too_long_times_out_and_the_worker_goes_on() -> None:
    runner = FakeRunner(hold=True)
    batcher, _ = make_batcher(runner, request_timeout_s=0.2)
    memory = tiny_task(1)

    async def scenario():
        with pytest.raises(RequestTimeout):
            await batcher.submit("a", memory, inputs("x"))
        runner.release()
        return await batcher.submit("a", memory, inputs("x y"))

    try:
        result = asyncio.run(scenario())
        assert batcher.health() is None
    finally:
        batcher.stop()
    assert result.rows[0].outputs[0] == 2


def test_a_failing_pass_fails_only_its_own_requests() -> None:
    runner = FakeRunner(hold=True)
    # No pass overhead: rows of different lengths run in different passes of the same batch.
    batcher, records = make_batcher(runner, pass_overhead_tokens=0, max_wait_s=0.2)
    memory = tiny_task(1)

    async def scenario():
        doomed = asyncio.ensure_future(batcher.submit("a", memory, inputs("boom")))
        fine = asyncio.ensure_future(batcher.submit("a", memory, inputs("one two three")))
        await asyncio.sleep(0.05)
        runner.release()
        with pytest.raises(InferenceFailed):
            await doomed
        ok = await fine
        after = await batcher.submit("a", memory, inputs("still alive"))
        return ok, after

    try:
        ok, after = asyncio.run(scenario())
        assert batcher.health() is None
    finally:
        batcher.stop()
    assert ok.rows[0].outputs[0] == 3
    assert after.rows[0].outputs[0] == 2
    assert records[0].failed_requests == 1
    assert batcher.metrics.registry.get_sample_value("spartan_batch_failures_total") == 1


def test_a_failing_batch_preparation_fails_the_batch_not_the_worker() -> None:
    runner = FakeRunner()
    batcher, _ = make_batcher(runner)
    memory = tiny_task(1)

    async def scenario():
        runner.fail_prepare = True
        with pytest.raises(InferenceFailed):
            await batcher.submit("a", memory, inputs("x"))
        runner.fail_prepare = False
        return await batcher.submit("a", memory, inputs("x"))

    try:
        assert asyncio.run(scenario()).rows[0].outputs[0] == 1
        assert batcher.health() is None
    finally:
        batcher.stop()


def test_a_cancelled_request_is_skipped() -> None:
    runner = FakeRunner(hold=True)
    batcher, _ = make_batcher(runner, max_batch_size=1, max_wait_s=0.0)
    memory = tiny_task(1)
    try:
        batcher.enqueue("a", memory, inputs("first"))
        assert runner.entered.wait(5)
        cancelled = batcher.enqueue("a", memory, inputs("cancelled"))
        kept = batcher.enqueue("a", memory, inputs("kept"))
        assert cancelled.future.cancel()
        runner.release()
        assert kept.future.result(5).rows[0].outputs[0] == 1
    finally:
        batcher.stop()
    assert ["cancelled"] not in runner.seen


def test_stop_fails_queued_requests_and_readiness_reports_it() -> None:
    runner = FakeRunner(hold=True)
    batcher, _ = make_batcher(runner, max_batch_size=1, max_wait_s=0.0)
    memory = tiny_task(1)
    batcher.enqueue("a", memory, inputs("first"))
    assert runner.entered.wait(5)
    queued = batcher.enqueue("a", memory, inputs("queued"))
    threading.Timer(0.1, runner.release).start()
    batcher.stop()
    with pytest.raises(NotReady):
        queued.future.result(5)
    assert batcher.health() == "batch worker is not running"
    with pytest.raises(NotReady):
        batcher.enqueue("a", memory, inputs("late"))


def test_a_failing_listener_does_not_break_serving() -> None:
    runner = FakeRunner()
    batcher, _ = make_batcher(runner)

    def broken(record: BatchRecord) -> None:
        raise ValueError("listener bug")

    batcher.add_listener(broken)

    async def scenario():
        first = await batcher.submit("a", tiny_task(1), inputs("x"))
        second = await batcher.submit("a", tiny_task(1), inputs("x y"))
        return first, second

    try:
        first, second = asyncio.run(scenario())
    finally:
        batcher.stop()
    assert (first.rows[0].outputs[0], second.rows[0].outputs[0]) == (1, 2)


def test_the_queue_depth_gauge_follows_the_queue() -> None:
    runner = FakeRunner(hold=True)
    batcher, _ = make_batcher(runner, max_batch_size=1, max_wait_s=0.0)
    memory = tiny_task(1)
    try:
        batcher.enqueue("a", memory, inputs("first"))
        assert runner.entered.wait(5)
        batcher.enqueue("a", memory, inputs("x", "y", "z"))
        assert batcher.metrics.registry.get_sample_value("spartan_queue_depth") == 3
    finally:
        runner.release()
        batcher.stop()


@pytest.mark.parametrize(
    ("lengths", "max_rows", "overhead", "expected_passes"),
    [
        ([3, 3, 3, 3], 8, 100, 1),
        ([1] * 8 + [100] * 8, 16, 10, 2),  # splitting saves 792 padded tokens for 10 of overhead
        ([1] * 8 + [100] * 8, 16, 10_000, 1),  # a pass costs more than the padding it would save
        ([5] * 10, 4, 0, 3),
    ],
)
def test_plan_passes(lengths: list[int], max_rows: int, overhead: int, expected_passes: int) -> None:
    passes = plan_passes(lengths, max_rows, overhead)
    assert len(passes) == expected_passes
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    assert all(len(p) <= max_rows for p in passes)


def test_plan_passes_for_very_large_inputs_uses_chunks() -> None:
    passes = plan_passes(list(range(2000, 0, -1)), 64, 10)
    assert all(len(p) <= 64 for p in passes)
    assert sorted(i for p in passes for i in p) == list(range(2000))


def test_a_row_that_fails_alone_fails_only_its_own_request() -> None:
    """A row the tokenizer refuses, or whose memory overflows, fails its request and nobody else's."""
    runner = FakeRunner(hold=True)
    batcher, records = make_batcher(runner, max_wait_s=0.0)
    memories = [tiny_task(1), tiny_task(2)]
    try:
        blocker = batcher.enqueue("a", memories[0], inputs("hold"))
        assert runner.entered.wait(5)  # everything below queues behind the held pass: one batch
        bad_text = batcher.enqueue("a", memories[0], inputs("fine", "untokenisable"))
        overflow = batcher.enqueue("b", memories[1], inputs("overflow"))
        neighbours = [batcher.enqueue("b", memories[1], inputs("one two")) for _ in range(3)]
        runner.release()
        assert blocker.future.result(5).rows[0].outputs == [1.0, 1.0]
        with pytest.raises(InvalidInput):
            bad_text.future.result(5)
        with pytest.raises(NonFiniteOutput, match=r"inputs\[0\]"):
            overflow.future.result(5)
        assert [n.future.result(5).rows[0].outputs for n in neighbours] == [[2.0, 2.0]] * 3
    finally:
        batcher.stop()
    assert len(records) == 2, records
    assert records[1].requests == 5, records  # the bad rows shared the batch with their neighbours
    assert batcher.metrics.registry.get_sample_value("spartan_nonfinite_outputs_total") == 1
    assert batcher.metrics.registry.get_sample_value("spartan_batch_failures_total") == 0


def test_admission_is_by_estimated_work_not_by_row_count() -> None:
    """Few rows of long texts fill the queue's work budget; they are refused at once, with Retry-After."""
    runner = FakeRunner(hold=True)
    # The pace before any batch is measured: 2e-4 s per padded token; 1 s of work = 5,000 tokens.
    batcher, _ = make_batcher(runner, max_wait_s=0.0, max_queue_rows=64, max_queue_work_s=1.0)
    memory = tiny_task(1)  # max_length 128: a 10,000-character text costs 128 tokens
    long_texts = inputs(*["word " * 2000] * 20)  # 20 rows, 2,560 tokens: 0.5 s
    try:
        batcher.enqueue("a", memory, inputs("hold"))
        assert runner.entered.wait(5)
        batcher.enqueue("a", memory, long_texts)
        batcher.enqueue("a", memory, long_texts[:15])  # 4,480 tokens: 0.9 s, still accepted
        with pytest.raises(Overloaded, match="s of work") as refused:
            batcher.enqueue("a", memory, long_texts[:5])  # 35 rows of 64 queued, but 1.1 s of work
        assert refused.value.retry_after >= 0.9
        batcher.enqueue("a", memory, inputs("short"))  # 4 tokens more: fits the budget
    finally:
        runner.release()
        batcher.stop()


def test_estimated_tokens_counts_characters_capped_at_max_length() -> None:
    assert estimated_tokens(inputs("a" * 40), max_length=128) == 13
    assert estimated_tokens(inputs("a" * 40_000), max_length=128) == 128
    assert estimated_tokens([("a" * 20, "b" * 20)], max_length=16) == 13
    assert estimated_tokens([("a" * 20, "b" * 20)], max_length=12) == 12


def test_a_worker_stuck_on_one_batch_is_reported_by_health() -> None:
    runner = FakeRunner(hold=True)
    batcher, _ = make_batcher(runner, stall_after_s=0.2)
    memory = tiny_task(1)
    try:
        held = batcher.enqueue("a", memory, inputs("x"))
        assert runner.entered.wait(5)
        assert batcher.health() is None  # busy, not yet stuck
        time.sleep(0.3)  # past stall_after_s with the same batch still running
        problem = batcher.health()
        assert problem is not None
        assert "stuck" in problem
        runner.release()
        assert held.future.result(5).rows[0].outputs[0] == 1
        assert batcher.health() is None
    finally:
        runner.release()
        batcher.stop()


def test_a_request_that_expires_while_queued_is_refused_not_run() -> None:
    runner = FakeRunner(hold=True)
    batcher, _ = make_batcher(runner, request_timeout_s=0.2, max_wait_s=0.0)
    memory = tiny_task(1)
    try:
        batcher.enqueue("a", memory, inputs("hold"))
        assert runner.entered.wait(5)
        expired = batcher.enqueue("a", memory, inputs("too late"))
        time.sleep(0.3)  # its deadline passes while the held batch runs
        runner.release()
        with pytest.raises(RequestTimeout, match="expired in the queue"):
            expired.future.result(5)
    finally:
        batcher.stop()
    assert ["too late"] not in runner.seen  # it never reached a forward pass


def test_a_small_request_of_one_task_is_not_queued_behind_another_tasks_huge_ones() -> None:
    """Fair share by task: with three full-batch requests of task a queued first, the one-row request
    of task b runs in the very next batch, not after them (oldest-first order would run it fourth)."""
    runner = FakeRunner(hold=True)
    batcher, records = make_batcher(runner, max_batch_size=8, max_wait_s=0.0)
    task_a, task_b = tiny_task(1), tiny_task(2)
    try:
        held = batcher.enqueue("a", task_a, inputs("hold"))
        assert runner.entered.wait(5)
        huge = [batcher.enqueue("a", task_a, inputs(*["x y z"] * 8)) for _ in range(3)]
        small = batcher.enqueue("b", task_b, inputs("lost card"))
        runner.release()
        for request in [held, *huge, small]:
            request.future.result(5)
    finally:
        batcher.stop()
    assert [record.tasks for record in records] == [("a",), ("b",), ("a",), ("a",), ("a",)], records
    assert [record.rows for record in records] == [1, 1, 8, 8, 8]


def test_fair_share_takes_turns_between_busy_tasks_and_fills_batches() -> None:
    """Two tasks with queued work alternate at the head of batches; each batch still fills up with the
    oldest requests that fit, of any task."""
    runner = FakeRunner(hold=True)
    batcher, records = make_batcher(runner, max_batch_size=4, max_wait_s=0.0)
    task_a, task_b = tiny_task(1), tiny_task(2)
    try:
        held = batcher.enqueue("c", tiny_task(3), inputs("hold"))
        assert runner.entered.wait(5)
        queued = [batcher.enqueue("a", task_a, inputs(*["x"] * 3)) for _ in range(3)]
        queued += [batcher.enqueue("b", task_b, inputs("y")) for _ in range(3)]
        runner.release()
        for request in [held, *queued]:
            request.future.result(5)
    finally:
        batcher.stop()
    # Each batch: a's oldest (3 rows) leads, and b's oldest (1 row) fills it up to 4; both had the last
    # turn, so the tie goes to the oldest request, a's next one, with b's next one; and so on.
    assert [record.rows for record in records] == [1, 4, 4, 4], records
    assert all(set(record.tasks) == {"a", "b"} for record in records[1:]), records


def test_the_pace_is_learnt_from_batches_with_real_work_not_from_tiny_ones() -> None:
    """Tiny batches cost their fixed overhead; counted per token they would make a long request look
    100x more expensive than it is and refuse work the queue can finish in time."""
    runner = FakeRunner(delay_s=0.02)
    batcher, _ = make_batcher(runner, max_wait_s=0.0, max_queue_work_s=1.0)
    memory = tiny_task(1)
    long_texts = inputs(*["word " * 2000] * 20)  # 2,560 tokens: 0.5 s at the initial 2e-4 s/token
    try:
        for _ in range(10):  # ten one-token batches of 20 ms: 0.02 s per token if they counted
            batcher.enqueue("a", memory, inputs("tiny")).future.result(5)
        runner.delay_s, runner._gate = 0.0, threading.Event()  # hold the next pass
        runner.entered.clear()
        batcher.enqueue("a", memory, inputs("hold"))
        assert runner.entered.wait(5)
        batcher.enqueue("a", memory, inputs("queued"))  # the queue is not empty: the budget applies
        accepted = batcher.enqueue("a", memory, long_texts)
        runner.release()
        assert len(accepted.future.result(5).rows) == 20
    finally:
        runner.release()
        batcher.stop()


class BarrierRunner(FakeRunner):
    """Each pass waits at a barrier for another pass to arrive: two passes must run at once."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=5)

    def run(self, rows: Sequence[PreparedRow]) -> list[RowOutput]:
        self.barrier.wait()
        return super().run(rows)


def test_two_workers_run_two_batches_at_once() -> None:
    """With workers=2 a second batch starts while the first one's pass runs (the graph's streams);
    with one worker the second pass could never reach the barrier and both would fail."""
    runner = BarrierRunner(parties=2)
    batcher, records = make_batcher(runner, workers=2, max_batch_size=1, max_wait_s=0.0)
    memory = tiny_task(1)
    try:
        first = batcher.enqueue("a", memory, inputs("one"))
        second = batcher.enqueue("b", memory, inputs("two words"))
        assert first.future.result(10).rows[0].outputs[0] == 1
        assert second.future.result(10).rows[0].outputs[0] == 2
        assert len(records) == 2
        assert batcher.health() is None
    finally:
        runner.barrier.abort()
        batcher.stop()


def test_one_worker_runs_one_batch_at_a_time() -> None:
    runner = BarrierRunner(parties=2)
    runner.barrier = threading.Barrier(2, timeout=0.3)
    batcher, _ = make_batcher(runner, workers=1, max_batch_size=1, max_wait_s=0.0)
    memory = tiny_task(1)
    try:
        first = batcher.enqueue("a", memory, inputs("one"))
        with pytest.raises(InferenceFailed):  # nobody else reached the barrier: it broke
            first.future.result(10)
    finally:
        batcher.stop()


def test_with_two_workers_a_stuck_one_is_reported_and_stop_joins_both() -> None:
    runner = FakeRunner(hold=True)
    before = set(threading.enumerate())  # another module's live app may have workers of its own
    batcher, _ = make_batcher(runner, workers=2, stall_after_s=0.2)
    workers = [t for t in set(threading.enumerate()) - before if t.name.startswith("spartan-batcher")]
    assert len(workers) == 2
    try:
        held = batcher.enqueue("a", tiny_task(1), inputs("x"))
        assert runner.entered.wait(5)
        assert batcher.health() is None
        time.sleep(0.3)
        assert "stuck" in (batcher.health() or "")
        runner.release()
        held.future.result(5)
        assert batcher.health() is None
    finally:
        runner.release()
        batcher.stop()
    assert batcher.health() == "batch worker is not running"
    assert not any(worker.is_alive() for worker in workers)


def test_the_pace_counts_every_worker() -> None:
    """Two workers drain the queue twice as fast as one batch's seconds say: the pace (s per padded
    token, for admission) is a batch's seconds over its tokens, divided by the workers."""
    paces = {}
    for workers in (1, 2):
        runner = FakeRunner(delay_s=0.05)
        batcher, _ = make_batcher(runner, workers=workers, max_wait_s=0.0)
        text = inputs(*["word " * 200] * 8)  # one batch of 8 rows x 200 tokens: above the pace's floor
        try:
            for _ in range(30):  # the moving average settles on the measured pace
                batcher.enqueue("a", tiny_task(1), text).future.result(5)
        finally:
            batcher.stop()
        paces[workers] = batcher._seconds_per_token
    assert paces[2] == pytest.approx(paces[1] / 2, rel=0.25)

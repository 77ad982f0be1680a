"""The per-task routing tally: counting by predicted label, restarts on a new version, thread safety."""

from __future__ import annotations

import threading

import torch

from app.engine.routing_tally import REGRESSION_BUCKET, RoutingTally
from app.spartan.memory import MemorySpec, TaskMemory, TaskType


def tiny_memory(version: str, *, task_type: TaskType = "classification") -> TaskMemory:
    labels = ("no", "yes") if task_type == "classification" else ()
    spec = MemorySpec(num_layers=2, hidden_size=8, num_parents=4, num_children=2, top_k=2,
                      task_type=task_type, labels=labels)  # fmt: skip
    memory = TaskMemory(spec)
    memory.version = version
    return memory


def one_pass(parent: int, rows: int = 1, seq: int = 3) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every token of every row chooses `parent` and parent 0, in both layers; all tokens real."""
    parents = torch.tensor([parent, 0]).expand(rows, seq, 2)
    return [parents, parents], torch.ones(rows, seq, dtype=torch.long)


def counted_rows(tally: RoutingTally, task: str) -> int:
    snap = tally.snapshot(task)
    assert snap is not None
    return snap.rows


def test_counts_split_by_predicted_label() -> None:
    tally, memory = RoutingTally(), tiny_memory("v1")
    tally.on_memory_change("t", memory)
    layers, real = one_pass(parent=3, rows=2)
    outputs = torch.tensor([[0.1, 0.9], [0.8, 0.2]])  # row 0 predicted "yes", row 1 "no"
    tally.add_pass("t", memory, layers, real, outputs)
    snap = tally.snapshot("t")
    assert snap is not None
    assert (snap.rows, snap.tokens, snap.labels) == (2, 6, ("no", "yes"))
    assert snap.counts.shape == (2, 2, 4)
    assert snap.counts[0].tolist() == [[3, 0, 0, 3], [3, 0, 0, 3]]
    assert snap.counts.sum((1, 2)).tolist() == [6 * 2, 6 * 2]


def test_regression_counts_go_to_one_bucket() -> None:
    tally, memory = RoutingTally(), tiny_memory("v1", task_type="regression")
    tally.on_memory_change("r", memory)
    layers, real = one_pass(parent=1, rows=3)
    tally.add_pass("r", memory, layers, real, torch.tensor([[0.5], [-2.0], [7.0]]))
    snap = tally.snapshot("r")
    assert snap is not None
    assert snap.labels == (REGRESSION_BUCKET,)
    assert snap.counts[1].tolist() == [[9, 9, 0, 0]]


def test_a_new_version_restarts_and_the_same_version_keeps_counting() -> None:
    tally, old, new = RoutingTally(), tiny_memory("v1"), tiny_memory("v2")
    tally.on_memory_change("t", old)
    layers, real = one_pass(parent=2)
    tally.add_pass("t", old, layers, real, torch.tensor([[1.0, 0.0]]))
    tally.on_memory_change("t", old)  # reloaded after an eviction: same version, counts kept
    assert counted_rows(tally, "t") == 1
    tally.on_memory_change("t", new)
    snap = tally.snapshot("t")
    assert snap is not None
    assert (snap.version, snap.rows, snap.tokens, int(snap.counts.sum())) == ("v2", 0, 0, 0)
    # A row of the replaced version, still in flight, does not count toward the new one.
    tally.add_pass("t", old, layers, real, torch.tensor([[1.0, 0.0]]))
    assert counted_rows(tally, "t") == 0


def test_unregistered_and_unannounced_tasks_are_not_counted() -> None:
    tally, memory = RoutingTally(), tiny_memory("v1")
    layers, real = one_pass(parent=2)
    tally.add_pass("never-announced", memory, layers, real, torch.tensor([[1.0, 0.0]]))
    assert tally.snapshot("never-announced") is None
    tally.on_memory_change("t", memory)
    tally.on_memory_change("t", None)
    tally.add_pass("t", memory, layers, real, torch.tensor([[1.0, 0.0]]))  # a stale row after delete
    assert tally.snapshot("t") is None


def test_snapshots_are_copies() -> None:
    tally, memory = RoutingTally(), tiny_memory("v1")
    tally.on_memory_change("t", memory)
    before = tally.snapshot("t")
    layers, real = one_pass(parent=1)
    tally.add_pass("t", memory, layers, real, torch.tensor([[1.0, 0.0]]))
    assert before is not None
    assert int(before.counts.sum()) == 0


def test_concurrent_adds_lose_nothing() -> None:
    tally, memory = RoutingTally(), tiny_memory("v1")
    tally.on_memory_change("t", memory)
    layers, real = one_pass(parent=3, rows=2)
    outputs = torch.tensor([[0.0, 1.0], [0.0, 1.0]])

    def work() -> None:
        for _ in range(200):
            tally.add_pass("t", memory, layers, real, outputs)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snap = tally.snapshot("t")
    assert snap is not None
    assert (snap.rows, snap.tokens) == (4 * 200 * 2, 4 * 200 * 6)
    assert int(snap.counts[0].sum()) == snap.tokens * 2

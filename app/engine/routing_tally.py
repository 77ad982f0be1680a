"""Per served task, how often each memory parent was chosen, split by the rows' predicted labels.

The batch worker adds every forward pass's parent choices (EncoderRunner, after the pass); the API
reads snapshots. Counts always belong to one memory version of a task:
* the registry tells the tally when it installs a memory (load, upload, reload from the store); a new
  version restarts the task's counts, the same version (a reload after an LRU eviction) keeps them;
* rows of a replaced version still in flight are not counted: they would mix two memories' parents;
* an unregistered (deleted) task's counts are dropped; rows of a task the registry never announced
  are not counted, so a stale row cannot bring a deleted task's statistics back.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from app.spartan.memory import MemorySpec, TaskMemory, TaskType
from app.spartan.routing_stats import count_choices

# The one bucket of a regression task (no labels to split by).
REGRESSION_BUCKET = "all"


def bucket_names(spec: MemorySpec) -> tuple[str, ...]:
    """What the counts are split by: the predicted label (classification), else one bucket."""
    return spec.labels if spec.task_type == "classification" else (REGRESSION_BUCKET,)


def predicted_buckets(spec: MemorySpec, outputs: torch.Tensor) -> torch.Tensor:
    """Each row's bucket from its head outputs [rows, num_outputs]: the argmax label, or 0 (regression)."""
    if spec.task_type == "classification":
        return outputs.argmax(-1)
    return torch.zeros(outputs.shape[0], dtype=torch.long)


def zero_counts(spec: MemorySpec) -> torch.Tensor:
    """[memory layers, buckets, parents] int64 zeros for a memory of this spec (layers without a
    memory have nothing to count)."""
    layers = len(spec.memory_layer_indices)
    return torch.zeros(layers, len(bucket_names(spec)), spec.num_parents, dtype=torch.long)


@dataclass(frozen=True)
class RoutingSnapshot:
    """A task's statistics at one moment (a copy: later passes do not change it)."""

    task: str
    version: str  # the memory version these counts belong to
    task_type: TaskType
    labels: tuple[str, ...]  # the buckets: predicted labels, or ("all",) for regression
    num_parents: int
    top_k: int
    rows: int  # rows (inputs) counted
    tokens: int  # real (non-padding) tokens counted; each makes top_k choices per layer
    counts: torch.Tensor  # [memory layers, labels, parents] int64: choices of each parent per label
    layers: tuple[int, ...]  # the Transformer layer of each row of counts (those with a memory)

    @classmethod
    def empty(cls, task: str, version: str, spec: MemorySpec) -> RoutingSnapshot:
        return cls(
            task,
            version,
            spec.task_type,
            bucket_names(spec),
            spec.num_parents,
            spec.top_k,
            rows=0,
            tokens=0,
            counts=zero_counts(spec),
            layers=tuple(spec.memory_layer_indices),
        )


@dataclass
class _TaskCounts:
    """The running totals of one task version (mutated only under the tally's lock)."""

    version: str
    spec: MemorySpec
    counts: torch.Tensor
    rows: int = 0
    tokens: int = 0

    @classmethod
    def fresh(cls, memory: TaskMemory) -> _TaskCounts:
        return cls(memory.version, memory.spec, zero_counts(memory.spec))


class RoutingTally:
    """Thread-safe routing counts per task (see the module docstring for when they restart)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[str, _TaskCounts] = {}

    def on_memory_change(self, task: str, memory: TaskMemory | None) -> None:
        """Registry listener: a memory was installed for `task`, or (None) the task was unregistered."""
        with self._lock:
            if memory is None:
                self._tasks.pop(task, None)
                return
            current = self._tasks.get(task)
            if current is None or current.version != memory.version:
                self._tasks[task] = _TaskCounts.fresh(memory)

    def add_pass(
        self,
        task: str,
        memory: TaskMemory,
        layer_parents: Sequence[torch.Tensor],
        real_tokens: torch.Tensor,
        outputs: torch.Tensor,
    ) -> None:
        """Count one pass's rows of one task: chosen parents per memory layer [rows, seq, k], the rows'
        real tokens [rows, seq] and head outputs [rows, num_outputs]."""
        spec = memory.spec
        counts = count_choices(
            layer_parents,
            real_tokens,
            predicted_buckets(spec, outputs),
            len(bucket_names(spec)),
            spec.num_parents,
        )
        self.add(task, memory.version, counts, rows=int(real_tokens.shape[0]), tokens=int(real_tokens.sum()))

    def add(self, task: str, version: str, counts: torch.Tensor, *, rows: int, tokens: int) -> None:
        """Add counts [memory layers, labels, parents] of `rows` rows with `tokens` real tokens."""
        with self._lock:
            current = self._tasks.get(task)
            if current is None or current.version != version:
                return  # an unannounced task, or rows of a replaced version
            current.counts += counts
            current.rows += rows
            current.tokens += tokens

    def snapshot(self, task: str) -> RoutingSnapshot | None:
        """The task's statistics now; None if no memory of it was installed (or it was unregistered)."""
        with self._lock:
            current = self._tasks.get(task)
            if current is None:
                return None
            spec = current.spec
            return RoutingSnapshot(
                task,
                current.version,
                spec.task_type,
                bucket_names(spec),
                spec.num_parents,
                spec.top_k,
                current.rows,
                current.tokens,
                current.counts.clone(),
                tuple(spec.memory_layer_indices),
            )

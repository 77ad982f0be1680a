"""The one shape every dataset loads into: `TaskData` (train/dev/test lists of `Example`, class names)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from app.errors import DatasetError
from app.spartan.memory import TaskType

TASK_TYPES: tuple[TaskType, ...] = ("classification", "regression")


@dataclass(frozen=True)
class Example:
    text: str
    label: str | float  # class name (classification) or target value (regression)
    text_pair: str | None = None


@dataclass(frozen=True)
class FileRead:
    """What reading one user file found: rows read, physical lines, and what looked wrong."""

    path: Path
    rows: int
    lines: int
    warnings: tuple[str, ...] = ()

    def summary(self) -> str:
        return f"{self.path}: {self.rows} rows read ({self.lines} lines)"


def name_some(names: Iterable[str], shown: int = 5) -> str:
    """The first few names, quoted, and how many there are: one line even for 150 classes."""
    names = list(names)
    head = ", ".join(repr(n) for n in names[:shown])
    more = f", ... ({len(names)} in all)" if len(names) > shown else f" ({len(names)})"
    return head + more


def label_difference(expected: Iterable[str], found: Iterable[str]) -> str:
    """Which labels of `found` are not `expected` (extra) and which `expected` ones are absent (missing)."""
    expected, found = list(expected), list(found)
    expected_set, found_set = set(expected), set(found)
    extra = [label for label in dict.fromkeys(found) if label not in expected_set]
    missing = [label for label in expected if label not in found_set]
    parts = [
        f"extra labels {name_some(extra)}" if extra else "",
        f"missing labels {name_some(missing)}" if missing else "",
    ]
    return "; ".join(part for part in parts if part) or "the same labels in another order"


@dataclass(frozen=True)
class TaskData:
    """A task's splits. `labels` orders the classes: class i of a model is labels[i]."""

    name: str
    task_type: TaskType
    labels: tuple[str, ...]  # () for regression
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    reads: tuple[FileRead, ...] = field(default=(), compare=False, kw_only=True)  # user files only

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise DatasetError(f"task {self.name}: unknown task type {self.task_type!r}")
        if self.task_type == "regression":
            if self.labels:
                raise DatasetError(f"task {self.name}: a regression task has no class labels")
            return
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise DatasetError(f"task {self.name}: class labels must be non-empty and unique")
        known = set(self.labels)
        stray = dict.fromkeys(
            str(ex.label) for s in (self.train, self.dev, self.test) for ex in s if ex.label not in known
        )
        if stray:
            raise DatasetError(
                f"task {self.name}: labels not among its {len(self.labels)} classes: {name_some(stray)}"
            )

    @functools.cached_property
    def has_pairs(self) -> bool:
        """True when examples are sentence pairs (the model then encodes text and text_pair together)."""
        return any(ex.text_pair is not None for split in (self.train, self.dev, self.test) for ex in split)

    @functools.cached_property
    def _label_ids(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def label_index(self, example: Example) -> int | float:
        """The class id of a classification example, or the target value of a regression one."""
        if self.task_type == "regression":
            return float(example.label)
        try:
            return self._label_ids[cast(str, example.label)]
        except KeyError:
            raise DatasetError(f"label {example.label!r} is not a label of task {self.name}") from None


def ordered_labels(names: Iterable[str]) -> tuple[str, ...]:
    """Deterministic class order: numeric when every name is an integer, else sorted."""
    unique = set(names)
    if unique and all(re.fullmatch(r"-?\d+", n) for n in unique):
        return tuple(sorted(unique, key=int))
    return tuple(sorted(unique))

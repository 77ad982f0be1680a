"""The one shape every dataset loads into: `TaskData` (train/dev/test lists of `Example`, class names)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
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
class TaskData:
    """A task's splits. `labels` orders the classes: class i of a model is labels[i]."""

    name: str
    task_type: TaskType
    labels: tuple[str, ...]  # () for regression
    train: list[Example]
    dev: list[Example]
    test: list[Example]

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
        for split in (self.train, self.dev, self.test):
            stray = next((ex.label for ex in split if ex.label not in known), None)
            if stray is not None:
                raise DatasetError(f"task {self.name}: label {stray!r} is not one of {list(self.labels)}")

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

"""Tasks from the user's own CSV, TSV or JSONL files (`spartan train --train-file ...`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from app.errors import DatasetError
from app.spartan.memory import TaskType
from app.training.datasets.readers import as_number, field_value, read_records, text_value
from app.training.datasets.sampling import split_examples
from app.training.datasets.types import TASK_TYPES, Example, FileRead, TaskData, ordered_labels


@dataclass(frozen=True)
class _Raw:
    """A row before the task type is known: the label is still the raw cell or JSON value."""

    where: str  # "file: line N", for error messages
    text: str
    pair: str | None
    label: object


def _raw_examples(
    path: Path, text_column: str, label_column: str, pair_column: str | None
) -> tuple[list[_Raw], FileRead]:
    records, read = read_records(path)
    if path.suffix.lower() in (".csv", ".tsv", ".tab"):  # tables: check the header once
        columns = list(records[0][1])
        for column in (text_column, label_column, pair_column):
            if column is not None and column not in columns:
                raise DatasetError(f"{path} has no column {column!r} (columns: {', '.join(columns)})")
    raws = [
        _Raw(
            where=f"{path}: line {line}",
            text=text_value(path, line, record, text_column),
            pair=text_value(path, line, record, pair_column) if pair_column else None,
            label=field_value(path, line, record, label_column),
        )
        for line, record in records
    ]
    return raws, read


def infer_task_type(raw_labels: Sequence[object]) -> TaskType:
    """Regression only when every label is a number and some are not whole: 0/1 labels are classes."""
    numbers = [as_number(v) for v in raw_labels]
    if all(n is not None for n in numbers) and any(n is not None and not n.is_integer() for n in numbers):
        return "regression"
    return "classification"


def class_namer(raw_labels: Sequence[object]) -> Callable[[object], str]:
    numbers = [as_number(v) for v in raw_labels]
    if all(n is not None and n.is_integer() for n in numbers):
        # "1", "1.0" and 1 are one class, named "1".
        return lambda v: str(int(cast(float, as_number(v))))

    def name(value: object) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        return value.strip() if isinstance(value, str) else str(value)

    return name


def _to_examples(raws: Sequence[_Raw], task_type: TaskType, namer: Callable[[object], str]) -> list[Example]:
    examples = []
    for raw in raws:
        label: str | float
        if task_type == "regression":
            number = as_number(raw.label)
            if number is None:
                raise DatasetError(f"{raw.where}: label {raw.label!r} is not a number (regression task)")
            label = number
        else:
            label = namer(raw.label)
        examples.append(Example(raw.text, label, raw.pair))
    return examples


def _fill_missing_splits(
    train: list[Example], dev: list[Example] | None, test: list[Example] | None, seed: int, stratify: bool
) -> tuple[list[Example], list[Example], list[Example]]:
    """Cut absent dev/test splits out of train: 80/10/10 when both are absent, else 90/10."""
    if dev is None and test is None:
        train, dev, test = split_examples(train, (0.8, 0.1, 0.1), seed, stratify=stratify)
        return train, dev, test
    if dev is None:
        train, dev = split_examples(train, (0.9, 0.1), seed, stratify=stratify)
    if test is None:
        train, test = split_examples(train, (0.9, 0.1), seed, stratify=stratify)
    return train, dev, test


def _read_splits(
    paths: Mapping[str, Path | None],
    text_column: str,
    label_column: str,
    pair_column: str | None,
    task_type: str | None,
) -> tuple[TaskType, dict[str, list[Example]], tuple[FileRead, ...]]:
    """Each given file's examples, under one task type and one label naming for all of them."""
    if task_type is not None and task_type not in TASK_TYPES:
        raise DatasetError(f"unknown task type {task_type!r}; use one of {', '.join(TASK_TYPES)}")
    read = {
        split: _raw_examples(Path(path), text_column, label_column, pair_column)
        for split, path in paths.items()
        if path is not None
    }
    all_labels = [r.label for rows, _ in read.values() for r in rows]
    kind = task_type if task_type is not None else infer_task_type(all_labels)
    namer = class_namer(all_labels)
    splits = {split: _to_examples(rows, kind, namer) for split, (rows, _) in read.items()}
    return kind, splits, tuple(file_read for _, file_read in read.values())


def _labels_of(kind: TaskType, *splits: Sequence[Example]) -> tuple[str, ...]:
    if kind != "classification":
        return ()
    return ordered_labels(str(ex.label) for split in splits for ex in split)


def load_files(
    train: Path,
    *,
    dev: Path | None = None,
    test: Path | None = None,
    text_column: str = "text",
    label_column: str = "label",
    pair_column: str | None = None,
    task_type: str | None = None,
    seed: int = 42,
    name: str | None = None,
) -> TaskData:
    """Load a task from CSV, TSV or JSONL files (format by extension; CSV/TSV need a header row).

    The task type is `task_type` when given, else regression when every label is a number and some
    are not whole, else classification. Missing dev/test splits are cut from train with a fixed
    seeded split (stratified for classification). The name defaults to the train file's stem (its
    folder's name when the stem is just "train"). `reads` says how many rows each file gave and
    what in it looked wrong.
    """
    paths = {"train": train, "dev": dev, "test": test}
    kind, splits, reads = _read_splits(paths, text_column, label_column, pair_column, task_type)
    stratify = kind == "classification"
    tr, dv, ts = _fill_missing_splits(splits["train"], splits.get("dev"), splits.get("test"), seed, stratify)
    task_name = name or (Path(train).parent.name if Path(train).stem == "train" else Path(train).stem)
    return TaskData(task_name, kind, _labels_of(kind, tr, dv, ts), tr, dv, ts, reads=reads)


def load_test_file(
    test: Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    pair_column: str | None = None,
    task_type: str | None = None,
) -> TaskData:
    """One file as a test split, every row of it, nothing cut off (train and dev are empty): what
    `spartan eval --test-file` scores."""
    kind, splits, reads = _read_splits({"test": test}, text_column, label_column, pair_column, task_type)
    examples = splits["test"]
    return TaskData(Path(test).stem, kind, _labels_of(kind, examples), [], [], examples, reads=reads)

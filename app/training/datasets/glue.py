"""GLUE task folders (train.tsv, dev.tsv, ...) as the GLUE benchmark distributes them."""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from app.errors import DatasetError
from app.spartan.memory import TaskType
from app.training.datasets.readers import Row, read_rows
from app.training.datasets.sampling import split_examples
from app.training.datasets.types import Example, TaskData, ordered_labels


@dataclass(frozen=True)
class _GlueTask:
    """Where a GLUE task keeps its fields: column names, or indices for CoLA's header-less files."""

    name: str
    text: str | int
    pair: str | int | None
    label: str | int
    task_type: TaskType = "classification"
    dev_file: str = "dev.tsv"

    @property
    def has_header(self) -> bool:
        return isinstance(self.text, str)


_GLUE_TASKS: dict[str, _GlueTask] = {
    t.name: t
    for t in (
        _GlueTask("cola", 3, None, 1),  # source, label, original mark, sentence; no header
        _GlueTask("sst2", "sentence", None, "label"),
        _GlueTask("mrpc", "#1 String", "#2 String", "Quality"),
        _GlueTask("qqp", "question1", "question2", "is_duplicate"),
        _GlueTask("stsb", "sentence1", "sentence2", "score", task_type="regression"),
        _GlueTask("mnli", "sentence1", "sentence2", "gold_label", dev_file="dev_matched.tsv"),
        _GlueTask("qnli", "question", "sentence", "label"),
        _GlueTask("rte", "sentence1", "sentence2", "label"),
        _GlueTask("wnli", "sentence1", "sentence2", "label"),
    )
}


def _glue_task_from_header(header: Sequence[str]) -> _GlueTask | None:
    columns = set(header)
    checks: list[tuple[set[str], str]] = [
        ({"#1 String", "#2 String"}, "mrpc"),
        ({"question1", "question2"}, "qqp"),
        ({"gold_label"}, "mnli"),
        ({"sentence1", "sentence2", "score"}, "stsb"),
        ({"question", "sentence"}, "qnli"),
        ({"sentence1", "sentence2", "label"}, "rte"),  # WNLI has the same layout
        ({"sentence", "label"}, "sst2"),
    ]
    for needed, name in checks:
        if needed <= columns:
            return _GLUE_TASKS[name]
    if len(header) == 4 and header[1] in ("0", "1"):
        return _GLUE_TASKS["cola"]  # a data row: CoLA files have no header
    return None


def _detect_glue_task(folder: Path, train_rows: Sequence[Row]) -> _GlueTask:
    key = re.sub(r"[^a-z0-9]", "", folder.name.lower())
    if key in _GLUE_TASKS:
        return _GLUE_TASKS[key]
    task = _glue_task_from_header(train_rows[0][1]) if train_rows else None
    if task is None:
        raise DatasetError(
            f"{folder}: cannot tell which GLUE task this is from its name or train.tsv columns "
            f"(known: {', '.join(_GLUE_TASKS)})"
        )
    return task


def _fields_of(task: _GlueTask) -> tuple[tuple[str, str | int | None], ...]:
    return (("t", task.text), ("p", task.pair), ("l", task.label))


def _glue_examples(path: Path, rows: Sequence[Row], task: _GlueTask) -> list[Example]:
    """Rows with a usable label; malformed rows (known in QQP) and MNLI's "-" labels are skipped."""
    if not rows:
        raise DatasetError(f"{path} is empty")
    if task.has_header:
        header = {name.strip(): i for i, name in enumerate(rows[0][1])} if rows else {}
        missing = [c for c in (task.text, task.pair, task.label) if isinstance(c, str) and c not in header]
        if missing:
            raise DatasetError(f"{path} has no column {missing[0]!r} (GLUE {task.name})")
        index = {k: header[cast(str, c)] for k, c in _fields_of(task) if c is not None}
        rows = rows[1:]
    else:
        index = {k: cast(int, c) for k, c in _fields_of(task) if c is not None}
    width = max(index.values()) + 1
    examples = []
    for _, fields in rows:
        if len(fields) < width or fields[index["l"]].strip() in ("", "-"):
            continue
        label = fields[index["l"]].strip()
        pair = fields[index["p"]] if "p" in index else None
        value: str | float = float(label) if task.task_type == "regression" else label
        examples.append(Example(fields[index["t"]], value, pair))
    if not examples:
        raise DatasetError(f"{path} has no labelled rows for GLUE {task.name}")
    return examples


def load_glue(folder: Path, *, seed: int = 42) -> TaskData:
    """Load a GLUE task folder (train.tsv, dev.tsv, ...) as distributed by the GLUE benchmark.

    The task is recognised from the folder name (SST-2, CoLA, MRPC, RTE, QNLI, QQP, MNLI, STS-B,
    WNLI; case and punctuation ignored) or else from train.tsv's columns. GLUE's test.tsv has no
    labels, so: our test split is GLUE's dev split (dev_matched.tsv for MNLI), and our dev split is
    a seeded 10% of GLUE's train split (stratified for classification), held out from training.
    STS-B is a regression task (score 0..5). Files are read without quote handling, as GLUE's own
    loaders do; rows with too few fields or no gold label are skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder")
    train_rows = read_rows(folder / "train.tsv", "\t", quoting=csv.QUOTE_NONE)
    task = _detect_glue_task(folder, train_rows)
    dev_path = folder / task.dev_file
    full_train = _glue_examples(folder / "train.tsv", train_rows, task)
    test = _glue_examples(dev_path, read_rows(dev_path, "\t", quoting=csv.QUOTE_NONE), task)
    stratify = task.task_type == "classification"
    train, dev = split_examples(full_train, (0.9, 0.1), seed, stratify=stratify)
    labels = ordered_labels(str(ex.label) for ex in (*full_train, *test)) if stratify else ()
    return TaskData(task.name, task.task_type, labels, train, dev, test)

"""A training job's data: parsed from the request body and checked row by row before anything trains.

Three ways in, one set of rules: a JSON body (`{"rows": [...], "dev_rows": [...], "test_rows": [...]}`,
each row `{"text", "text_pair"?, "label"}`), or a JSONL, CSV or TSV file (rows of the training split;
columns `text`, `label` and an optional `text_pair`). Each refusal is a TrainingDataInvalid that names
the split, the row (and the file's line) and a reason code, so nothing is queued, let alone trained,
on data that could not make a memory. Task type and class names follow `spartan train --train-file`
(app/training/datasets/files.py): integer labels are classes, numbers with fractions a regression.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from app.errors import MemoryInvalid, TrainingDataInvalid
from app.jobs.options import JobOptions
from app.spartan.memfile import parse_spec, spec_metadata
from app.spartan.memory import MemorySpec, TaskType
from app.training.datasets import (
    Example,
    TaskData,
    class_namer,
    few_shot,
    infer_task_type,
    name_some,
    ordered_labels,
    split_examples,
)
from app.training.datasets.readers import as_number

DataFormat = Literal["json", "jsonl", "csv", "tsv"]
SPLITS = ("train", "dev", "test")
_JSON_KEYS = {"rows": "train", "dev_rows": "dev", "test_rows": "test"}
_ABSENT = object()  # a row without the field at all (not the same as an empty one)
MAX_INTEGER_LABEL = 2**53  # beyond it an integer is no longer exactly a float (and 10**400 is none)


@dataclass(frozen=True)
class DataLimits:
    max_rows: int
    max_labels: int
    max_text_chars: int
    num_layers: int  # of the served backbone (the recipe depends on it)


@dataclass(frozen=True)
class RawRow:
    """One row as sent: its place (split, row number, file line) and its fields, not yet checked."""

    split: str
    row: int  # 1-based within its split
    line: int | None  # 1-based line of a JSONL/CSV file; None in a JSON body
    text: object
    pair: object
    label: object

    @property
    def where(self) -> str:
        return f"{self.split} row {self.row}" + (f" (line {self.line})" if self.line is not None else "")

    def refuse(self, reason: str, problem: str) -> TrainingDataInvalid:
        return TrainingDataInvalid(
            f"{self.where}: {problem}", split=self.split, row=self.row, line=self.line, reason=reason
        )


def _refuse(reason: str, message: str, split: str | None = None) -> TrainingDataInvalid:
    return TrainingDataInvalid(message, split=split, row=None, line=None, reason=reason)


# ------------------------------------------------------------------------------------------ parsing


def _decode(body: bytes, what: str) -> str:
    try:
        return body.decode("utf-8-sig")  # -sig: a spreadsheet's BOM is not part of the first column
    except UnicodeDecodeError as err:
        raise _refuse("not_utf8", f"{what} is not UTF-8 text (bad byte at offset {err.start})") from None


def _strict_json(text: str) -> Any:
    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=constant)


def rows_from_json(body: bytes) -> dict[str, list[RawRow]]:
    """`{"rows": [...], "dev_rows": [...]?, "test_rows": [...]?}`: rows of each split given."""
    try:
        value = _strict_json(_decode(body, "the body"))
    except ValueError as err:
        raise _refuse("malformed", f"the body is not valid JSON ({err})") from None
    except RecursionError:
        raise _refuse("malformed", "the body nests JSON too deeply to be rows") from None
    if not isinstance(value, dict):
        raise _refuse("malformed", 'the body must be a JSON object: {"rows": [{"text": ..., "label": ...}]}')
    unknown = [key for key in value if key not in _JSON_KEYS]
    if unknown:
        raise _refuse(
            "unknown_field",
            f"unknown field(s) {name_some(unknown)} in the body: it holds rows, dev_rows and test_rows "
            "(options are query parameters)",
        )
    if "rows" not in value:
        raise _refuse("missing_rows", 'the body has no "rows" (the training rows)', "train")
    splits: dict[str, list[RawRow]] = {}
    for key, split in _JSON_KEYS.items():
        if key not in value or (split != "train" and value[key] is None):
            continue
        items = value[key]
        if not isinstance(items, list):
            raise _refuse("malformed", f'"{key}" must be a list of rows', split)
        splits[split] = [_json_row(split, number, None, item) for number, item in enumerate(items, start=1)]
    return splits


def _json_row(split: str, number: int, line: int | None, item: object) -> RawRow:
    if not isinstance(item, dict):
        row = RawRow(split, number, line, _ABSENT, _ABSENT, _ABSENT)
        raise row.refuse("malformed", f'not a JSON object {{"text": ..., "label": ...}} (got {_kind(item)})')
    return RawRow(
        split,
        number,
        line,
        item.get("text", _ABSENT),
        item.get("text_pair", _ABSENT),
        item.get("label", _ABSENT),
    )


def rows_from_file(body: bytes, data_format: DataFormat, split: str = "train") -> list[RawRow]:
    """The rows of a JSONL, CSV or TSV file (CSV and TSV with a header row)."""
    text = _decode(body, f"the {split} file")
    if data_format == "jsonl":
        return _jsonl_rows(text, split)
    if data_format in ("csv", "tsv"):
        return _table_rows(text, "," if data_format == "csv" else "\t", split)
    raise _refuse("unsupported_format", f"a {data_format} body is not a file of rows", split)


def _jsonl_rows(text: str, split: str) -> list[RawRow]:
    rows: list[RawRow] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = _strict_json(line)
        except (ValueError, RecursionError) as err:
            row = RawRow(split, len(rows) + 1, line_number, _ABSENT, _ABSENT, _ABSENT)
            raise row.refuse("malformed", f"not valid JSON ({err})") from None
        rows.append(_json_row(split, len(rows) + 1, line_number, item))
    return rows


def _table_rows(text: str, delimiter: str, split: str) -> list[RawRow]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[RawRow] = []
    header: list[str] | None = None
    line = 1
    try:
        for fields in reader:
            if fields and any(f.strip() for f in fields):
                if header is None:
                    header = [h.strip() for h in fields]
                    missing = [c for c in ("text", "label") if c not in header]
                    if missing:
                        raise _refuse(
                            "missing_column",
                            f"the {split} file's header ({', '.join(header)}) has no column "
                            f"{name_some(missing)}: it needs text, label and optionally text_pair",
                            split,
                        )
                else:
                    record = {c: fields[i] if i < len(fields) else None for i, c in enumerate(header)}
                    rows.append(
                        RawRow(
                            split,
                            len(rows) + 1,
                            line,
                            record.get("text"),
                            record.get("text_pair", _ABSENT),
                            record.get("label"),
                        )
                    )
            line = reader.line_num + 1
    except csv.Error as err:
        raise _refuse("malformed", f"the {split} file: line {line}: {err}", split) from None
    return rows


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


# ------------------------------------------------------------------------------------------ checks


def _checked_text(row: RawRow, value: object, field: str, limit: int) -> str:
    if value is _ABSENT or value is None:
        raise row.refuse(f"missing_{field}", f"no {field}")
    if not isinstance(value, str):
        raise row.refuse(f"{field}_not_text", f"{field} must be text, got {_kind(value)}")
    if not value.strip():
        raise row.refuse(f"empty_{field}", f"empty {field}")
    if len(value) > limit:
        raise row.refuse(
            f"{field}_too_long",
            f"{field} has {len(value)} characters, more than {limit} (SPARTAN_MAX_TEXT_CHARS)",
        )
    if any(0xD800 <= ord(char) <= 0xDFFF for char in value):
        raise row.refuse(f"{field}_not_text", f"{field} holds a lone surrogate (not valid Unicode text)")
    return value


def _checked_label(row: RawRow) -> object:
    value = row.label
    if value is _ABSENT or value is None or (isinstance(value, str) and not value.strip()):
        raise row.refuse("missing_label", "no label" if not isinstance(value, str) else "empty label")
    if not isinstance(value, str | int | float | bool):
        raise row.refuse("bad_label", f"a label is text or a number, got {_kind(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise row.refuse("bad_label", f"label {value} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INTEGER_LABEL:
        raise row.refuse("bad_label", f"label {str(value)[:20]}... is too large a number")
    return value


def _label_problem(label: str) -> str | None:
    """Why a memory file could not carry this class name: the memory file's own rule (length,
    invisible characters), asked of its parser, so the rule lives in one place."""
    spec = MemorySpec(
        1, 1, task_type="regression", labels=(label,), backbone_id="-", backbone_fingerprint="-"
    )
    try:
        parse_spec(spec_metadata(spec))
    except MemoryInvalid as err:
        return str(err).removeprefix("metadata labels: label 0 ")
    return None


@dataclass(frozen=True)
class _Checked:
    """A row whose text, pair and label passed their checks; the label not yet named or converted."""

    row: RawRow
    text: str
    pair: str | None
    label: object


def _checked(row: RawRow, limits: DataLimits) -> _Checked:
    text = _checked_text(row, row.text, "text", limits.max_text_chars)
    pair = None if row.pair is _ABSENT or row.pair is None else row.pair
    if pair is not None:
        pair = _checked_text(row, pair, "text_pair", limits.max_text_chars)
    return _Checked(row, text, pair, _checked_label(row))


def _examples(rows: Sequence[_Checked], task_type: TaskType) -> list[Example]:
    namer = class_namer([row.label for row in rows])
    examples = []
    for checked in rows:
        label: str | float
        if task_type == "regression":
            number = as_number(checked.label)
            if number is None:
                raise checked.row.refuse(
                    "label_not_number", f"label {checked.label!r} is not a number (a regression task)"
                )
            label = number
        else:
            label = namer(checked.label)
        examples.append(Example(checked.text, label, checked.pair))
    return examples


def _check_classes(rows: Sequence[RawRow], examples: Sequence[Example], limits: DataLimits) -> None:
    first_row: dict[str, RawRow] = {}
    for row, example in zip(rows, examples, strict=True):
        label = str(example.label)
        if label not in first_row:
            first_row[label] = row
            if len(first_row) > limits.max_labels:
                raise row.refuse(
                    "too_many_labels",
                    f"label {label!r} is class {len(first_row)}, more than {limits.max_labels} classes "
                    "(SPARTAN_MAX_TRAINING_LABELS)",
                )
            if (problem := _label_problem(label)) is not None:
                raise row.refuse("bad_label", f"label {problem}")
    if len(first_row) < 2:
        only = ", ".join(repr(label) for label in first_row)
        raise _refuse(
            "one_class",
            f"all {len(examples)} rows have one class ({only}): a classifier needs at least 2 classes",
        )


def training_data(
    task: str, splits: Mapping[str, Sequence[RawRow]], options: JobOptions, limits: DataLimits
) -> TaskData:
    """The task's train/dev/test examples, checked, with dev and test cut from the training rows
    (seeded, stratified) where not given, and the few-shot sample taken; TrainingDataInvalid otherwise."""
    options.train_config(limits.num_layers)  # options that do not fit together are refused first
    rows = [row for split in SPLITS for row in splits.get(split, ())]
    if not splits.get("train"):
        raise _refuse("no_rows", "no training rows", "train")
    if len(rows) > limits.max_rows:
        raise rows[limits.max_rows].refuse(
            "too_many_rows", f"more than {limits.max_rows} rows in all (SPARTAN_MAX_TRAINING_ROWS)"
        )
    checked = [_checked(row, limits) for row in rows]  # in row order: the first bad row is named
    task_type = options.task_type or infer_task_type([c.label for c in checked])
    examples = _examples(checked, task_type)
    if task_type == "classification":
        _check_classes(rows, examples, limits)
    by_split: dict[str, list[Example]] = {split: [] for split in SPLITS}
    for row, example in zip(rows, examples, strict=True):
        by_split[row.split].append(example)
    train, dev, test = _cut_splits(by_split, set(splits), options, task_type == "classification")
    labels = ordered_labels(str(ex.label) for ex in examples) if task_type == "classification" else ()
    data = TaskData(task, task_type, labels, train, dev, test)
    return _few_shot(data, options, set(splits))


def _cut_splits(
    by_split: dict[str, list[Example]], given: set[str], options: JobOptions, stratify: bool
) -> tuple[list[Example], list[Example], list[Example]]:
    """Dev and test cut from train where they were not given: dev_fraction and test_fraction of it."""
    fractions = {
        split: fraction
        for split, fraction in (("dev", options.dev_fraction), ("test", options.test_fraction))
        if split not in given
    }
    train = by_split["train"]
    if fractions:
        shares = (1.0 - sum(fractions.values()), *fractions.values())
        parts = split_examples(train, shares, options.seed_value, stratify=stratify)
        train = parts[0]
        by_split.update(zip(fractions, parts[1:], strict=True))
    if not train:
        raise _refuse(
            "no_rows",
            f"no training rows are left once dev ({len(by_split['dev'])}) and test ({len(by_split['test'])}) "
            "are cut from them: send more rows or lower dev_fraction / test_fraction",
            "train",
        )
    return train, by_split["dev"], by_split["test"]


def _few_shot(data: TaskData, options: JobOptions, given: set[str]) -> TaskData:
    if data.task_type == "classification":
        missing = [label for label in data.labels if label not in {str(ex.label) for ex in data.train}]
        if missing:
            where = (
                "only in the dev or test rows" if given - {"train"} else "too rarely to be kept for training"
            )
            raise _refuse(
                "class_without_training_rows",
                f"class(es) {name_some(missing)} have no training row (they appear {where}): a class never "
                "trained on can never be predicted",
                "train",
            )
    if options.few_shot is None or options.few_shot >= len(data.train):
        return data
    if data.task_type == "classification" and options.few_shot < len(data.labels):
        raise _refuse(
            "few_shot_too_small",
            f"few_shot {options.few_shot} is less than the {len(data.labels)} classes: some class would have "
            "no training example",
            "train",
        )
    return few_shot(data, options.few_shot, seed=options.seed_value)

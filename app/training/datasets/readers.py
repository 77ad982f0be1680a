"""Reading delimited (CSV/TSV) and JSONL files into numbered records, and checked cell values."""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from app.errors import DatasetError
from app.training.datasets.types import FileRead


@functools.cache
def _allow_large_fields() -> None:
    # 20 Newsgroups documents exceed csv's default 128 KiB field limit.
    csv.field_size_limit(2**31 - 1)


def read_text(path: Path) -> str:
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: drop a BOM (Excel, MRPC)
            return f.read()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path} is not UTF-8 text (bad byte at offset {err.start})") from None
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err.strerror or err}") from None


Row = tuple[int, list[str]]  # (line number, fields)
_Quoting = Literal[0, 1, 2, 3]  # csv.QUOTE_*


def read_rows(path: Path, delimiter: str, *, quoting: _Quoting = csv.QUOTE_MINIMAL) -> list[Row]:
    """All non-blank rows of a delimited file, with the line each starts on."""
    _allow_large_fields()
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter, quoting=quoting)
    rows: list[Row] = []
    line = 1
    try:
        for fields in reader:
            if fields and any(f.strip() for f in fields):
                rows.append((line, fields))
            line = reader.line_num + 1
    except csv.Error as err:
        raise DatasetError(f"{path}: line {line}: {err}") from None
    return rows


Record = tuple[int, Mapping[str, object]]  # (line number, column -> value)


def table_records(path: Path, delimiter: str) -> list[Record]:
    rows = read_rows(path, delimiter)
    if not rows:
        raise DatasetError(f"{path} is empty")
    header = [h.strip() for h in rows[0][1]]
    if len(rows) == 1:
        raise DatasetError(f"{path} has a header but no data rows")
    return [(line, as_record(header, fields)) for line, fields in rows[1:]]


def as_record(header: Sequence[str], fields: Sequence[str]) -> dict[str, object]:
    """Column -> value; a short row gets None for its missing columns (reported as empty values)."""
    return {column: fields[i] if i < len(fields) else None for i, column in enumerate(header)}


def _jsonl_records(path: Path) -> list[Record]:
    records: list[Record] = []
    for line_no, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: line {line_no} is not valid JSON ({err.msg})") from None
        if not isinstance(value, dict):
            raise DatasetError(f"{path}: line {line_no} is not a JSON object")
        records.append((line_no, value))
    if not records:
        raise DatasetError(f"{path} is empty")
    return records


def read_records(path: Path) -> tuple[list[Record], FileRead]:
    """A user file's records, and what reading it found (rows, lines, fields that look wrong)."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".tab"):
        records = table_records(path, "," if suffix == ".csv" else "\t")
        return records, check_table(path, records)
    if suffix in (".jsonl", ".ndjson"):
        records = _jsonl_records(path)
        return records, FileRead(path, len(records), records[-1][0])
    raise DatasetError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv or .jsonl)")


# A field this many times its column's median length (and at least LONG_FIELD_MIN_CHARS) looks like
# a stray quote that swallowed the rows after it; so does a field with line breaks.
LONG_FIELD_FACTOR = 20
LONG_FIELD_MIN_CHARS = 1000


def check_table(path: Path, records: Sequence[Record]) -> FileRead:
    """Count rows and lines; warn on quoted fields that span lines or dwarf the rest of their column.

    Either is legal CSV, but it is also what an unbalanced quote looks like: the reader then takes
    everything up to the next quote, often thousands of lines, as one field, and loads silently.
    """
    last_line, last = records[-1]
    lines = last_line + sum(str(v).count("\n") for v in last.values() if isinstance(v, str))
    multiline: list[tuple[int, str, int]] = []  # (line, column, lines spanned)
    long: list[tuple[int, str, int, float]] = []  # (line, column, chars, column median)
    columns = list(records[0][1])
    for column in columns:
        cells = [(line, v) for line, rec in records if isinstance(v := rec.get(column), str)]
        median = statistics.median(len(v) for _, v in cells) if cells else 0.0
        for line, value in cells:
            breaks = value.count("\n") + value.count("\r") - value.count("\r\n")
            if breaks:
                multiline.append((line, column, breaks + 1))
            if len(value) >= LONG_FIELD_MIN_CHARS and len(value) > LONG_FIELD_FACTOR * median:
                long.append((line, column, len(value), median))
    warnings = []
    if multiline:
        line, column, spanned = max(multiline, key=lambda m: m[2])
        warnings.append(
            f"{path}: {len(multiline)} field(s) contain line breaks, the longest in column {column!r} at "
            f"line {line}, spanning {spanned} lines: an unbalanced quote swallows the rows after it"
        )
    if long:
        line, column, chars, median = max(long, key=lambda m: m[2])
        warnings.append(
            f"{path}: {len(long)} field(s) are over {LONG_FIELD_FACTOR}x their column's median length, "
            f"the longest in column {column!r} at line {line} ({chars} characters, median {median:.0f})"
        )
    return FileRead(path, len(records), lines, tuple(warnings))


def field_value(path: Path, line: int, record: Mapping[str, object], column: str) -> object:
    if column not in record:
        raise DatasetError(f"{path}: line {line} has no column {column!r} (columns: {', '.join(record)})")
    value = record[column]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DatasetError(f"{path}: line {line}: empty value in column {column!r}")
    return value


def text_value(path: Path, line: int, record: Mapping[str, object], column: str) -> str:
    value = field_value(path, line, record, column)
    if not isinstance(value, str):
        raise DatasetError(f"{path}: line {line}: column {column!r} must be text, got {value!r}")
    return value


def as_number(value: object) -> float | None:
    """The value as a finite float, or None (bools are not numbers here)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None

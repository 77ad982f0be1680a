"""What the registry knows of each task: its record (stored file, resident memory, counts), the facts
of a stored file, how a task is reported, and the rule for replacing one.

Plain data and pure functions: the registry owns the records and the lock that guards them.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from app.errors import MemoryConflict, MemoryInvalid
from app.registry.store import StoredFile
from app.spartan.memfile import (
    BackboneIdentity,
    check_backbone,
    check_tensor_entries,
    parse_spec,
    read_header,
)
from app.spartan.memory import MemorySpec, TaskMemory, TaskType

TaskStatus = Literal["loaded", "on_disk", "invalid"]


@dataclass(frozen=True)
class FileFacts:
    """What one version of a stored file is: read once per stamp (hash + header checks, no tensors)."""

    stored: StoredFile
    version: str
    spec: MemorySpec | None
    error: str | None = None  # why this file cannot be served


@dataclass(frozen=True)
class TaskInfo:
    """A task as the registry reports it."""

    name: str
    status: TaskStatus
    version: str | None  # sha256 of the stored file
    loaded_version: str | None  # sha256 of the resident memory (differs while a bad new file is ignored)
    task_type: TaskType | None
    labels: tuple[str, ...]
    text_pairs: bool | None
    max_length: int | None
    file_bytes: int | None
    memory_bytes: int
    pinned: bool
    load_seconds: float | None
    error: str | None
    requests: dict[str, int]
    spec: MemorySpec | None = None  # of the resident memory, else of the stored file (None if unreadable)


@dataclass(frozen=True)
class PutResult:
    created: bool
    info: TaskInfo


@dataclass
class TaskRecord:
    """One task's live state. `lock` is held while its file is read, validated and swapped in."""

    name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    file: FileFacts | None = None  # None: a placeholder (an upload in progress), not registered
    memory: TaskMemory | None = None
    memory_bytes: int = 0
    load_seconds: float | None = None
    deleted: bool = False
    requests: Counter[str] = field(default_factory=Counter)


def memory_nbytes(memory: TaskMemory) -> int:
    """Bytes a memory keeps resident while it serves, inference caches included. Counted up front,
    so the LRU budget holds before the first request."""
    return memory.resident_bytes()


def describe_file(data: bytes, stored: StoredFile, identity: BackboneIdentity) -> FileFacts:
    """Hash and header-level checks of a stored file (tensors are only read when it is loaded)."""
    version = hashlib.sha256(data).hexdigest()
    try:
        header = read_header(data)
        spec = parse_spec(header.get("__metadata__"))
        check_backbone(spec, identity)
        check_tensor_entries(header, spec)
    except MemoryInvalid as err:
        return FileFacts(stored, version, None, str(err))
    return FileFacts(stored, version, spec)


def task_info(record: TaskRecord, *, pinned: bool) -> TaskInfo:
    facts, memory = record.file, record.memory
    spec = memory.spec if memory is not None else (facts.spec if facts else None)
    status: TaskStatus = "loaded" if memory else ("invalid" if facts and facts.error else "on_disk")
    return TaskInfo(
        name=record.name,
        status=status,
        version=facts.version if facts else None,
        loaded_version=memory.version if memory else None,
        task_type=spec.task_type if spec else None,
        labels=spec.labels if spec and spec.task_type == "classification" else (),
        text_pairs=spec.text_pairs if spec else None,
        max_length=spec.max_length if spec else None,
        file_bytes=facts.stored.size if facts else None,
        memory_bytes=record.memory_bytes,
        pinned=pinned,
        load_seconds=record.load_seconds,
        error=facts.error if facts else None,
        requests=dict(record.requests),
        spec=spec,
    )


def check_replace(task: str, current: str | None, replace: bool, if_match: str | None) -> None:
    """Refuse to overwrite silently: an existing task needs replace=True or a matching If-Match."""
    if if_match is not None:
        if current is None:
            raise MemoryConflict(f"task {task!r} does not exist, so If-Match {if_match!r} cannot match")
        if if_match != "*" and if_match != current:
            raise MemoryConflict(
                f"task {task!r} is at version {current}, not {if_match} (If-Match): it changed meanwhile"
            )
        return
    if current is not None and not replace:
        raise MemoryConflict(
            f"task {task!r} already exists (version {current}); "
            "replace it with ?replace=true or If-Match: <current version>"
        )

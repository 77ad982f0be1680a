"""Where task memory files live: a small interface, and the local-folder store.

The registry only talks to `MemoryStore`, so an object store (S3) can be added without touching it.
A task's file is `<task>.safetensors`. Task names are checked here, once, for every store: a name can
never carry a path (no separators, no dots, no leading dash), so it cannot escape the store.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from app.errors import InvalidTaskName, TaskNotFound
from app.spartan.memfile import write_atomically

MEMORY_SUFFIX = ".safetensors"
MAX_TASK_NAME = 64
TASK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
TASK_NAME_PATTERN = f"^{TASK_NAME_RE.pattern}$"  # for the OpenAPI schema


def validate_task_name(name: str) -> str:
    """The name itself if it is allowed; InvalidTaskName (with the rule) otherwise."""
    if not TASK_NAME_RE.fullmatch(name):
        shown = name if len(name) <= MAX_TASK_NAME else name[:MAX_TASK_NAME] + "..."
        raise InvalidTaskName(
            f"invalid task name {shown!r}: use 1 to {MAX_TASK_NAME} letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class StoredFile:
    """A task's file as the store sees it. `stamp` changes whenever the content may have changed."""

    task: str
    size: int
    stamp: str


class MemoryStore(Protocol):
    """The store of task memory files (a local folder now; an object store later)."""

    @property
    def location(self) -> str:
        """Where the store is, for logs."""
        ...

    def scan(self) -> dict[str, StoredFile]:
        """Every task file in the store. Must be cheap when called often (metadata only)."""
        ...

    def stat(self, task: str) -> StoredFile | None:
        """One task's file, or None if the store has none."""
        ...

    def read(self, task: str) -> tuple[bytes, StoredFile]:
        """The file's bytes and the stamp of exactly those bytes; TaskNotFound if there is none."""
        ...

    def write(self, task: str, data: bytes) -> StoredFile:
        """Store atomically: readers see the old file or the new one, never a part."""
        ...

    def delete(self, task: str) -> bool:
        """Remove the task's file; False if there was none."""
        ...


class LocalFolderStore:
    """Task memories as `<task>.safetensors` files in one folder. Other files are ignored."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def location(self) -> str:
        return str(self.root.resolve())

    def path(self, task: str) -> Path:
        return self.root / f"{validate_task_name(task)}{MEMORY_SUFFIX}"

    def scan(self) -> dict[str, StoredFile]:
        found: dict[str, StoredFile] = {}
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return found
        for entry in entries:
            task = entry.name.removesuffix(MEMORY_SUFFIX)
            # Temp files of atomic writes (".name.XXXX.tmp") and foreign files fail one of these tests.
            if task == entry.name or not TASK_NAME_RE.fullmatch(task):
                continue
            try:
                if entry.is_file():
                    found[task] = _stored(task, entry.stat())
            except FileNotFoundError:  # removed between the listing and the stat
                continue
        return found

    def stat(self, task: str) -> StoredFile | None:
        try:
            return _stored(task, self.path(task).stat())
        except FileNotFoundError:
            return None

    def read(self, task: str) -> tuple[bytes, StoredFile]:
        try:
            with self.path(task).open("rb") as handle:
                # fstat of the open file: the stamp belongs to the bytes read, even if a writer
                # renames a new file into place meanwhile.
                stored = _stored(task, os.fstat(handle.fileno()))
                return handle.read(), stored
        except FileNotFoundError:
            raise TaskNotFound(f"task {task!r} is not in the memory store") from None

    def write(self, task: str, data: bytes) -> StoredFile:
        path = self.path(task)
        write_atomically(path, data)
        return _stored(task, path.stat())

    def delete(self, task: str) -> bool:
        try:
            self.path(task).unlink()
        except FileNotFoundError:
            return False
        return True


def _stored(task: str, st: os.stat_result) -> StoredFile:
    # The inode changes on every atomic replace, so a rename within the same nanosecond is still seen.
    return StoredFile(task, st.st_size, f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}")

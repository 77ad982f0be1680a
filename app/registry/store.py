"""Where task memory files live: a small interface and the local-folder store.

The registry only talks to `MemoryStore`; the S3-compatible store lives in s3store.py (boto3 is only
imported when it is used), and factory.py picks one from the settings. A task's file is
`<task>.safetensors`. Every store checks task names with the one rule of names.py: a name can never
carry a path (no separators, no dots, no leading dash), so it cannot escape the store.

Writes are compare-and-swap: the writer says which version of the file it checked (its stamp, or that
there was none), and the store refuses the write with StoreConflict if the file changed meanwhile. This
is what makes two replicas that upload the same task at once end with one winner and one clear 409.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from app.errors import SpartanError, StoreConflict, StoreFull, StoreReadOnly, TaskNotFound
from app.fsutil import fsync_folder, write_atomically
from app.registry.names import TASK_NAME_RE, validate_task_name

MEMORY_SUFFIX = ".safetensors"
# `expected` of an unconditional write (tools, tests); the service always says what it checked.
ANY_VERSION: Final = "*"


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

    def write(self, task: str, data: bytes, *, expected: str | None = ANY_VERSION) -> StoredFile:
        """Store atomically: readers see the old file or the new one, never a part.

        `expected` is the stamp of the file the writer checked, None if it saw no file, ANY_VERSION
        to overwrite whatever is there; StoreConflict (nothing written) if the store has moved on.
        """
        ...

    def delete(self, task: str) -> bool:
        """Remove the task's file, exactly the version the store has when it checks (StoreConflict
        if another writer replaces it meanwhile); False if there was none."""
        ...

    def recover(self) -> int:
        """At start: remove what a crashed writer left behind (never a visible file); how many."""
        ...


def conflict(task: str, expected: str | None, action: str = "upload") -> StoreConflict:
    seen = "no file" if expected is None else f"the version this {action} checked"
    done = "written" if action == "upload" else "deleted"
    return StoreConflict(
        f"task {task!r} was changed in the memory store by another writer after this {action} checked "
        f"it (it saw {seen}); nothing was {done}: fetch the task's current version and retry"
    )


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def write_refused(task: str, err: OSError) -> SpartanError | None:
    """The domain error of a write the filesystem refused for lack of room or of write access."""
    if err.errno in _NO_SPACE:
        return StoreFull(
            f"the memory store has no space left for task {task!r} ({os.strerror(err.errno)}); "
            "nothing was written: free space or grow the volume, then retry"
        )
    if err.errno in _READ_ONLY:
        return StoreReadOnly(
            f"the memory store is read-only ({os.strerror(err.errno)}): it serves its memories but "
            f"cannot change task {task!r}; write through a replica whose store is writable"
        )
    return None


class LocalFolderStore:
    """Task memories as `<task>.safetensors` files in one folder. Other files are ignored.

    Several processes may share the folder (replicas on one volume): a compare-and-swap write holds an
    exclusive flock on `.spartan.lock` in the folder from the check to the rename. The lock file is
    created by the first write (never by reading), so a read-only folder serves; it is git-ignored.
    A write the filesystem refuses (full, read-only) is StoreFull / StoreReadOnly, with nothing left.
    """

    LOCK_NAME = ".spartan.lock"

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

    def write(self, task: str, data: bytes, *, expected: str | None = ANY_VERSION) -> StoredFile:
        path = self.path(task)
        with self._refused_as(task), self._locked():
            if expected != ANY_VERSION:
                current = self.stat(task)
                if (current.stamp if current else None) != expected:
                    raise conflict(task, expected)
            write_atomically(path, data)  # removes its temp file if the write fails
            return _stored(task, path.stat())

    def delete(self, task: str) -> bool:
        path = self.path(task)
        with self._refused_as(task), self._locked():
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            fsync_folder(self.root)
        return True

    def recover(self) -> int:
        # A writer killed mid-write leaves its hidden temp file (never the task's file: the rename is
        # atomic). Under the lock no write is in progress, so every temp file is an orphan.
        removed = 0
        try:
            with self._refused_as("*"), self._locked():
                for orphan in self.root.glob(f".*{MEMORY_SUFFIX}.*.tmp"):
                    orphan.unlink(missing_ok=True)
                    removed += 1
        except StoreReadOnly:
            return 0  # nobody can have written here through this mount: nothing to recover
        return removed

    @contextmanager
    def _refused_as(self, task: str) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            if (refused := write_refused(task, err)) is not None:
                raise refused from err
            raise

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / self.LOCK_NAME).open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
            yield


def _stored(task: str, st: os.stat_result) -> StoredFile:
    # The inode changes on every atomic replace, so a rename within the same nanosecond is still seen.
    return StoredFile(task, st.st_size, f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}")

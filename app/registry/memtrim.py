"""Hand freed heap pages back to the OS, so that a deleted memory really leaves the process's RSS."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)  # glibc only


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc; a no-op elsewhere).

    Without it glibc keeps the pages of freed tensors for reuse: right for LRU churn (the next load
    reuses them), wrong after a delete, when the operator expects the process to shrink.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

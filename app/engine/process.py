"""Process-wide configuration (torch's threads, glibc's heap arenas), applied once by a process's entry
point (the `spartan` commands).

torch's intra-op thread count is process state: every thread that runs torch ops afterwards uses it,
and it changes the blocking (so the rounding) of every GEMM. A component that set it as a side effect
would change the numbers of everything that ran after it in the same process (tests, a second app), so
no component does: only the entry point, before anything else runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from app.engine.graph import MemoryGraph

log = logging.getLogger(__name__)

# glibc's mallopt parameter for the most heap arenas (malloc.h: M_ARENA_MAX).
_M_ARENA_MAX = -8
# A serving process has many threads that allocate (batch workers, cold loaders, the event loop, the
# engine's): glibc gives each contended thread an arena of its own, up to 8 per core, and the freed
# pages of a loaded memory stay scattered over all of them. Measured with 1,000 resident memories and
# two engine streams: RSS 1.24x the memories' bytes above the warm engine with glibc's default, 1.04x
# with 2 arenas, at the same rows/s (docs/SERVICE_BENCHMARKS.md).
SERVING_MALLOC_ARENAS = 2


def configure_torch_threads(threads: int | None) -> None:
    """Use `threads` intra-op threads for the rest of the process; None keeps torch's default."""
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def torch_threads_beside(graph: MemoryGraph | None, threads: int | None) -> int | None:
    """torch's threads in a serving process. With the compiled graph, torch runs only the heads (a few
    tiny matmuls per pass): one thread, because a pool of several spins after each op on the very cores
    the graph's own threads run on next (measured: 1x64 at 2 threads, 0.84 of the graph's speed with
    torch at 2 threads, 0.93 at 1). On the eager path torch does all the work: `threads`."""
    return 1 if graph is not None else threads


def limit_malloc_arenas(arenas: int) -> bool:
    """At most `arenas` glibc heap arenas for the rest of the process (call it before threads start);
    False where the C library is not glibc. An explicit MALLOC_ARENA_MAX in the environment wins."""

    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None or not mallopt(_M_ARENA_MAX, arenas):
        log.info("malloc arenas not limited (not glibc)")
        return False
    return True

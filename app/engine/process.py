"""Process-wide torch configuration, applied once by a process's entry point (the `spartan` commands).

torch's intra-op thread count is process state: every thread that runs torch ops afterwards uses it,
and it changes the blocking (so the rounding) of every GEMM. A component that set it as a side effect
would change the numbers of everything that ran after it in the same process (tests, a second app), so
no component does: only the entry point, before anything else runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from app.engine.graph import MemoryGraph


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

"""Process-wide torch configuration, applied once by a process's entry point (the `spartan` commands).

torch's intra-op thread count is process state: every thread that runs torch ops afterwards uses it,
and it changes the blocking (so the rounding) of every GEMM. A component that set it as a side effect
would change the numbers of everything that ran after it in the same process (tests, a second app), so
no component does: only the entry point, before anything else runs.
"""

from __future__ import annotations

import torch


def configure_torch_threads(threads: int | None) -> None:
    """Use `threads` intra-op threads for the rest of the process; None keeps torch's default."""
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)

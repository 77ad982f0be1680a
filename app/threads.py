"""Thread pools that main and the registry both need, and neither owns."""

from __future__ import annotations

import concurrent.futures
import threading


def started_pool(workers: int, name: str) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool whose threads all exist from the start: a pool that grows on demand looks, over a
    long run, exactly like a thread leak (and pays thread creation on the first busy moment)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    barrier = threading.Barrier(workers)
    for future in [pool.submit(barrier.wait) for _ in range(workers)]:
        future.result()
    return pool

"""Process-wide configuration applied by the entry points (app/engine/process.py), each check in a child
process: this one's state must stay as it is (tests/global_state.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Eight threads malloc at once; glibc's malloc_stats() then prints one "Arena N:" block per arena.
CHILD = """
import ctypes, sys, threading
from app.engine.process import limit_malloc_arenas
print(limit_malloc_arenas(int(sys.argv[1])) if sys.argv[1] != "none" else None, flush=True)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
barrier = threading.Barrier(8)
def work():
    barrier.wait()
    for _ in range(2000):
        libc.free(libc.malloc(4096))
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc.malloc_stats()
"""


def arenas_after_eight_threads(limit: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, limit],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
        env={**{k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}, **(env or {})},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip(), done.stderr.count("Arena ")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's arenas")
def test_the_serving_process_keeps_at_most_the_arenas_it_asks_for() -> None:
    said, unlimited = arenas_after_eight_threads("none")
    assert unlimited > 2, "eight allocating threads get arenas of their own by default"
    said, limited = arenas_after_eight_threads("2")
    assert said == "True"
    assert limited == 2


def test_an_explicit_malloc_arena_max_wins() -> None:
    said, arenas = arenas_after_eight_threads("2", env={"MALLOC_ARENA_MAX": "3"})
    assert said == "False"
    assert arenas <= 3

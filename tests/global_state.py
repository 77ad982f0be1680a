"""Every test leaves torch's process-wide state as it found it.

Thread count and default dtype are process state: a component that changed them as a side effect
(the batch worker once set the thread count) changes the rounding of every later test in the process,
which made a parity test fail only in the full suite. This guard names the test that did it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch


def _threads_in_a_new_thread() -> int:
    # A new thread takes torch's process-wide count on its first use: what a later batch worker would get.
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def _torch_state() -> dict[str, object]:
    return {
        "threads": torch.get_num_threads(),
        "threads in a new thread": _threads_in_a_new_thread(),
        "default dtype": torch.get_default_dtype(),
        "grad enabled": torch.is_grad_enabled(),
    }


@pytest.fixture(autouse=True)
def _torch_state_is_left_alone() -> Iterator[None]:
    before = _torch_state()
    yield
    after = _torch_state()
    assert after == before, f"this test (or what it ran) changed torch's process state: {before} -> {after}"

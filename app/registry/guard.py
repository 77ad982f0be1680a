"""A memory store that always answers in time: every call is bounded, and a store that stopped
answering is not waited on again and again.

A hung store (a frozen S3 server, a stuck network mount) used to hold each request for as long as the
client library's own timeouts and retries allowed (40 to 80 s), past every request deadline. Here
each call runs on one of a few daemon threads and is given up after `timeout_s` (StoreUnavailable,
503): the caller is free, whatever the store does. After a call fails or times out the store is
"down": calls fail at once, except one probe at a time, at most every `probe_every_s`, that finds
out whether it answers again. So while the store hangs, a queue of cold loads costs one timeout, not
one per request, and what is resident keeps serving. `up` is what /readyz and spartan_store_up show.

A call given up on may still finish later (a write may land): the registry's conditional writes and
its polling make that safe (the poller picks up what landed; a retried upload of the same bytes is a
no-op success).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from app.errors import StoreUnavailable
from app.metrics import Metrics
from app.registry.store import ANY_VERSION, MemoryStore, StoredFile

T = TypeVar("T")
StateListener = Callable[[bool], None]

# Threads that run store calls: enough that one hung read does not hold up the calls for other tasks.
STORE_THREADS = 8
# While the store is down, how often one call may try it again.
PROBE_EVERY_S = 1.0


class GuardedStore:
    """The `MemoryStore` `inner`, with every call answered (or given up) within `timeout_s`."""

    def __init__(
        self,
        inner: MemoryStore,
        timeout_s: float,
        *,
        threads: int = STORE_THREADS,
        probe_every_s: float = PROBE_EVERY_S,
    ) -> None:
        self.inner = inner
        self.timeout_s = timeout_s
        self.probe_every_s = probe_every_s
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._up = True
        self._probing = False
        self._down_since = 0.0
        self._listeners: list[StateListener] = []
        self._metrics: Metrics | None = None
        # Daemon threads (not a ThreadPoolExecutor, whose workers are joined at exit): a call stuck
        # in a hung mount must not keep the process from exiting.
        for number in range(threads):
            threading.Thread(target=self._work, name=f"spartan-store-{number}", daemon=True).start()

    @property
    def up(self) -> bool:
        return self._up

    def add_listener(self, listener: StateListener) -> None:
        """Called with the new state when the store goes down or comes back."""
        self._listeners.append(listener)

    def bind_metrics(self, metrics: Metrics) -> None:
        """Report into `metrics`: spartan_store_up and spartan_store_call_timeouts_total."""
        self._metrics = metrics
        metrics.store_up.set(1 if self._up else 0)

    # ------------------------------------------------------------------------------------ MemoryStore

    @property
    def location(self) -> str:
        return self.inner.location

    def scan(self) -> dict[str, StoredFile]:
        return self._call("listing", self.inner.scan)

    def stat(self, task: str) -> StoredFile | None:
        return self._call("stat", lambda: self.inner.stat(task))

    def read(self, task: str) -> tuple[bytes, StoredFile]:
        return self._call("read", lambda: self.inner.read(task))

    def write(self, task: str, data: bytes, *, expected: str | None = ANY_VERSION) -> StoredFile:
        return self._call("write", lambda: self.inner.write(task, data, expected=expected))

    def delete(self, task: str) -> bool:
        return self._call("delete", lambda: self.inner.delete(task))

    def recover(self) -> int:
        return self._call("recovery", self.inner.recover)

    # ------------------------------------------------------------------------------------ internals

    def _call(self, what: str, action: Callable[[], T]) -> T:
        probing = self._admit(what)
        future: Future[T] = Future()
        self._calls.put((future, action))
        try:
            result = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            future.cancel()  # if no thread took it yet, none will
            if self._metrics is not None:
                self._metrics.store_call_timeouts.inc()
            self._settle(False, probing)
            raise StoreUnavailable(
                f"the memory store did not answer a {what} within {self.timeout_s:g} s"
            ) from None
        except StoreUnavailable:
            self._settle(False, probing)
            raise
        except BaseException:
            self._settle(True, probing)  # the store answered, with an error of its own
            raise
        self._settle(True, probing)
        return result

    def _admit(self, what: str) -> bool:
        """Whether this call is the probe of a down store; StoreUnavailable at once if it may not try."""
        with self._lock:
            if self._up:
                return False
            if self._probing or time.monotonic() - self._down_since < self.probe_every_s:
                raise StoreUnavailable(
                    f"the memory store is not answering (a call failed or took over {self.timeout_s:g} s); "
                    f"this {what} was not tried: retry shortly"
                )
            self._probing = True
            return True

    def _settle(self, answered: bool, probing: bool) -> None:
        with self._lock:
            if probing:
                self._probing = False
            changed = self._up != answered
            self._up = answered
            if not answered:
                self._down_since = time.monotonic()
        if changed and self._metrics is not None:
            self._metrics.store_up.set(1 if answered else 0)
        if changed:
            for listener in self._listeners:
                listener(answered)

    def _work(self) -> None:
        while True:
            future, action = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue  # given up on before it started
            try:
                future.set_result(action())
            except BaseException as err:  # handed to the caller, if it still waits
                future.set_exception(err)

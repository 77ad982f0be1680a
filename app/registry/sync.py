"""Keeping the registry in line with its store: which tasks a listing says changed, the first sync at
start (waiting for a store that is still starting), and the poller that syncs every few seconds.

The registry does the syncing of one task (it holds the records and their locks); this module only
decides when, and for which tasks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from app.errors import StoreUnavailable
from app.metrics import Metrics
from app.registry.store import MemoryStore, StoredFile

log = logging.getLogger(__name__)


def stale_tasks(listing: Mapping[str, StoredFile], known: Mapping[str, str | None]) -> list[str]:
    """The tasks to sync: those whose stored stamp differs from the one known (new files included),
    then those known with a file that the listing no longer has. `known` maps each task the registry
    holds to its file's stamp (None: no file yet, an upload in progress)."""
    changed = [name for name, stored in listing.items() if known.get(name) != stored.stamp]
    removed = [name for name, stamp in known.items() if stamp is not None and name not in listing]
    return changed + removed


def refresh_when_reachable(
    store: MemoryStore, refresh: Callable[[], None], timeout_s: float, retry_every_s: float
) -> None:
    """The first refresh at start: an object store that is still starting (compose, a new cluster)
    gets `timeout_s` to answer before the service gives up (StoreUnavailable)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if removed := store.recover():
                log.warning("removed %d partial file(s) a crashed upload left in the store", removed)
            refresh()
            return
        except StoreUnavailable as err:
            if time.monotonic() >= deadline:
                raise
            log.warning("memory store %s not reachable yet (%s); retrying", store.location, err)
            time.sleep(retry_every_s)


class StorePoller:
    """A daemon thread that calls `refresh` every `interval_s` and outlives any failure of it."""

    def __init__(self, refresh: Callable[[], None], metrics: Metrics) -> None:
        self._refresh = refresh
        self._metrics = metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, interval_s: float) -> None:
        """Start polling (nothing if `interval_s` <= 0 or it is already polling)."""
        if interval_s <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._poll, args=(interval_s,), name="spartan-store-poller", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _poll(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            started = time.perf_counter()
            try:
                self._refresh()
            except StoreUnavailable as err:  # a store that is down: said once per poll, no traceback
                self._metrics.store_polls.labels("error").inc()
                log.warning("memory store poll failed: %s", err)
            except Exception:  # the poller must outlive a flaky store
                self._metrics.store_polls.labels("error").inc()
                log.exception("memory store poll failed")
            else:
                self._metrics.store_polls.labels("ok").inc()
            self._metrics.store_poll_duration.observe(time.perf_counter() - started)

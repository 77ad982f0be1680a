"""A bound on the bytes of uploads in flight, so that concurrent large uploads cannot take the memory.

An upload holds its body, the parsed tensors, the validated memory and the bytes written to the store
at once: a few times its size. Each upload reserves its declared size (or the upload limit when it
declares none) before its body is read; one that would take the uploads in flight over the budget is
refused at once with 429 and Retry-After, before a byte of it is read. A single upload always fits,
whatever its size under the upload limit, when none is in flight.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from app.errors import Overloaded

# Seconds a refused upload is told to wait: about the time one large upload takes to validate and store.
UPLOAD_RETRY_AFTER_S = 2.0


class UploadBudget:
    """Bytes reserved by uploads in progress. Used from the event loop only (no lock needed)."""

    def __init__(self, max_bytes_in_flight: int) -> None:
        self.max_bytes_in_flight = max_bytes_in_flight
        self.in_flight = 0

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        if self.in_flight and self.in_flight + nbytes > self.max_bytes_in_flight:
            raise Overloaded(
                f"uploads in progress hold {self.in_flight} bytes; this one ({nbytes} bytes) would exceed "
                f"SPARTAN_MAX_UPLOAD_BYTES_IN_FLIGHT ({self.max_bytes_in_flight})",
                retry_after=UPLOAD_RETRY_AFTER_S,
            )
        self.in_flight += nbytes
        try:
            yield
        finally:
            self.in_flight -= nbytes


def declared_size(content_length: str | None, limit: int) -> int:
    """What an upload reserves: its declared Content-Length, or the limit when it declares none."""
    if content_length is not None and content_length.isdigit():
        return min(int(content_length), limit)
    return limit

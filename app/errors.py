"""Domain errors. No HTTP here: app/api/errors.py maps each class to a status code in one table.

Each error also names the `outcome` a prediction it ends is counted under (the requests metric), so
that one place, the error itself, says what it means.
"""

from __future__ import annotations

import asyncio


class SpartanError(Exception):
    """Base of every error the project raises on purpose; `str(err)` is safe to show a user."""

    outcome = "error"


class AssetError(SpartanError):
    """An offline asset could not be fetched, extracted or verified."""


class DatasetError(SpartanError):
    """A dataset could not be read or does not have the expected layout."""


class BackboneError(SpartanError):
    """The backbone could not be loaded or is not a supported encoder."""


class MemoryInvalid(SpartanError):
    """A memory file is malformed: not safetensors, truncated, wrong tensors, shapes, dtypes or values."""


class BackboneMismatch(MemoryInvalid):
    """A memory file was trained for another backbone than the one served."""


class PoolingMismatch(MemoryInvalid):
    """A memory file was trained with another pooling (mean, first token) than the served backbone's."""


class MemoryConflict(SpartanError):
    """A write would overwrite a memory without being asked to (or with a stale version)."""


class StoreConflict(MemoryConflict):
    """Another writer (another replica) changed the task in the store between our check and our write."""


class StoreUnavailable(SpartanError):
    """The memory store (an S3 endpoint) cannot be reached, refused the call or did not answer in
    time; retrying may help."""


class StoreFull(SpartanError):
    """The memory store has no space left (ENOSPC, a quota): the write was refused, nothing was left."""


class StoreReadOnly(SpartanError):
    """The memory store is read-only (a read-only mount or volume): it serves, but refuses writes."""


class TaskNotFound(SpartanError):
    """No memory is registered under this task name."""

    outcome = "not_found"


class RoutingStatsDisabled(SpartanError):
    """Routing statistics were asked for, but the service does not collect them (switched off)."""


class InvalidTaskName(SpartanError):
    """A task name is not allowed (empty, too long, or could escape the store)."""

    outcome = "not_found"


class InvalidInput(SpartanError):
    """A prediction request does not fit the task (e.g. a text pair for a model without pairs)."""

    outcome = "invalid"


class PayloadTooLarge(SpartanError):
    """An upload is larger than the configured limit."""


class Overloaded(SpartanError):
    """The request queue is full; the client should retry after `retry_after` seconds."""

    outcome = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TrainingDataInvalid(SpartanError):
    """Training data sent with a job cannot train a memory: a malformed body, or a row without a label,
    with an empty or over-long text, one class only, too many classes or rows. `details` names the
    split, row (and line, for files) and a reason code, so a client can point at it."""

    def __init__(self, message: str, **detail: object) -> None:
        super().__init__(message)
        self.details = [detail] if detail else None


class JobNotFound(SpartanError):
    """No training job has this id (or the id is not one the service could have made)."""

    outcome = "not_found"


class JobQueueFull(Overloaded):
    """This replica already holds as many training jobs as it queues (SPARTAN_MAX_QUEUED_JOBS)."""


class JobFinished(SpartanError):
    """A training job that has already finished (succeeded, failed or cancelled) cannot be cancelled."""


class BodyTimeout(SpartanError):
    """The client did not send its whole request body within the deadline (a slow or stalled client)."""


class HeadersTooLarge(SpartanError):
    """A request's line and headers are larger than the configured limit (SPARTAN_MAX_HEADER_BYTES)."""


class ServerBusy(SpartanError):
    """As many requests are in flight as the service accepts connections (SPARTAN_MAX_CONNECTIONS)."""


class RequestTimeout(SpartanError):
    """A request waited in the queue or ran longer than its deadline."""

    outcome = "timeout"


class NotReady(SpartanError):
    """The service has not finished starting, or its batch worker is not alive."""


class TaskUnavailable(SpartanError):
    """A task is registered but its stored memory file cannot be served (e.g. it fails validation)."""

    outcome = "unavailable"


class AuthenticationRequired(SpartanError):
    """The request lacks a valid Bearer key for this operation."""


class WritesDisabled(SpartanError):
    """No admin key is configured and development writes are off, so uploads and deletes are refused."""


class InferenceFailed(SpartanError):
    """The forward pass of the batch holding this request raised; other batches are unaffected."""


class NonFiniteOutput(InferenceFailed):
    """The task's memory produced a non-finite score for an input (an overflowing memory); only the
    request holding that input fails."""


def outcome_of(error: BaseException) -> str:
    """The requests metric's outcome label for a request this error ended."""
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    return error.outcome if isinstance(error, SpartanError) else "error"

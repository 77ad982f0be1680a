"""What a client call raises: one exception class per error type the service answers with.

The service's error body is `{"error": {"type", "message", "details"}}`; `type` is the snake_case name
of the service's domain error (task_not_found for TaskNotFound, see app/api/errors.py). Each type has
a class here of the same name, under the same parents where the service has them (BackboneMismatch is
a MemoryInvalid), so `except MemoryInvalid` catches both. A type this client does not know (a newer
service) is a plain ServiceError with its `type` kept.
"""

from __future__ import annotations

import re
from typing import Any


class ClientError(Exception):
    """Base of everything this client raises."""


class ServiceUnreachable(ClientError):
    """No answer: the connection failed, timed out, or was dropped before a response came."""


class ServiceError(ClientError):
    """The service answered with an error: its `status`, error `type`, `message` and `details`."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message
        self.details = details
        self.retry_after = retry_after  # the Retry-After header's seconds, where it was sent


# ---------------------------------------------------------------- the service's domain errors
class InvalidInput(ServiceError): ...  # 422: the inputs do not fit the task


class InvalidTaskName(ServiceError): ...  # 422


class MemoryInvalid(ServiceError): ...  # 422: the memory file is malformed


class BackboneMismatch(MemoryInvalid): ...  # 409: trained for another backbone


class MemoryConflict(ServiceError): ...  # 409: exists (no replace), or If-Match differs


class PoolingMismatch(MemoryInvalid): ...  # 422: trained with another pooling than the backbone's


class StoreFull(ServiceError): ...  # 507: the store has no space left


class StoreReadOnly(ServiceError): ...  # 503: the store is read-only (it serves, refuses writes)


class StoreConflict(MemoryConflict): ...  # 409: another writer changed the task meanwhile


class TaskNotFound(ServiceError): ...  # 404


class RoutingStatsDisabled(ServiceError): ...  # 404: SPARTAN_ROUTING_STATS=false


class PayloadTooLarge(ServiceError): ...  # 413


class BodyTimeout(ServiceError): ...  # 408


class HeadersTooLarge(ServiceError): ...  # 431: request line and headers over the service's limit


class ServerBusy(ServiceError): ...  # 503: as many requests in flight as the service takes


class Overloaded(ServiceError): ...  # 429, with Retry-After


class JobQueueFull(Overloaded): ...  # 429: the replica holds as many training jobs as it takes


class TrainingDataInvalid(ServiceError): ...  # 422: a row of a training job's data (details: where)


class JobNotFound(ServiceError): ...  # 404: no such training job


class JobFinished(ServiceError): ...  # 409: the training job has ended: nothing to cancel


class AuthenticationRequired(ServiceError): ...  # 401: missing or wrong Bearer key


class WritesDisabled(ServiceError): ...  # 403: no admin key configured on the service


class NotReady(ServiceError): ...  # 503


class TaskUnavailable(ServiceError): ...  # 503: the stored file cannot be served


class StoreUnavailable(ServiceError): ...  # 503: the memory store is unreachable


class RequestTimeout(ServiceError): ...  # 504


class InferenceFailed(ServiceError): ...  # 500


class NonFiniteOutput(InferenceFailed): ...  # 500: the memory overflowed on an input


class BackboneError(ServiceError): ...  # 503


class AssetError(ServiceError): ...  # 503


# ---------------------------------------------------------------- errors of the HTTP edge itself
class InvalidRequest(ServiceError): ...  # 422: the body does not match the schema


class NotFound(ServiceError): ...  # 404: no such route


class MethodNotAllowed(ServiceError): ...  # 405


class UnsupportedMediaType(ServiceError): ...  # 415


class HttpError(ServiceError): ...  # any other HTTP status the edge answered


class InternalError(ServiceError): ...  # 500: unexpected; the service log says why


def _snake(name: str) -> str:
    # The service's own rule (app/api/errors.py error_type): TaskNotFound -> task_not_found.
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


ERROR_TYPES: dict[str, type[ServiceError]] = {
    _snake(kind.__name__): kind
    for kind in (
        InvalidInput, InvalidTaskName, MemoryInvalid, BackboneMismatch, MemoryConflict, StoreConflict,
        TaskNotFound, RoutingStatsDisabled, PayloadTooLarge, BodyTimeout, HeadersTooLarge, ServerBusy,
        Overloaded, AuthenticationRequired, WritesDisabled, NotReady, TaskUnavailable, StoreUnavailable,
        PoolingMismatch, StoreFull, StoreReadOnly, RequestTimeout, InferenceFailed, NonFiniteOutput,
        BackboneError, AssetError, JobQueueFull, TrainingDataInvalid, JobNotFound, JobFinished,
        InvalidRequest,
        NotFound, MethodNotAllowed, UnsupportedMediaType, HttpError, InternalError,
    )
}  # fmt: skip


def service_error(
    status: int,
    type: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    retry_after: float | None = None,
) -> ServiceError:
    """The exception of one error answer: its type's class, or ServiceError for an unknown type."""
    return ERROR_TYPES.get(type, ServiceError)(status, type, message, details, retry_after)

"""The HTTP edge of errors: ONE table from domain error to status code, one error body shape.

Every error response is `{"error": {"type", "message", "details"}}`. A domain error's message is safe
to show (domain errors are written for users); anything unexpected is a 500 that says nothing about
internals (the traceback goes to the log).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.schemas import ErrorBody
from app.errors import (
    AssetError,
    AuthenticationRequired,
    BackboneError,
    BackboneMismatch,
    BodyTimeout,
    HeadersTooLarge,
    InferenceFailed,
    InvalidInput,
    InvalidTaskName,
    JobFinished,
    JobNotFound,
    JobQueueFull,
    MemoryConflict,
    MemoryInvalid,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    PoolingMismatch,
    RequestTimeout,
    RoutingStatsDisabled,
    ServerBusy,
    SpartanError,
    StoreConflict,
    StoreFull,
    StoreReadOnly,
    StoreUnavailable,
    TaskNotFound,
    TaskUnavailable,
    TrainingDataInvalid,
    WritesDisabled,
)

log = logging.getLogger(__name__)

# Looked up along the error's class hierarchy, so a subclass (BackboneMismatch) can differ from its base.
ERROR_STATUS: dict[type[SpartanError], int] = {
    InvalidInput: 422,
    InvalidTaskName: 422,
    MemoryInvalid: 422,
    BackboneMismatch: 409,
    PoolingMismatch: 422,  # the file is wrong for any backbone of this kind, not another backbone's
    MemoryConflict: 409,
    StoreConflict: 409,
    TaskNotFound: 404,
    RoutingStatsDisabled: 404,
    TrainingDataInvalid: 422,
    JobNotFound: 404,
    JobFinished: 409,  # nothing left to cancel
    JobQueueFull: 429,
    PayloadTooLarge: 413,
    BodyTimeout: 408,
    HeadersTooLarge: 431,
    Overloaded: 429,
    AuthenticationRequired: 401,
    WritesDisabled: 403,
    NotReady: 503,
    ServerBusy: 503,
    TaskUnavailable: 503,
    StoreUnavailable: 503,
    StoreReadOnly: 503,  # the store serves but takes no writes: not this request's fault
    StoreFull: 507,  # Insufficient Storage: the store has no room for the write
    RequestTimeout: 504,
    InferenceFailed: 500,
    BackboneError: 503,
    AssetError: 503,
}

# Only these HTTP statuses are answered with the bare `type` of an HTTPException (e.g. unknown routes).
_HTTP_TYPES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


_STATUS_MEANING = {
    401: "Missing or wrong Bearer key",
    403: "Writes are disabled (no admin key configured)",
    404: "Unknown task (or training job)",
    408: "The request body did not arrive within SPARTAN_BODY_TIMEOUT_S",
    409: "Conflict: the task exists (replace not asked for, or If-Match differs), or another backbone; "
    "a training job that has finished cannot be cancelled",
    413: "Too large",
    415: "The body's content type is not one this endpoint reads",
    422: "Invalid request, task name, memory file or training data (the message says exactly what, "
    "`details` where: split, row, line, reason)",
    429: "Queue full (requests, uploads in flight, or training jobs): retry after the Retry-After "
    "header's seconds",
    503: "Not ready, the task's stored file cannot be served, or the memory store is unreachable, "
    "did not answer in time, or is read-only (writes)",
    504: "The request outlived its deadline",
    507: "The memory store is full: nothing was written",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these statuses, all with the one error body."""
    return {status: {"model": ErrorBody, "description": _STATUS_MEANING[status]} for status in statuses}


def status_for(error: SpartanError) -> int:
    for kind in type(error).__mro__:
        if kind in ERROR_STATUS:
            return ERROR_STATUS[kind]
    return 500


def error_type(error: BaseException) -> str:
    """TaskNotFound -> task_not_found."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower()


def error_response(
    status: int,
    kind: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"type": kind, "message": message, "details": details}}
    return JSONResponse(body, status_code=status, headers=headers or None)


def _headers_for(error: SpartanError) -> dict[str, str]:
    if isinstance(error, Overloaded):
        return {"Retry-After": str(max(1, math.ceil(error.retry_after)))}
    if isinstance(error, AuthenticationRequired):
        return {"WWW-Authenticate": 'Bearer realm="spartan"'}
    return {}


async def _domain_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, SpartanError)
    status = status_for(error)
    if status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, status, error)
    details = getattr(error, "details", None)  # where a domain error says where (TrainingDataInvalid)
    return error_response(status, error_type(error), str(error), details, headers=_headers_for(error))


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    # Only where and what: echoing the offending input back could return megabytes of text.
    details: list[dict[str, Any]] = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in error.errors()
    ]
    if not details:
        return error_response(422, "invalid_request", "invalid request")
    where = ".".join(str(part) for part in details[0]["loc"])
    message = f"{where}: {details[0]['msg']}" if where else details[0]["msg"]
    return error_response(422, "invalid_request", message, details)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    if isinstance(error.__cause__, SpartanError):
        # FastAPI wraps whatever interrupted its reading of the body (e.g. BodyTimeout) in a 400.
        return await _domain_error(request, error.__cause__)
    if error.status_code == 400:
        # FastAPI's "error parsing the body" (bytes that are not JSON, or not UTF-8): an invalid request
        # like any other, so it gets the documented 422 and its type rather than a bare 400.
        return error_response(422, "invalid_request", f"body: {error.detail}")
    kind = _HTTP_TYPES.get(error.status_code, "http_error")
    return error_response(error.status_code, kind, str(error.detail), headers=dict(error.headers or {}))


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=error)
    return error_response(500, "internal_error", "internal error; see the service log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(SpartanError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)

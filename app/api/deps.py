"""What the routes depend on: the services built by the lifespan, authentication, task names, uploads."""

from __future__ import annotations

import hmac
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.engine.batcher import Batcher
from app.engine.embedder import Embedder
from app.engine.encoder import SpartanEncoder
from app.engine.predictor import Predictor
from app.engine.routing_tally import RoutingTally
from app.errors import AuthenticationRequired, MemoryInvalid, NotReady, PayloadTooLarge, WritesDisabled
from app.jobs.manager import JobManager
from app.metrics import Metrics
from app.registry.names import TASK_NAME_PATTERN, validate_task_name
from app.registry.registry import Registry
from app.settings import Settings

# Room for multipart boundaries and part headers around the memory file itself.
MULTIPART_SLACK_BYTES = 64 * 1024


@dataclass
class Services:
    """Everything the lifespan builds; routes reach it through `services`."""

    settings: Settings
    metrics: Metrics
    encoder: SpartanEncoder
    registry: Registry
    batcher: Batcher
    predictor: Predictor
    embedder: Embedder
    routing_tally: RoutingTally | None = None  # None: routing statistics are off
    jobs: JobManager | None = None  # the training jobs of this replica


def services(request: Request) -> Services:
    found: Services | None = getattr(request.app.state, "services", None)
    if found is None:
        raise NotReady("the service is starting or stopping")
    return found


ServicesDep = Annotated[Services, Depends(services)]

_bearer = HTTPBearer(
    auto_error=False,
    description="`Authorization: Bearer <key>`: the admin key for uploads and deletes; the predict key "
    "(or the admin key) for predictions and listings when a predict key is configured.",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _key_matches(credentials: HTTPAuthorizationCredentials | None, key: SecretStr | None) -> bool:
    if credentials is None or key is None:
        return False
    # Constant time: the comparison must not tell an attacker how many leading characters were right.
    return hmac.compare_digest(credentials.credentials.encode(), key.get_secret_value().encode())


def require_admin(svc: ServicesDep, credentials: Credentials) -> None:
    """Uploads, deletes and training jobs: the admin key, or the explicit development flag when no key
    is set."""
    settings = svc.settings
    if settings.admin_api_key is None:
        if settings.allow_unauthenticated_writes:
            return
        raise WritesDisabled(
            "writes are disabled: no admin key is configured (set SPARTAN_ADMIN_API_KEY, or "
            "SPARTAN_ALLOW_UNAUTHENTICATED_WRITES=true for development only)"
        )
    if not _key_matches(credentials, settings.admin_api_key):
        raise AuthenticationRequired("this operation needs the admin key: Authorization: Bearer <key>")


def require_reader(svc: ServicesDep, credentials: Credentials) -> None:
    """Predictions and listings: open, unless a predict key is configured (the admin key works too)."""
    settings = svc.settings
    if settings.predict_api_key is None:
        return
    if _key_matches(credentials, settings.predict_api_key) or _key_matches(
        credentials, settings.admin_api_key
    ):
        return
    raise AuthenticationRequired("this operation needs the predict key: Authorization: Bearer <key>")


def require_metrics_reader(request: Request, credentials: Credentials) -> None:
    """/metrics names every task: the metrics key where one is set, else the listings' rule.

    Reads the settings off the app, not the services: metrics answer while the service starts.
    """
    settings: Settings = request.app.state.settings
    if settings.metrics_api_key is not None:
        if _key_matches(credentials, settings.metrics_api_key):
            return
        raise AuthenticationRequired("/metrics needs the metrics key: Authorization: Bearer <key>")
    if settings.predict_api_key is None:
        return
    if _key_matches(credentials, settings.predict_api_key) or _key_matches(
        credentials, settings.admin_api_key
    ):
        return
    raise AuthenticationRequired("/metrics needs the predict key: Authorization: Bearer <key>")


def metrics_guarded(settings: Settings) -> bool:
    return settings.metrics_api_key is not None or settings.predict_api_key is not None


def reader_dependencies(settings: Settings) -> list[Any]:
    """Predictions and listings need a key only where one is configured; the OpenAPI schema says
    exactly that (a security requirement on an open route would tell clients a lie)."""
    return [Depends(require_reader)] if settings.predict_api_key is not None else []


def task_name(
    task: Annotated[
        str,
        Path(
            description="Task name: 1 to 64 letters, digits, '_' or '-', starting with a letter or digit.",
            examples=["sentiment"],
            json_schema_extra={"pattern": TASK_NAME_PATTERN},
        ),
    ],
) -> str:
    # Checked by the registry's own rule (not a schema pattern) so every way in gives the same message.
    return validate_task_name(task)


TaskName = Annotated[str, Depends(task_name)]


# ------------------------------------------------------------------------------------------ uploads


async def read_memory_upload(request: Request, limit: int) -> bytes:
    """The memory file of an upload: the raw body, or the `file` part of a multipart/form-data body."""
    content_type = request.headers.get("content-type", "")
    if content_type.lower().startswith("multipart/form-data"):  # media types are case-insensitive
        body = await _read_limited(request, limit + MULTIPART_SLACK_BYTES, limit)
        return await _multipart_file(request.headers, body, limit)
    return await _read_limited(request, limit, limit)


def _too_large(size: int | str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the memory file is {size} bytes, more than the limit of {limit} bytes (SPARTAN_MAX_UPLOAD_BYTES)"
    )


async def _read_limited(request: Request, body_limit: int, file_limit: int) -> bytes:
    """Read the body, refusing as soon as it is known to exceed `body_limit` (before reading it all)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > body_limit:
        raise _too_large(declared if body_limit == file_limit else f"over {file_limit}", file_limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > body_limit:
            raise _too_large(f"over {file_limit}", file_limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_file(headers: Headers, body: bytes, limit: int) -> bytes:
    async def replay() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(headers, replay(), max_files=1, max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise MemoryInvalid(f"malformed multipart upload: {err.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise MemoryInvalid("multipart upload has no file part named 'file'")
        data = await upload.read()
    finally:
        await form.close()
    if len(data) > limit:
        raise _too_large(len(data), limit)
    return data

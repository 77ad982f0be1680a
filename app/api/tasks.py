"""Task memories as a resource: list, describe, upload (create or replace), delete."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response

from app.api.deps import (
    MULTIPART_SLACK_BYTES,
    ServicesDep,
    TaskName,
    read_memory_upload,
    require_admin,
    require_reader,
)
from app.api.errors import error_responses
from app.api.schemas import TaskList, TaskOut
from app.settings import Settings


async def list_tasks(svc: ServicesDep) -> TaskList:
    """Every task in the store, resident or not, with versions: what a router needs to reconcile."""
    infos = await asyncio.to_thread(svc.registry.list)
    return TaskList(
        tasks=[TaskOut.of(info) for info in infos],
        loaded=svc.registry.loaded_count,
        loaded_bytes=svc.registry.loaded_bytes,
    )


async def get_task(task: TaskName, svc: ServicesDep) -> TaskOut:
    """One task: version, labels, task type, size, whether it is loaded, pinned, request counts."""
    return TaskOut.of(await asyncio.to_thread(svc.registry.info, task))


def parse_if_match(value: str | None) -> str | None:
    """`"<sha256>"`, `W/"<sha256>"`, a bare `<sha256>` or `*`."""
    if value is None:
        return None
    value = value.strip().removeprefix("W/")
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


async def put_memory(
    request: Request,
    response: Response,
    task: TaskName,
    svc: ServicesDep,
    replace: Annotated[bool, Query(description="Replace the task's memory if it exists.")] = False,
    if_match: Annotated[
        str | None,
        Header(description="Replace only if the task's current version (sha256) is this one; * = any."),
    ] = None,
) -> TaskOut:
    """Upload a task memory file (raw body, or multipart/form-data with a `file` part).

    It is validated against the served backbone before anything changes, written to the store
    atomically, then swapped in: requests already queued finish on the version they started with.
    201 when the task is new, 200 when replaced (needs `?replace=true` or a matching `If-Match`).
    """
    data = await read_memory_upload(request, svc.settings.max_upload_bytes)
    result = await asyncio.to_thread(
        svc.registry.put, task, data, replace=replace, if_match=parse_if_match(if_match)
    )
    response.status_code = 201 if result.created else 200
    response.headers["ETag"] = f'"{result.info.version}"'
    response.headers["Location"] = f"/v1/tasks/{task}"
    return TaskOut.of(result.info)


async def delete_task(task: TaskName, svc: ServicesDep) -> Response:
    """Remove the task's memory file and free its memory (once requests in flight are done)."""
    await asyncio.to_thread(svc.registry.delete, task)
    return Response(status_code=204)


_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A spartan memory file (.safetensors), as `spartan train` writes it.",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/v1/tasks", tags=["tasks"])
    reader, admin = [Depends(require_reader)], [Depends(require_admin)]
    router.add_api_route(
        "",
        list_tasks,
        methods=["GET"],
        response_model=TaskList,
        dependencies=reader,
        responses=error_responses(401),
        summary="List tasks",
    )
    router.add_api_route(
        "/{task}",
        get_task,
        methods=["GET"],
        response_model=TaskOut,
        dependencies=reader,
        responses=error_responses(401, 404, 422),
        summary="Describe a task",
    )
    router.add_api_route(
        "/{task}/memory",
        put_memory,
        methods=["PUT"],
        response_model=TaskOut,
        dependencies=admin,
        status_code=201,
        responses={
            200: {"model": TaskOut, "description": "Replaced"},
            **error_responses(401, 403, 409, 413, 422),
        },
        openapi_extra=_UPLOAD_BODY,
        max_body_size=settings.max_upload_bytes + MULTIPART_SLACK_BYTES,
        summary="Upload (create or replace) a task memory",
    )
    router.add_api_route(
        "/{task}",
        delete_task,
        methods=["DELETE"],
        status_code=204,
        dependencies=admin,
        responses=error_responses(401, 403, 404, 422),
        summary="Delete a task",
        response_class=Response,
    )
    return router

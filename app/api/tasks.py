"""Task memories as a resource: list, describe, upload (create or replace), delete, routing statistics."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response

from app.api.deps import (
    MULTIPART_SLACK_BYTES,
    Services,
    ServicesDep,
    TaskName,
    read_memory_upload,
    reader_dependencies,
    require_admin,
)
from app.api.errors import error_responses
from app.api.schemas import ErrorBody, RoutingOut, TaskList, TaskOut
from app.api.uploads import UploadBudget, declared_size
from app.engine.routing_tally import RoutingSnapshot, RoutingTally
from app.errors import RoutingStatsDisabled, TaskUnavailable
from app.registry.memtrim import release_freed_memory
from app.registry.records import PutResult, TaskInfo
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


async def get_routing(task: TaskName, svc: ServicesDep) -> RoutingOut:
    """Per layer, how often each memory parent was chosen by the task's served inputs, split by their
    predicted label, with the parent-usage entropy and the mutual information between parent and label.

    Counted over every real token of every input served since the task's current memory version was
    installed; a new version starts from zero, a deleted task's counts are gone.
    """
    tally = svc.routing_tally
    if tally is None:
        raise RoutingStatsDisabled("routing statistics are switched off (SPARTAN_ROUTING_STATS=false)")
    info = await asyncio.to_thread(svc.registry.info, task)
    return RoutingOut.of(current_routing(info, tally))


def current_routing(info: TaskInfo, tally: RoutingTally) -> RoutingSnapshot:
    """The counts of the version that serves the task now: zero if it has not served since it was
    installed, or if the stored file changed while the task was not resident."""
    version = info.loaded_version or info.version
    snapshot = tally.snapshot(info.name)
    if snapshot is not None and snapshot.version == version:
        return snapshot
    if info.spec is None or version is None:
        raise TaskUnavailable(f"task {info.name!r}: its stored memory file is invalid: {info.error}")
    return RoutingSnapshot.empty(info.name, version, info.spec)


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
    limit = svc.settings.max_upload_bytes
    budget: UploadBudget = request.app.state.upload_budget
    with budget.reserve(declared_size(request.headers.get("content-length"), limit)):
        try:
            result = await _read_and_put(request, svc, task, replace, parse_if_match(if_match))
        finally:
            # The body, the parsed tensors and their copies are garbage now: hand their pages back to
            # the OS, so that a burst of uploads leaves the RSS where it was.
            await asyncio.to_thread(release_freed_memory)
    response.status_code = 201 if result.created else 200
    response.headers["ETag"] = f'"{result.info.version}"'
    response.headers["Location"] = f"/v1/tasks/{task}"
    return TaskOut.of(result.info)


async def _read_and_put(
    request: Request, svc: Services, task: str, replace: bool, if_match: str | None
) -> PutResult:
    data = await read_memory_upload(request, svc.settings.max_upload_bytes)
    return await asyncio.to_thread(svc.registry.put, task, data, replace=replace, if_match=if_match)


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
    reader, admin = reader_dependencies(settings), [Depends(require_admin)]
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
        "/{task}/routing",
        get_routing,
        methods=["GET"],
        response_model=RoutingOut,
        dependencies=reader,
        responses={
            **error_responses(401, 422, 503),
            404: {"model": ErrorBody, "description": "Unknown task, or routing statistics switched off"},
        },
        summary="Routing statistics of a task",
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
            **error_responses(401, 403, 409, 413, 422, 429, 503, 507),
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
        responses=error_responses(401, 403, 404, 409, 422, 503),
        summary="Delete a task",
        response_class=Response,
    )
    return router

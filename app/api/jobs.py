"""Training jobs as a resource: submit (for a task), show, list, cancel, follow (Server-Sent Events).

A submission's data is read and checked here, whole, before the job is queued: bad data is a 422
that names the row and the reason, and nothing trains. The job then runs in a process of its own
(app/jobs); these routes only read and change its record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from app.api.deps import MULTIPART_SLACK_BYTES, ServicesDep, TaskName, reader_dependencies, require_admin
from app.api.errors import error_responses
from app.api.schemas import TrainingDataIn, TrainingJobList, TrainingJobOut
from app.api.tasks import parse_if_match
from app.errors import JobNotFound, NotReady, PayloadTooLarge, StoreUnavailable, TrainingDataInvalid
from app.jobs.data import DataFormat, DataLimits, RawRow, rows_from_file, rows_from_json, training_data
from app.jobs.manager import JobManager
from app.jobs.options import DEFAULT_DEV_FRACTION, DEFAULT_TEST_FRACTION, JobOptions
from app.jobs.records import FINAL, JOB_ID_RE
from app.settings import Settings
from app.spartan.memory import TaskType

# A follow stream ends after this long (the client reconnects): no stream holds a draining shutdown
# or a proxy's idle timeout for long.
EVENTS_MAX_S = 20.0
EVENTS_POLL_S = 0.5  # this replica's own jobs (memory); another replica's: every second, from the store
_MEDIA_FORMATS: dict[str, DataFormat] = {
    "application/json": "json",
    "application/x-ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/x-jsonlines": "jsonl",
    "text/csv": "csv",
    "text/tab-separated-values": "tsv",
}
_SUFFIX_FORMATS: dict[str, DataFormat] = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"
}  # fmt: skip
_PARTS = {"file": "train", "dev_file": "dev", "test_file": "test"}


def manager(svc: ServicesDep) -> JobManager:
    if svc.jobs is None:
        raise NotReady("training jobs are not available yet")
    return svc.jobs


Jobs = Annotated[JobManager, Depends(manager)]


def job_options(
    few_shot: Annotated[int | None, Query(ge=1, description="Train on this many rows (stratified).")] = None,
    epochs: Annotated[int | None, Query(ge=1, le=1000, description="Default: the few-shot recipe's.")] = None,
    lr: Annotated[float | None, Query(gt=0, le=1, description="Default: the few-shot recipe's.")] = None,
    batch_size: Annotated[int | None, Query(ge=1, le=1024)] = None,
    max_length: Annotated[int | None, Query(ge=8, le=512, description="Tokens per input.")] = None,
    num_parents: Annotated[int | None, Query(ge=1, le=1024, description="E: parents per layer.")] = None,
    num_children: Annotated[int | None, Query(ge=1, le=64, description="C: children per parent.")] = None,
    top_k: Annotated[int | None, Query(ge=1, le=1024, description="k: parents used per token.")] = None,
    temperature: Annotated[float | None, Query(ge=1e-3, le=1e3, description="T: child softmax.")] = None,
    seed: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="Splits, sample, training.")] = None,
    dev_fraction: Annotated[
        float, Query(ge=0, le=0.5, description="Cut from the training rows when no dev rows are sent.")
    ] = DEFAULT_DEV_FRACTION,
    test_fraction: Annotated[
        float, Query(ge=0, le=0.5, description="Cut from the training rows when no test rows are sent.")
    ] = DEFAULT_TEST_FRACTION,
    task_type: Annotated[TaskType | None, Query(description="Default: inferred from the labels.")] = None,
) -> JobOptions:
    return JobOptions(
        few_shot=few_shot, epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length,
        num_parents=num_parents, num_children=num_children, top_k=top_k, temperature=temperature, seed=seed,
        dev_fraction=dev_fraction, test_fraction=test_fraction, task_type=task_type,
    )  # fmt: skip


def job_id(
    job_id: Annotated[
        str,
        Path(
            description="A training job's id.",
            examples=["20261201-101500-3fa2c1d0"],
            json_schema_extra={"pattern": f"^{JOB_ID_RE.pattern}$"},
        ),
    ],
) -> str:
    return job_id  # checked by the manager's own rule (JobNotFound: 404), like every way in


JobId = Annotated[str, Depends(job_id)]


# ------------------------------------------------------------------------------------------ submit


async def submit_job(
    request: Request,
    response: Response,
    task: TaskName,
    svc: ServicesDep,
    jobs: Jobs,
    options: Annotated[JobOptions, Depends(job_options)],
    replace: Annotated[bool, Query(description="Replace the task's memory if it exists.")] = False,
    if_match: Annotated[
        str | None,
        Header(description="Install only if the task's version (sha256) is still this one; * = any."),
    ] = None,
) -> TrainingJobOut:
    """Train a task memory from labelled rows, in a process of its own; 202 with the job.

    The body is the data: JSON (`{"rows": [...], "dev_rows"?: [...], "test_rows"?: [...]}`), a JSONL,
    CSV or TSV file of training rows (by Content-Type, or as the `file` part of a multipart form, with
    optional `dev_file` and `test_file` parts), columns `text`, `label`, optional `text_pair`.
    Options are query parameters; each left out is the trainer's few-shot recipe. Dev and test rows
    not sent are cut from the training rows (seeded, stratified). Every row is checked before the job
    is queued (422 names the split, row, line and reason). The finished memory is installed like an
    upload: a task that exists needs `replace=true` or If-Match (checked now, and again at the end).
    """
    settings, num_layers = svc.settings, svc.registry.identity.num_layers
    options.train_config(num_layers)  # options that do not fit together are refused before the body is read
    splits = await read_training_rows(request, settings.max_training_bytes)
    limits = DataLimits(
        settings.max_training_rows, settings.max_training_labels, settings.max_text_chars, num_layers
    )
    data = await asyncio.to_thread(training_data, task, splits, options, limits)
    record = await asyncio.to_thread(
        jobs.submit, task, data, options, replace=replace, if_match=parse_if_match(if_match)
    )
    response.status_code = 202
    response.headers["Location"] = f"/v1/training-jobs/{record.id}"
    return TrainingJobOut.of(record)


async def read_training_rows(request: Request, limit: int) -> dict[str, list[RawRow]]:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        return await _multipart_rows(request, limit)
    data_format = _MEDIA_FORMATS.get(media)
    if data_format is None:
        raise StarletteHTTPException(
            415,
            f"send the training data as application/json, application/x-ndjson (JSONL), text/csv, "
            f"text/tab-separated-values or multipart/form-data, not {media or 'no content type'!r}",
        )
    body = await _read_limited(request, limit)
    if data_format == "json":
        return await asyncio.to_thread(rows_from_json, body)
    return {"train": await asyncio.to_thread(rows_from_file, body, data_format)}


def _too_large(size: int | str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the training data is {size} bytes, more than the limit of {limit} bytes "
        "(SPARTAN_MAX_TRAINING_BYTES)"
    )


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(declared, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"over {limit}", limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_rows(request: Request, limit: int) -> dict[str, list[RawRow]]:
    body = await _read_limited(request, limit + MULTIPART_SLACK_BYTES)

    async def replay() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(request.headers, replay(), max_files=len(_PARTS), max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise TrainingDataInvalid(f"malformed multipart body: {err.message}", reason="malformed") from None
    try:
        splits: dict[str, list[RawRow]] = {}
        for part, split in _PARTS.items():
            upload = form.get(part)
            if upload is None:
                continue
            if not isinstance(upload, UploadFile):
                raise TrainingDataInvalid(f"multipart part {part!r} must be a file", reason="malformed")
            splits[split] = await asyncio.to_thread(
                rows_from_file, await upload.read(), _part_format(upload), split
            )
        if "train" not in splits:
            raise TrainingDataInvalid("the multipart body has no part named 'file' (the training rows)",
                                      reason="missing_rows", split="train")  # fmt: skip
    finally:
        await form.close()
    return splits


def _part_format(upload: UploadFile) -> DataFormat:
    name = (upload.filename or "").lower()
    for suffix, data_format in _SUFFIX_FORMATS.items():
        if name.endswith(suffix):
            return data_format
    media = (upload.content_type or "").split(";")[0].strip().lower()
    found = _MEDIA_FORMATS.get(media)
    if found is None or found == "json":
        raise TrainingDataInvalid(
            f"part {upload.filename or '(unnamed)'!r}: name a .jsonl, .csv or .tsv file (or send its "
            "content type)", reason="unsupported_format",
        )  # fmt: skip
    return found


# ------------------------------------------------------------------------------------------ reading


async def get_job(job_id: JobId, jobs: Jobs) -> TrainingJobOut:
    """A job: state, progress (epoch, step, loss, ETA), dev score per epoch, final metrics, version."""
    return TrainingJobOut.of(await _record(jobs, job_id))


async def _record(jobs: JobManager, job_id: str) -> Any:
    own = jobs.peek(job_id) if JOB_ID_RE.fullmatch(job_id) else None  # no I/O for this replica's jobs
    return own if own is not None else await asyncio.to_thread(jobs.get, job_id)


async def list_jobs(
    jobs: Jobs,
    task: Annotated[str | None, Query(description="Only this task's jobs.")] = None,
    state: Annotated[
        Literal["queued", "running", "succeeded", "failed", "cancelled"] | None,
        Query(description="Only these."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> TrainingJobList:
    """Training jobs of every replica (their records in the store), newest first."""
    found = await asyncio.to_thread(jobs.list, task=task, state=state, limit=limit)
    return TrainingJobList(jobs=[TrainingJobOut.of(record) for record in found])


async def cancel_job(job_id: JobId, jobs: Jobs, response: Response) -> TrainingJobOut:
    """Cancel a queued or running job (its process is stopped; nothing is installed). 200 with the
    job once cancelled; 202 while a job another replica runs has been asked to stop."""
    record = await asyncio.to_thread(jobs.cancel, job_id)
    response.status_code = 200 if record.state in FINAL else 202
    return TrainingJobOut.of(record)


async def job_events(job_id: JobId, jobs: Jobs) -> StreamingResponse:
    """Server-Sent Events: `event: job` with the job (as GET returns it) whenever it changes, until it
    ends (then `event: end`) or for 20 s (reconnect to go on)."""
    first = await _record(jobs, job_id)  # an unknown job is a 404 before the stream starts
    return StreamingResponse(
        _events(jobs, job_id, first),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # nginx: do not buffer it
    )


async def _events(jobs: JobManager, job_id: str, record: Any) -> AsyncIterator[str]:
    started, sent = time.monotonic(), ""
    while True:
        shown = TrainingJobOut.of(record).model_dump_json()
        if shown != sent:
            yield f"event: job\ndata: {shown}\n\n"
            sent = shown
        if record.state in FINAL:
            yield "event: end\ndata: {}\n\n"
            return
        if time.monotonic() - started > EVENTS_MAX_S:
            return
        own = jobs.peek(job_id)
        await asyncio.sleep(EVENTS_POLL_S if own is not None else 2 * EVENTS_POLL_S)
        try:
            record = await _record(jobs, job_id)
        except (JobNotFound, StoreUnavailable):  # pruned, or the store is down: the client reconnects
            return


# ------------------------------------------------------------------------------------------ routes


def _submit_body() -> dict[str, Any]:
    rows = {"type": "string", "description": "Rows with a header: text, label, optional text_pair."}
    files = {name: {"type": "string", "format": "binary"} for name in _PARTS}
    return {
        "requestBody": {
            "required": True,
            "description": "The training data (checked row by row before the job is queued).",
            "content": {
                "application/json": {"schema": TrainingDataIn.model_json_schema()},
                "application/x-ndjson": {"schema": {"type": "string", "description": "One row per line."}},
                "text/csv": {"schema": rows},
                "text/tab-separated-values": {"schema": rows},
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": files, "required": ["file"]}
                },
            },
        }
    }


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["training jobs"])
    reader, admin = reader_dependencies(settings), [Depends(require_admin)]
    router.add_api_route(
        "/v1/tasks/{task}/training-jobs",
        submit_job,
        methods=["POST"],
        response_model=TrainingJobOut,
        status_code=202,
        dependencies=admin,
        responses=error_responses(401, 403, 409, 413, 415, 422, 429, 503, 507),
        openapi_extra=_submit_body(),
        max_body_size=settings.max_training_bytes + MULTIPART_SLACK_BYTES,
        summary="Train a task memory (a training job)",
    )
    router.add_api_route(
        "/v1/training-jobs",
        list_jobs,
        methods=["GET"],
        response_model=TrainingJobList,
        dependencies=reader,
        responses=error_responses(401, 503),
        summary="List training jobs",
    )
    router.add_api_route(
        "/v1/training-jobs/{job_id}",
        get_job,
        methods=["GET"],
        response_model=TrainingJobOut,
        dependencies=reader,
        responses=error_responses(401, 404, 503),
        summary="Describe a training job",
    )
    router.add_api_route(
        "/v1/training-jobs/{job_id}",
        cancel_job,
        methods=["DELETE"],
        response_model=TrainingJobOut,
        dependencies=admin,
        responses={
            202: {"model": TrainingJobOut, "description": "Asked to stop (another replica runs it)"},
            **error_responses(401, 403, 404, 409, 503),
        },
        summary="Cancel a training job",
    )
    router.add_api_route(
        "/v1/training-jobs/{job_id}/events",
        job_events,
        methods=["GET"],
        dependencies=reader,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "The job, each time it changes"},
            **error_responses(401, 404, 503),
        },
        response_class=StreamingResponse,
        summary="Follow a training job (Server-Sent Events)",
    )
    return router

"""Client and AsyncClient: every endpoint of the service, typed, with bounded retries.

Retries, both bounded:
- a 429 (queue full) or 503 (not ready, store unreachable) answer to a request that is safe to repeat
  (reads and predictions; writes only on `not_ready`, which the service answers before touching
  anything) is retried after the answer's Retry-After seconds (or a doubling backoff where none is
  sent), at most `RetryPolicy.max_retries` times and `RetryPolicy.max_total_wait_s` seconds in all;
  a wait that would pass that total is not started: the error is raised at once;
- a prediction whose kept-alive connection was dropped before any answer (the server closed it idle
  at that very moment: docs/SERVICE.md#shutdown) is sent once more. Only on a reused connection: a
  fresh connection that drops is a server in trouble, and that is raised as ServiceUnreachable.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from app.client.errors import ServiceError, ServiceUnreachable, service_error
from app.client.models import (
    ErrorBody,
    Health,
    PredictRequest,
    PredictResponse,
    RoutingOut,
    TaskList,
    TaskOut,
    TrainingJobList,
    TrainingJobOut,
)

DEFAULT_URL = "http://127.0.0.1:8000"
Model = TypeVar("Model", bound=BaseModel)
TextInput = str | tuple[str, str] | Sequence[str]
MemorySource = bytes | str | os.PathLike[str]
# A training job's rows ({"text", "text_pair"?, "label"} each), or a JSONL, CSV or TSV file's path.
TrainingRows = Sequence[Mapping[str, Any]] | str | os.PathLike[str]
TRAINING_OPTIONS = frozenset({
    "few_shot", "epochs", "lr", "batch_size", "max_length", "num_parents", "num_children", "top_k",
    "temperature", "seed", "dev_fraction", "test_fraction", "task_type",
})  # fmt: skip
_FILE_PARTS = {"train": "file", "dev": "dev_file", "test": "test_file"}

# httpx errors that mean the connection went away after the request was (partly) sent, unanswered.
_DROPPED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
_CONNECTED = "connection.connect_tcp.started"  # httpcore's trace event of a new TCP connection


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3  # retries of a 429/503 answer, per call
    max_total_wait_s: float = 30.0  # most seconds one call spends waiting between its tries
    backoff_s: float = 0.5  # first wait where a 503 sends no Retry-After; doubles each retry
    retry_dropped_predictions: bool = True  # resend a prediction once on a dropped kept-alive connection


NO_RETRIES = RetryPolicy(max_retries=0, retry_dropped_predictions=False)


@dataclass(frozen=True)
class UploadResult:
    task: TaskOut
    created: bool  # 201: a new task; False: 200, replaced
    etag: str  # the new version, quoted, for a later If-Match


@dataclass
class _Call:
    method: str
    path: str
    key: str | None
    repeatable: bool  # safe to send again after a 429/503
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    json: Any = None
    content: bytes | None = None
    files: dict[str, tuple[str, bytes]] | None = None
    prediction: bool = False
    accept: frozenset[int] = frozenset()  # non-2xx statuses that are answers, not errors


@dataclass
class _Attempt:
    connected: bool = False  # this try opened a new TCP connection (so it did not reuse one)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_of(response: httpx.Response) -> ServiceError:
    """The typed exception of an error answer (one that is not in the one error shape, e.g. a proxy's
    502 page, is an http_error, or internal_error for a 5xx, with the start of its text)."""
    retry_after = _retry_after(response)
    try:
        body = ErrorBody.model_validate_json(response.content).error
    except ValidationError:
        kind = "internal_error" if response.status_code >= 500 else "http_error"
        return service_error(response.status_code, kind, response.text[:200], None, retry_after)
    return service_error(response.status_code, body.type, body.message, body.details, retry_after)


def _parse(model: type[Model], response: httpx.Response) -> Model:
    return model.model_validate_json(response.content)


def _input(item: TextInput) -> str | list[str]:
    return item if isinstance(item, str) else list(item)


def _read_memory(memory: MemorySource) -> bytes:
    return memory if isinstance(memory, bytes) else Path(memory).read_bytes()


def _task_path(task: str, suffix: str = "") -> str:
    # Quoted whole: a name with '/' or '..' reaches the service as one (refused) name, never another path.
    return f"/v1/tasks/{quote(task, safe='')}{suffix}"


def _job_path(job_id: str, suffix: str = "") -> str:
    return f"/v1/training-jobs/{quote(job_id, safe='')}{suffix}"


def _if_match(if_match: str | None) -> dict[str, str]:
    if if_match is None:
        return {}
    return {"if-match": if_match if if_match == "*" or if_match.startswith('"') else f'"{if_match}"'}


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) of a Server-Sent Events stream's lines."""
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", list[str]()
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


class _Calls:
    """What each endpoint sends and which key it carries; shared by both clients."""

    def __init__(
        self,
        url: str,
        admin_key: str | None,
        predict_key: str | None,
        timeout_s: float,
        retry: RetryPolicy,
        metrics_key: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.admin_key = admin_key
        self.reader_key = predict_key or admin_key  # the service takes the admin key for reads too
        # /metrics takes its own key where the service has one, else the readers' keys.
        self.metrics_key = metrics_key or self.reader_key
        self.timeout = httpx.Timeout(timeout_s)
        self.retry = retry

    def _predict(
        self, task: str, inputs: Sequence[TextInput], return_all_scores: bool, return_routing: bool
    ) -> _Call:
        # Not validated here: the service is the one judge of a request (its 422 names what is wrong).
        body = PredictRequest.model_construct(
            inputs=[_input(item) for item in inputs],
            return_all_scores=return_all_scores,
            return_routing=return_routing,
        )
        return _Call(
            "POST", _task_path(task, "/predict"), self.reader_key, True,
            json=body.model_dump(), prediction=True,
        )  # fmt: skip

    def _upload(self, task: str, memory: MemorySource, replace: bool, if_match: str | None) -> _Call:
        headers = {"content-type": "application/octet-stream", **_if_match(if_match)}
        params = {"replace": "true"} if replace else {}
        return _Call(
            "PUT", _task_path(task, "/memory"), self.admin_key, False,
            params=params, headers=headers, content=_read_memory(memory),
        )  # fmt: skip

    def _submit_job(
        self,
        task: str,
        train: TrainingRows,
        dev: TrainingRows | None,
        test: TrainingRows | None,
        replace: bool,
        if_match: str | None,
        options: Mapping[str, Any],
    ) -> _Call:
        unknown = set(options) - TRAINING_OPTIONS
        if unknown:
            raise TypeError(f"unknown training options {sorted(unknown)}; known: {sorted(TRAINING_OPTIONS)}")
        params = {name: str(value) for name, value in options.items() if value is not None}
        if replace:
            params["replace"] = "true"
        call = _Call("POST", _task_path(task, "/training-jobs"), self.admin_key, False, params=params,
                     headers=_if_match(if_match))  # fmt: skip
        splits = {"train": train, "dev": dev, "test": test}
        given = {split: rows for split, rows in splits.items() if rows is not None}
        files = {split: rows for split, rows in given.items() if isinstance(rows, str | os.PathLike)}
        if files and len(files) != len(given):
            raise TypeError("give every split as rows, or every split as a file, not a mix")
        if files:
            call.files = {
                _FILE_PARTS[split]: (Path(path).name, Path(path).read_bytes())
                for split, path in files.items()
            }
        else:
            keys = {"train": "rows", "dev": "dev_rows", "test": "test_rows"}
            call.json = {
                keys[split]: [dict(row) for row in rows]
                for split, rows in given.items()
                if not isinstance(rows, str | os.PathLike)
            }
        return call

    def _wait_before_retry(
        self, call: _Call, error: ServiceError, retries: int, waited: float
    ) -> float | None:
        """Seconds to wait before sending `call` again after `error`, or None: raise it."""
        if error.status not in (429, 503) or not (call.repeatable or error.type == "not_ready"):
            return None
        if retries >= self.retry.max_retries:
            return None
        wait = error.retry_after if error.retry_after is not None else self.retry.backoff_s * 2**retries
        return None if waited + wait > self.retry.max_total_wait_s else wait

    def _resend_dropped(
        self, call: _Call, err: httpx.TransportError, attempt: _Attempt, resent: bool
    ) -> bool:
        return (
            call.prediction
            and self.retry.retry_dropped_predictions
            and not resent
            and isinstance(err, _DROPPED)
            and not attempt.connected
        )

    def _headers(self, call: _Call) -> dict[str, str]:
        auth = {"authorization": f"Bearer {call.key}"} if call.key else {}
        return {**call.headers, **auth}

    @staticmethod
    def _unreachable(call: _Call, url: str, err: httpx.TransportError) -> ServiceUnreachable:
        return ServiceUnreachable(f"{call.method} {url}{call.path}: {type(err).__name__}: {err}")


class Client(_Calls):
    """A blocking client: `with Client(url, admin_key=..., predict_key=...) as c: c.predict(...)`."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        admin_key: str | None = None,
        predict_key: str | None = None,
        metrics_key: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, admin_key, predict_key, timeout_s, retry or RetryPolicy(), metrics_key)
        self._http = httpx.Client(base_url=self.url, timeout=self.timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> httpx.Response:
        waited, retries, resent = 0.0, 0, False
        while True:
            attempt = _Attempt()

            def trace(name: str, info: dict[str, Any], attempt: _Attempt = attempt) -> None:
                attempt.connected |= name == _CONNECTED

            try:
                response = self._http.request(
                    call.method, call.path, params=call.params, headers=self._headers(call),
                    json=call.json, content=call.content, files=call.files, extensions={"trace": trace},
                )  # fmt: skip
            except httpx.TransportError as err:
                if self._resend_dropped(call, err, attempt, resent):
                    resent = True
                    continue
                raise self._unreachable(call, self.url, err) from err
            if response.is_success or response.status_code in call.accept:
                return response
            error = error_of(response)
            wait = self._wait_before_retry(call, error, retries, waited)
            if wait is None:
                raise error
            time.sleep(wait)
            waited, retries = waited + wait, retries + 1

    def predict(
        self,
        task: str,
        inputs: Sequence[TextInput],
        *,
        return_all_scores: bool = False,
        return_routing: bool = False,
    ) -> PredictResponse:
        """Texts, or text pairs (text, second text), through the task's memory."""
        return _parse(
            PredictResponse, self._send(self._predict(task, inputs, return_all_scores, return_routing))
        )

    def upload(
        self, task: str, memory: MemorySource, *, replace: bool = False, if_match: str | None = None
    ) -> UploadResult:
        """Create the task, or replace it (`replace=True`, or `if_match=<its current version>`)."""
        response = self._send(self._upload(task, memory, replace, if_match))
        return UploadResult(_parse(TaskOut, response), response.status_code == 201, response.headers["etag"])

    def delete(self, task: str) -> None:
        self._send(_Call("DELETE", _task_path(task), self.admin_key, False))

    def list_tasks(self) -> TaskList:
        return _parse(TaskList, self._send(_Call("GET", "/v1/tasks", self.reader_key, True)))

    def get_task(self, task: str) -> TaskOut:
        return _parse(TaskOut, self._send(_Call("GET", _task_path(task), self.reader_key, True)))

    def routing(self, task: str) -> RoutingOut:
        return _parse(
            RoutingOut, self._send(_Call("GET", _task_path(task, "/routing"), self.reader_key, True))
        )

    def health(self) -> Health:
        """/healthz: the process answers."""
        return _parse(Health, self._send(_Call("GET", "/healthz", None, True)))

    def ready(self) -> Health:
        """/readyz, not retried: `status` is 'ready' or 'not_ready' (with its reasons)."""
        return _parse(Health, self._send(_Call("GET", "/readyz", None, False, accept=frozenset({503}))))

    def metrics(self) -> str:
        """/metrics: the Prometheus text exposition."""
        return self._send(_Call("GET", "/metrics", self.metrics_key, True)).text

    # ------------------------------------------------------------------ training jobs

    def submit_job(
        self,
        task: str,
        train: TrainingRows,
        *,
        dev: TrainingRows | None = None,
        test: TrainingRows | None = None,
        replace: bool = False,
        if_match: str | None = None,
        **options: Any,
    ) -> TrainingJobOut:
        """Train `task`'s memory from rows (dicts: text, text_pair?, label) or files (JSONL, CSV, TSV
        paths); options (epochs=, lr=, few_shot=, ...) default to the trainer's few-shot recipe."""
        call = self._submit_job(task, train, dev, test, replace, if_match, options)
        return _parse(TrainingJobOut, self._send(call))

    def get_job(self, job_id: str) -> TrainingJobOut:
        return _parse(TrainingJobOut, self._send(_Call("GET", _job_path(job_id), self.reader_key, True)))

    def list_jobs(
        self, *, task: str | None = None, state: str | None = None, limit: int = 50
    ) -> TrainingJobList:
        params = {
            k: v for k, v in {"task": task, "state": state, "limit": str(limit)}.items() if v is not None
        }
        call = _Call("GET", "/v1/training-jobs", self.reader_key, True, params=params)
        return _parse(TrainingJobList, self._send(call))

    def cancel_job(self, job_id: str) -> TrainingJobOut:
        """Cancelled (or, run by another replica, asked to stop: `cancel_requested`, state unchanged)."""
        return _parse(TrainingJobOut, self._send(_Call("DELETE", _job_path(job_id), self.admin_key, False)))

    def follow_job(self, job_id: str) -> Iterator[TrainingJobOut]:
        """The job each time it changes (Server-Sent Events, reconnecting), until it has finished."""
        while True:
            headers = self._headers(_Call("GET", "", self.reader_key, True))
            try:
                with self._http.stream("GET", _job_path(job_id, "/events"), headers=headers) as response:
                    if not response.is_success:
                        response.read()
                        raise error_of(response)
                    last = None
                    for event, data in sse_events(response.iter_lines()):
                        if event == "job":
                            last = TrainingJobOut.model_validate(json.loads(data))
                            yield last
            except httpx.TransportError as err:
                raise ServiceUnreachable(f"GET {self.url}{_job_path(job_id, '/events')}: {err}") from err
            if last is not None and last.finished:
                return

    def wait_job(self, job_id: str) -> TrainingJobOut:
        """The job once it has finished (succeeded, failed or cancelled)."""
        last = self.get_job(job_id)
        for last in self.follow_job(job_id):  # noqa: B007
            pass
        return last


class AsyncClient(_Calls):
    """The same calls for asyncio: `async with AsyncClient(url) as c: await c.predict(...)`."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        admin_key: str | None = None,
        predict_key: str | None = None,
        metrics_key: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, admin_key, predict_key, timeout_s, retry or RetryPolicy(), metrics_key)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=self.timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        waited, retries, resent = 0.0, 0, False
        while True:
            attempt = _Attempt()

            async def trace(name: str, info: dict[str, Any], attempt: _Attempt = attempt) -> None:
                attempt.connected |= name == _CONNECTED

            try:
                response = await self._http.request(
                    call.method, call.path, params=call.params, headers=self._headers(call),
                    json=call.json, content=call.content, files=call.files, extensions={"trace": trace},
                )  # fmt: skip
            except httpx.TransportError as err:
                if self._resend_dropped(call, err, attempt, resent):
                    resent = True
                    continue
                raise self._unreachable(call, self.url, err) from err
            if response.is_success or response.status_code in call.accept:
                return response
            error = error_of(response)
            wait = self._wait_before_retry(call, error, retries, waited)
            if wait is None:
                raise error
            await asyncio.sleep(wait)
            waited, retries = waited + wait, retries + 1

    async def predict(
        self,
        task: str,
        inputs: Sequence[TextInput],
        *,
        return_all_scores: bool = False,
        return_routing: bool = False,
    ) -> PredictResponse:
        call = self._predict(task, inputs, return_all_scores, return_routing)
        return _parse(PredictResponse, await self._send(call))

    async def upload(
        self, task: str, memory: MemorySource, *, replace: bool = False, if_match: str | None = None
    ) -> UploadResult:
        response = await self._send(self._upload(task, memory, replace, if_match))
        return UploadResult(_parse(TaskOut, response), response.status_code == 201, response.headers["etag"])

    async def delete(self, task: str) -> None:
        await self._send(_Call("DELETE", _task_path(task), self.admin_key, False))

    async def list_tasks(self) -> TaskList:
        return _parse(TaskList, await self._send(_Call("GET", "/v1/tasks", self.reader_key, True)))

    async def get_task(self, task: str) -> TaskOut:
        return _parse(TaskOut, await self._send(_Call("GET", _task_path(task), self.reader_key, True)))

    async def routing(self, task: str) -> RoutingOut:
        call = _Call("GET", _task_path(task, "/routing"), self.reader_key, True)
        return _parse(RoutingOut, await self._send(call))

    async def health(self) -> Health:
        return _parse(Health, await self._send(_Call("GET", "/healthz", None, True)))

    async def ready(self) -> Health:
        call = _Call("GET", "/readyz", None, False, accept=frozenset({503}))
        return _parse(Health, await self._send(call))

    async def metrics(self) -> str:
        return (await self._send(_Call("GET", "/metrics", self.metrics_key, True))).text

    # ------------------------------------------------------------------ training jobs

    async def submit_job(
        self,
        task: str,
        train: TrainingRows,
        *,
        dev: TrainingRows | None = None,
        test: TrainingRows | None = None,
        replace: bool = False,
        if_match: str | None = None,
        **options: Any,
    ) -> TrainingJobOut:
        call = self._submit_job(task, train, dev, test, replace, if_match, options)
        return _parse(TrainingJobOut, await self._send(call))

    async def get_job(self, job_id: str) -> TrainingJobOut:
        call = _Call("GET", _job_path(job_id), self.reader_key, True)
        return _parse(TrainingJobOut, await self._send(call))

    async def list_jobs(
        self, *, task: str | None = None, state: str | None = None, limit: int = 50
    ) -> TrainingJobList:
        params = {
            k: v for k, v in {"task": task, "state": state, "limit": str(limit)}.items() if v is not None
        }
        call = _Call("GET", "/v1/training-jobs", self.reader_key, True, params=params)
        return _parse(TrainingJobList, await self._send(call))

    async def cancel_job(self, job_id: str) -> TrainingJobOut:
        call = _Call("DELETE", _job_path(job_id), self.admin_key, False)
        return _parse(TrainingJobOut, await self._send(call))

    async def follow_job(self, job_id: str) -> AsyncIterator[TrainingJobOut]:
        while True:
            headers = self._headers(_Call("GET", "", self.reader_key, True))
            last = None
            try:
                async with self._http.stream(
                    "GET", _job_path(job_id, "/events"), headers=headers
                ) as response:
                    if not response.is_success:
                        await response.aread()
                        raise error_of(response)
                    lines = [line async for line in response.aiter_lines()]
            except httpx.TransportError as err:
                raise ServiceUnreachable(f"GET {self.url}{_job_path(job_id, '/events')}: {err}") from err
            for event, data in sse_events(lines):
                if event == "job":
                    last = TrainingJobOut.model_validate(json.loads(data))
                    yield last
            if last is not None and last.finished:
                return

    async def wait_job(self, job_id: str) -> TrainingJobOut:
        last = await self.get_job(job_id)
        async for last in self.follow_job(job_id):  # noqa: B007
            pass
        return last

"""The Python client (app/client) against a real `spartan serve` process on the tiny backbone: every
call, every error type it maps, its bounded 429 retries (an in-process app whose batch worker is held,
the only way a full queue is deterministic) and its one resend of a prediction dropped on a reused
keep-alive connection (a scripted loopback server)."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest
from api_fixtures import HeldRunner, Served
from client_services import ADMIN_KEY, PREDICT_KEY, Service, service_fixture  # noqa: F401  (the fixture)
from procs import ROOT

import app.api.schemas as server_schemas
import app.errors as domain
from app import client as sc
from app.api.errors import _HTTP_TYPES, error_type, status_for
from app.client.models import WIRE_MODELS
from app.settings import Settings


def admin(url: str, **kwargs: Any) -> sc.Client:
    return sc.Client(url, admin_key=ADMIN_KEY, predict_key=PREDICT_KEY, **kwargs)


# ------------------------------------------------------------------ the client is a client


def test_importing_the_client_loads_neither_torch_nor_the_service() -> None:
    code = (
        "import sys, app.client, app.remote_cli; "
        "print(sorted({'torch', 'fastapi', 'app.engine', 'app.settings'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def _strip(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip(v) for k, v in schema.items() if k not in {"description", "examples"}}
    if isinstance(schema, list):
        return [_strip(v) for v in schema]
    return schema


@pytest.mark.parametrize("model", WIRE_MODELS, ids=lambda m: m.__name__)
def test_wire_model_mirrors_match_the_services_models(model: Any) -> None:
    served = getattr(server_schemas, model.__name__)
    for mode in ("validation", "serialization"):
        assert _strip(model.model_json_schema(mode=mode)) == _strip(served.model_json_schema(mode=mode))


def _domain_errors() -> list[type[domain.SpartanError]]:
    found = [k for _, k in inspect.getmembers(domain, inspect.isclass) if issubclass(k, domain.SpartanError)]
    return [
        k for k in found if k not in {domain.SpartanError, domain.DatasetError}
    ]  # DatasetError: training only


@pytest.mark.parametrize("kind", _domain_errors(), ids=lambda k: k.__name__)
def test_every_service_error_type_has_its_client_class(kind: type[domain.SpartanError]) -> None:
    client_kind = sc.ERROR_TYPES[error_type(kind("x"))]
    assert client_kind.__name__ == kind.__name__
    parent = kind.__mro__[1]
    if (
        parent is not domain.SpartanError
    ):  # the service's hierarchy is kept: BackboneMismatch is a MemoryInvalid
        assert client_kind.__mro__[1].__name__ == parent.__name__
    assert status_for(kind("x")) >= 400


def test_the_edges_own_error_types_have_client_classes() -> None:
    for kind in [*_HTTP_TYPES.values(), "invalid_request", "internal_error", "http_error"]:
        assert kind in sc.ERROR_TYPES, kind


# ------------------------------------------------------------------ every call, on a real process


def test_every_call_against_a_real_process(service: Service) -> None:
    with admin(service.url) as client:
        assert client.health().status == "alive"
        assert client.ready().status == "ready"
        names = {t.name: t for t in client.list_tasks().tasks}
        assert set(names) >= {"sentiment", "pairs"}
        shown = client.get_task("sentiment")
        assert shown.labels == ["negative", "positive"]
        assert shown.version == names["sentiment"].version

        texts = ["the film was good", "what a dull film"]
        answer = client.predict("sentiment", texts, return_all_scores=True, return_routing=True)
        raw = httpx.post(
            f"{service.url}/v1/tasks/sentiment/predict",
            json={"inputs": texts, "return_all_scores": True, "return_routing": True},
            headers={"authorization": f"Bearer {PREDICT_KEY}"},
        ).json()
        assert answer.model_dump(mode="json") == raw  # the same answer, typed
        assert answer.version == shown.version
        assert len(answer.predictions) == 2
        for p in answer.predictions:
            assert p.scores is not None
            assert p.routing is not None
            assert p.label in p.scores
            assert abs(sum(p.scores.values()) - 1) < 1e-5  # float32 softmax over 2 labels
        pair = client.predict("pairs", [("how do i reset my card", "i forgot my pin")])
        assert pair.predictions[0].label in {"negative", "positive"}

        routed = client.routing("sentiment")
        assert routed.version == shown.version
        assert routed.rows >= 2
        assert len(routed.layers) == 2

        created = client.upload("fresh", service.other)
        assert created.created
        assert created.task.name == "fresh"
        assert created.etag == f'"{created.task.version}"'
        replaced = client.upload("fresh", service.sentiment, replace=True)
        assert not replaced.created
        assert replaced.task.version == shown.version
        again = client.upload("fresh", service.other, if_match=replaced.task.version)
        assert not again.created
        assert again.task.version == created.task.version
        assert "fresh" in {t.name for t in client.list_tasks().tasks}
        client.delete("fresh")
        with pytest.raises(sc.TaskNotFound):
            client.get_task("fresh")

        exposition = client.metrics()
        assert re.search(r'spartan_requests_total\{outcome="ok",task="sentiment"\} [1-9]', exposition)


def test_the_async_client_against_a_real_process(service: Service, tmp_path: Any) -> None:
    path = tmp_path / "other.safetensors"
    path.write_bytes(service.other)

    async def run() -> None:
        async with sc.AsyncClient(service.url, admin_key=ADMIN_KEY, predict_key=PREDICT_KEY) as client:
            assert (await client.health()).status == "alive"
            assert (await client.ready()).status == "ready"
            answer = await client.predict("sentiment", ["the film was good"], return_all_scores=True)
            assert answer.task == "sentiment"
            assert answer.predictions[0].scores is not None
            assert "sentiment" in {t.name for t in (await client.list_tasks()).tasks}
            assert (await client.get_task("pairs")).text_pairs is True
            assert (await client.routing("sentiment")).rows >= 1
            uploaded = await client.upload("async-task", path)  # from a path
            assert uploaded.created
            assert (await client.get_task("async-task")).version == uploaded.task.version
            await client.delete("async-task")
            with pytest.raises(sc.TaskNotFound):
                await client.get_task("async-task")
            assert "spartan_requests_total" in await client.metrics()

    asyncio.run(run())


# ------------------------------------------------------------------ every error type, mapped


def _error_cases(
    service: Service, keys: sc.Client, nobody: sc.Client, predictor: sc.Client
) -> dict[str, tuple[Callable[[], Any], type[sc.ServiceError], int]]:
    return {
        "unknown task": (lambda: keys.get_task("nope"), sc.TaskNotFound, 404),
        "predict, unknown task": (lambda: keys.predict("nope", ["x"]), sc.TaskNotFound, 404),
        "pair for a text task": (lambda: keys.predict("sentiment", [("a", "b")]), sc.InvalidInput, 422),
        "text too long": (lambda: keys.predict("sentiment", ["x" * 10_001]), sc.InvalidInput, 422),
        "three texts as a pair": (
            lambda: keys.predict("sentiment", [["a", "b", "c"]]), sc.InvalidRequest, 422,
        ),
        "no inputs": (lambda: keys.predict("sentiment", []), sc.InvalidRequest, 422),
        "bad task name": (lambda: keys.get_task("-bad"), sc.InvalidTaskName, 422),
        "not a memory file": (lambda: keys.upload("junk", b"\x00" * 2048), sc.MemoryInvalid, 422),
        "exists, no replace": (lambda: keys.upload("sentiment", service.other), sc.MemoryConflict, 409),
        "stale If-Match": (
            lambda: keys.upload("sentiment", service.other, if_match="0" * 64), sc.MemoryConflict, 409,
        ),
        "too large": (
            lambda: keys.upload("big", b"\x00" * (service.max_upload_bytes + 1)), sc.PayloadTooLarge, 413,
        ),
        "no predict key": (lambda: nobody.predict("sentiment", ["x"]), sc.AuthenticationRequired, 401),
        "no key to list": (lambda: nobody.list_tasks(), sc.AuthenticationRequired, 401),
        "predict key to write": (lambda: predictor.delete("sentiment"), sc.AuthenticationRequired, 401),
        "unknown task, delete": (lambda: keys.delete("nope"), sc.TaskNotFound, 404),
    }  # fmt: skip


CASES = [
    "unknown task", "predict, unknown task", "pair for a text task", "text too long", "three texts as a pair",
    "no inputs", "bad task name", "not a memory file", "exists, no replace", "stale If-Match", "too large",
    "no predict key", "no key to list", "predict key to write", "unknown task, delete",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_service_errors_are_raised_as_their_type(service: Service, case: str) -> None:
    with (
        admin(service.url, retry=sc.NO_RETRIES) as keys,
        sc.Client(service.url, retry=sc.NO_RETRIES) as nobody,
        sc.Client(service.url, admin_key=PREDICT_KEY, retry=sc.NO_RETRIES) as predictor,  # can't write
    ):
        call, kind, status = _error_cases(service, keys, nobody, predictor)[case]
        with pytest.raises(kind) as raised:
            call()
    assert type(raised.value) is kind
    assert raised.value.status == status
    assert raised.value.type == re.sub(r"(?<!^)(?=[A-Z])", "_", kind.__name__).lower()
    assert raised.value.message  # the service's message, for people
    with sc.Client(service.url, admin_key=ADMIN_KEY) as client:  # nothing changed
        assert client.get_task("sentiment").version is not None


def test_an_unreachable_service_is_its_own_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        with sc.Client(f"http://127.0.0.1:{port}") as client, pytest.raises(sc.ServiceUnreachable):
            client.health()


# ------------------------------------------------------------------ in-process: 403, 404 off, 429


def test_writes_disabled_and_routing_off_are_their_types(
    serve: Callable[[Settings], AbstractAsyncContextManager[Served]],
    settings_for: Callable[..., Settings],
    memory_file: Callable[..., bytes],
) -> None:
    settings = settings_for(allow_unauthenticated_writes=False, routing_stats=False)

    async def run() -> None:
        async with serve(settings) as (app, _):
            transport = httpx.ASGITransport(app=app)
            async with sc.AsyncClient("http://spartan.test", transport=transport, retry=sc.NO_RETRIES) as c:
                with pytest.raises(sc.WritesDisabled) as refused:
                    await c.upload("sentiment", memory_file())
                assert refused.value.status == 403
                with pytest.raises(sc.RoutingStatsDisabled) as off:
                    await c.routing("sentiment")
                assert off.value.status == 404

    asyncio.run(run())


class _Counting(httpx.AsyncBaseTransport):
    """The app's ASGI transport, counting predict answers by status; before forwarding try number
    `hold_before`, it awaits `gate` (so a test decides what the queue holds when a retry arrives)."""

    def __init__(self, app: Any, gate: asyncio.Event | None = None, hold_before: int = 0) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.statuses: list[int] = []
        self.sent_at: list[float] = []
        self.first_429 = asyncio.Event()
        self.gate, self.hold_before = gate, hold_before

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent_at.append(time.monotonic())
        if self.gate is not None and len(self.sent_at) == self.hold_before:
            await self.gate.wait()
        response = await self.inner.handle_async_request(request)
        self.statuses.append(response.status_code)
        if response.status_code == 429:
            self.first_429.set()
        return response


async def _fill_queue(app: Any, client: httpx.AsyncClient) -> tuple[HeldRunner, list[asyncio.Task[Any]]]:
    """One request inside a held pass, one filling the 2-row queue behind it: the next one gets 429."""
    held = HeldRunner.install(app)
    body = {"inputs": ["the film was good", "a dull film"]}
    running = asyncio.create_task(client.post("/v1/tasks/sentiment/predict", json=body))
    await held.until_running()
    queued = asyncio.create_task(client.post("/v1/tasks/sentiment/predict", json=body))
    await held.until_accepted(2)
    return held, [running, queued]


def test_429_is_retried_after_retry_after_and_succeeds_once_the_queue_drains(
    serve: Callable[[Settings], AbstractAsyncContextManager[Served]],
    settings_for: Callable[..., Settings],
    memory_file: Callable[..., bytes],
    write_memory: Callable[[Settings, str, bytes], None],
) -> None:
    settings = settings_for(max_queue_rows=2, max_inputs_per_request=2, max_batch_size=2)
    write_memory(settings, "sentiment", memory_file())

    async def run() -> None:
        async with serve(settings) as (app, http):
            held, ahead = await _fill_queue(app, http)
            drained = asyncio.Event()
            transport = _Counting(app, gate=drained, hold_before=2)
            async with sc.AsyncClient("http://spartan.test", transport=transport) as client:
                call = asyncio.create_task(client.predict("sentiment", ["an unexpected delight"]))
                await transport.first_429.wait()  # refused while the worker is held
                held.release()
                assert [r.status_code for r in await asyncio.gather(*ahead)] == [200, 200]
                drained.set()  # the retry goes in only now: onto an empty queue
                answer = await call
            assert answer.predictions[0].label in {"negative", "positive"}
            assert transport.statuses == [429, 200]
            assert transport.sent_at[1] - transport.sent_at[0] >= 1.0  # Retry-After: 1 (at least a second)

    asyncio.run(run())


@pytest.mark.parametrize(
    ("policy", "tries"),
    [
        (sc.RetryPolicy(max_retries=2, max_total_wait_s=10), 3),  # 2 retries, 1 s apart
        (sc.RetryPolicy(max_retries=5, max_total_wait_s=0.5), 1),  # a 1 s wait does not fit 0.5 s
    ],
    ids=["max_retries", "max_total_wait"],
)
def test_429_retries_are_bounded(
    serve: Callable[[Settings], AbstractAsyncContextManager[Served]],
    settings_for: Callable[..., Settings],
    memory_file: Callable[..., bytes],
    write_memory: Callable[[Settings, str, bytes], None],
    policy: sc.RetryPolicy,
    tries: int,
) -> None:
    settings = settings_for(max_queue_rows=2, max_inputs_per_request=2, max_batch_size=2)
    write_memory(settings, "sentiment", memory_file())

    async def run() -> None:
        async with serve(settings) as (app, http):
            held, ahead = await _fill_queue(app, http)
            transport = _Counting(app)
            try:
                async with sc.AsyncClient("http://spartan.test", transport=transport, retry=policy) as client:
                    with pytest.raises(sc.Overloaded) as refused:
                        await client.predict("sentiment", ["an unexpected delight"])
            finally:
                held.release()
                await asyncio.gather(*ahead)
            assert refused.value.status == 429
            assert refused.value.retry_after is not None
            assert refused.value.retry_after >= 1
            assert transport.statuses == [429] * tries
            gaps = [b - a for a, b in zip(transport.sent_at, transport.sent_at[1:], strict=False)]
            assert all(gap >= refused.value.retry_after for gap in gaps)

    asyncio.run(run())


# ------------------------------------------------------------------ a dropped kept-alive connection


PREDICTED = json.dumps(
    {"task": "t", "version": "v", "task_type": "classification", "routing_token": None,
     "predictions": [{"label": "positive", "score": 0.9, "scores": None, "value": None, "routing": None}]}
).encode()  # fmt: skip
HEALTHY = b'{"status": "alive", "reasons": []}'
CREATED = json.dumps(
    {"name": "t", "status": "loaded", "version": "v", "loaded_version": "v", "task_type": "classification",
     "labels": ["a", "b"], "text_pairs": False, "max_length": 8, "file_bytes": 1, "memory_bytes": 1,
     "pinned": False, "load_seconds": 0.0, "error": None, "requests": {}}
).encode()  # fmt: skip


def _ok(body: bytes) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b'ETag: "v"\r\n\r\n' + body


class ScriptedServer:
    """A loopback HTTP/1.1 server that answers connection i's requests with script[i] in order;
    None = close the connection without answering that request. Records each request line."""

    def __init__(self, script: list[list[bytes | None]]) -> None:
        self.script = script
        self.requests: list[tuple[int, str]] = []  # (connection index, request line)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for index, answers in enumerate(self.script):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                for answer in answers:
                    line = self._read_request(conn)
                    self.requests.append((index, line))
                    if answer is None:
                        break
                    conn.sendall(answer)

    @staticmethod
    def _read_request(conn: socket.socket) -> str:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        while length and len(body) < int(length.group(1)):
            body += conn.recv(65536)
        return head.split(b"\r\n", 1)[0].decode()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def scripted() -> Iterator[Callable[[list[list[bytes | None]]], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(script: list[list[bytes | None]]) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_a_prediction_dropped_on_a_reused_connection_is_sent_once_more(scripted: Any) -> None:
    server = scripted([[_ok(HEALTHY), None], [_ok(PREDICTED)]])
    with sc.Client(server.url) as client:
        client.health()  # the connection is now kept alive, idle
        answer = client.predict("t", ["x"])  # the server closes it instead of answering
    assert answer.predictions[0].label == "positive"
    assert server.requests == [
        (0, "GET /healthz HTTP/1.1"),
        (0, "POST /v1/tasks/t/predict HTTP/1.1"),
        (1, "POST /v1/tasks/t/predict HTTP/1.1"),  # once more, on a new connection
    ]


def test_the_async_client_resends_a_dropped_prediction_too(scripted: Any) -> None:
    server = scripted([[_ok(HEALTHY), None], [_ok(PREDICTED)]])

    async def run() -> sc.PredictResponse:
        async with sc.AsyncClient(server.url) as client:
            await client.health()
            return await client.predict("t", ["x"])

    assert asyncio.run(run()).predictions[0].label == "positive"
    assert [index for index, _ in server.requests] == [0, 0, 1]


@pytest.mark.parametrize(
    ("script", "call"),
    [
        ([[_ok(HEALTHY), None], [_ok(PREDICTED)]], "predict, resend off"),
        ([[None], [_ok(PREDICTED)]], "predict, fresh connection"),
        ([[_ok(HEALTHY), None], [_ok(CREATED)]], "upload"),
    ],
    ids=["resend-off", "fresh-connection", "upload"],
)
def test_other_drops_are_not_resent(scripted: Any, script: list[list[bytes | None]], call: str) -> None:
    server = scripted(script)
    policy = sc.RetryPolicy(retry_dropped_predictions=call != "predict, resend off")
    with sc.Client(server.url, admin_key=ADMIN_KEY, retry=policy) as client:
        if call != "predict, fresh connection":
            client.health()
        send: Callable[[], Any] = (
            (lambda: client.upload("t", b"memory"))  # not a prediction: it may have been stored
            if call == "upload"
            else (lambda: client.predict("t", ["x"]))
        )
        with pytest.raises(sc.ServiceUnreachable):
            send()
    assert len(server.requests) == (1 if call == "predict, fresh connection" else 2)

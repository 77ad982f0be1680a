"""Slow clients cannot hold the service: a body that does not arrive within SPARTAN_BODY_TIMEOUT_S is
answered 408, for predictions and uploads alike, and the service goes on serving. Against a real
process: connections silent or slow with their headers are closed at SPARTAN_HEADER_TIMEOUT_S,
2,000 idle sockets do not lock clients out, oversized headers get 431 and cost no memory."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import select
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from procs import ROOT, Replica, wait_until

pytestmark = pytest.mark.model


def stalling_body(first: bytes, stall_s: float) -> Any:
    async def chunks() -> AsyncIterator[bytes]:
        yield first
        await asyncio.sleep(stall_s)  # the client stops sending half-way
        yield b"}"

    return chunks()


@pytest.mark.parametrize(
    ("method", "path", "first"),
    [
        ("POST", "/v1/tasks/sentiment/predict", b'{"inputs": ["a fine'),
        ("PUT", "/v1/tasks/slow/memory", b"\x10\x00\x00\x00\x00\x00\x00\x00{"),
    ],
)
def test_a_stalled_body_gets_408_in_time_and_the_service_goes_on(
    method: str, path: str, first: bytes, settings_for: Any, serve: Any, memory_file: Any, write_memory: Any
) -> None:
    settings = settings_for(body_timeout_s=0.5)
    write_memory(settings, "sentiment", memory_file(seed=5))

    async def scenario() -> None:
        async with serve(settings) as (_, client):
            started = time.monotonic()
            stalled = await client.request(method, path, content=stalling_body(first, 5.0))
            waited = time.monotonic() - started
            assert stalled.status_code == 408, stalled.text
            assert stalled.json()["error"]["type"] == "body_timeout"
            assert "SPARTAN_BODY_TIMEOUT_S" in stalled.json()["error"]["message"]
            assert waited < 3, waited  # answered at the deadline, not when the client gave up
            ok = await client.post("/v1/tasks/sentiment/predict", json={"inputs": ["a fine film"]})
            assert ok.status_code == 200
            assert (await client.get("/v1/tasks/slow")).status_code == 404  # nothing was stored

    asyncio.run(scenario())


# ------------------------------------------------ a real process: idle, slow and oversized headers

HEADER_TIMEOUT_S = 1.0
MAX_HEADER_BYTES = 32 * 1024
QUICK_MAX_CONNECTIONS = 8


def start_replica(name: str, workdir: Path, **settings: str) -> Replica:
    memories = workdir / "memories"
    memories.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "memories" / "sentiment.safetensors", memories)
    env = {"SPARTAN_MEMORY_DIR": str(memories), "SPARTAN_STORE_POLL_INTERVAL_S": "0", **settings}
    return Replica(name, env, workdir).start_ready()


@pytest.fixture(scope="module")
def fd_room() -> Iterator[None]:
    """Room for 2,000 attacker sockets in this process, and in the replica it starts (inherited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    """A replica with a 1 s header deadline and room for few connections."""
    replica = start_replica(
        "quick-headers",
        tmp_path_factory.mktemp("quick"),
        SPARTAN_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        SPARTAN_MAX_CONNECTIONS=str(QUICK_MAX_CONNECTIONS),
    )
    yield replica
    replica.stop()


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory, fd_room: None) -> Iterator[Replica]:
    """A replica whose header deadline (60 s) outlasts every test: only the connection cap and the
    header size cap can explain what these tests see."""
    replica = start_replica(
        "patient-headers",
        tmp_path_factory.mktemp("patient"),
        SPARTAN_HEADER_TIMEOUT_S="60",
        SPARTAN_MAX_CONNECTIONS="512",
        SPARTAN_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
    )
    yield replica
    replica.stop()


def connect(replica: Replica) -> socket.socket:
    return socket.create_connection(("127.0.0.1", replica.port), timeout=10)


def seconds_until_closed(
    socks: dict[str, socket.socket], limit_s: float, trickle: tuple[str, bytes] | None = None
) -> dict[str, float | None]:
    """Seconds from now until the server closed each socket (None: still open after limit_s). With
    `trickle` (name, data), one byte of data goes to that socket every 0.25 s meanwhile (a client
    that sends its headers very slowly)."""
    started = time.monotonic()
    closed: dict[str, float | None] = dict.fromkeys(socks)
    sent = 0
    while time.monotonic() - started < limit_s and any(v is None for v in closed.values()):
        open_socks = [sock for name, sock in socks.items() if closed[name] is None]
        readable, _, _ = select.select(open_socks, [], [], 0.25)  # wakes on a close itself
        for name, sock in socks.items():
            if sock in readable:
                try:
                    gone = sock.recv(65536) == b""
                except ConnectionResetError:
                    gone = True
                if gone:
                    closed[name] = time.monotonic() - started
        if not readable and trickle is not None and closed[trickle[0]] is None and sent < len(trickle[1]):
            try:
                socks[trickle[0]].send(trickle[1][sent : sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed[trickle[0]] = time.monotonic() - started
            sent += 1
    return closed


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
def test_silent_and_slow_header_connections_are_closed_at_the_header_deadline(quick: Replica) -> None:
    socks = {"silent": connect(quick), "partial": connect(quick), "trickling": connect(quick)}
    try:
        socks["partial"].sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never the blank line
        slow_headers = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
        closed = seconds_until_closed(socks, 5, trickle=("trickling", slow_headers))
    finally:
        for sock in socks.values():
            sock.close()
    # A deadline, not an inactivity timer: the trickling client is closed on time although it never
    # stops sending.
    for what, seconds in closed.items():
        assert seconds is not None, f"{what}: still open after 5 s"
        assert HEADER_TIMEOUT_S * 0.8 <= seconds <= HEADER_TIMEOUT_S + 1.0, closed
    assert httpx.get(f"{quick.url}/healthz", timeout=5).status_code == 200


@pytest.mark.slow
def test_a_keep_alive_request_must_send_its_headers_within_the_deadline(quick: Replica) -> None:
    with connect(quick) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        conn.sendall(b"GET /healthz HTTP/1.1\r\n")  # a second request, whose headers never finish
        closed = seconds_until_closed({"keep-alive": conn}, 5)["keep-alive"]
    assert closed is not None, "a half-sent keep-alive request held its connection"
    assert closed <= HEADER_TIMEOUT_S + 1.0, closed


@pytest.mark.slow
def test_requests_beyond_the_cap_in_flight_get_503_in_the_error_shape(quick: Replica) -> None:
    head = (
        "POST /v1/tasks/sentiment/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    in_flight = [connect(quick) for _ in range(QUICK_MAX_CONNECTIONS)]
    try:
        for conn in in_flight:  # each request runs, waiting for the rest of its body
            conn.sendall(head.encode() + b'{"inputs": ["a fi')
        refused: list[httpx.Response] = []

        def busy() -> bool:
            refused.append(httpx.get(f"{quick.url}/healthz", timeout=5))
            return refused[-1].status_code == 503

        wait_until(busy, 10, "a request beyond the cap refused")
        response = refused[-1]
        assert response.json()["error"]["type"] == "server_busy", response.text
        assert "SPARTAN_MAX_CONNECTIONS" in response.json()["error"]["message"]
        assert response.headers["retry-after"] == "1"
    finally:
        for conn in in_flight:
            conn.close()
    wait_until(lambda: httpx.get(f"{quick.url}/healthz", timeout=5).status_code == 200, 10, "served again")


@pytest.mark.slow
def test_clients_are_served_while_2000_idle_sockets_are_open(patient: Replica) -> None:
    assert patient.process is not None
    pid = patient.process.pid
    baseline_fds = open_fds(pid)
    idle = [connect(patient) for _ in range(2000)]  # the attacker keeps its end of each one open
    try:
        statuses = []
        started = time.monotonic()
        for _ in range(20):  # each on a new connection: one more beyond the cap, every time
            statuses.append(httpx.get(f"{patient.url}/healthz", timeout=10).status_code)
        predict = httpx.post(
            f"{patient.url}/v1/tasks/sentiment/predict", json={"inputs": ["a fine film"]}, timeout=30
        )
        elapsed = time.monotonic() - started
        held = open_fds(pid) - baseline_fds
    finally:
        for sock in idle:
            sock.close()
    print(f"2,000 idle sockets: 20 + 1 requests served in {elapsed:.2f} s; the server held {held} more fds")
    assert statuses == [200] * 20, statuses
    assert predict.status_code == 200, predict.text
    assert elapsed < 20, elapsed
    assert held <= 512 + 8, f"the server holds {held} more descriptors than before the flood"


@pytest.mark.slow
@pytest.mark.parametrize("complete", [True, False], ids=["complete-headers", "unfinished-headers"])
def test_oversized_headers_get_431_in_the_error_shape(patient: Replica, complete: bool) -> None:
    big = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 8192)
    with connect(patient) as conn:
        conn.sendall(big + (b"\r\n\r\n" if complete else b""))
        answer = b""
        while chunk := conn.recv(65536):  # the server closes after its answer
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), answer[:200]
    error = json.loads(body)["error"]
    assert error["type"] == "headers_too_large"
    assert "SPARTAN_MAX_HEADER_BYTES" in error["message"]
    assert httpx.get(f"{patient.url}/healthz", timeout=5).status_code == 200


@pytest.mark.slow
def test_eight_30_mb_header_floods_do_not_grow_memory(patient: Replica) -> None:
    assert patient.process is not None
    pid = patient.process.pid
    flood_bytes = 30 * 1024 * 1024
    chunk = b"a" * 65536
    accepted: list[int] = []

    def flood() -> None:
        sent = 0
        with connect(patient) as conn:
            try:
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Flood: ")
                while sent < flood_bytes:
                    conn.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server closed the connection: what it is meant to do
        accepted.append(sent)

    before = rss_bytes(pid)
    threads = [threading.Thread(target=flood) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    after = rss_bytes(pid)
    grown = after - before
    print(f"RSS before {before / 2**20:.1f} MiB, after 8 x 30 MB header floods {after / 2**20:.1f} MiB")
    assert len(accepted) == 8
    assert max(accepted) < flood_bytes, f"a 30 MB header was read to its end: {accepted}"
    assert grown < 16 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB"
    assert httpx.get(f"{patient.url}/healthz", timeout=5).status_code == 200

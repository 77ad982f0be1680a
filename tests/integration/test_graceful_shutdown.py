"""SIGTERM under load, on a real `spartan serve` process: it stops accepting, answers every request it
had accepted (queued ones included), and exits cleanly within its shutdown deadline."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from procs import ROOT, Replica, wait_until

pytestmark = [pytest.mark.model, pytest.mark.slow]

CLIENTS = 12
# What the service logs once new handshakes are stopped (app/http_server.py), before its request grace.
DRAINING = "Draining: no new connections"
TEXTS = ["a long and winding review of a film that was, on the whole, rather good"] * 4


def client_loop(url: str, stop: threading.Event, outcomes: list[tuple[float, str]]) -> None:
    """Predict in a loop, a new connection per request, until the server refuses connections."""
    while not stop.is_set():
        try:
            # No keep-alive: a request either reaches the server on a fresh connection, or is refused.
            response = httpx.post(f"{url}/v1/tasks/sentiment/predict", json={"inputs": TEXTS}, timeout=60)
            outcomes.append((time.monotonic(), str(response.status_code)))
        except httpx.ConnectError:
            outcomes.append((time.monotonic(), "refused"))  # never accepted: the listener is closed
            return
        except httpx.TransportError as err:  # accepted, then dropped: what must never happen
            outcomes.append((time.monotonic(), f"dropped: {type(err).__name__}"))
            return


def draining_replica(tmp_path: Path) -> Replica:
    store = tmp_path / "memories"
    shutil.copytree(ROOT / "memories", store)
    env = {
        "SPARTAN_MEMORY_DIR": str(store),
        "SPARTAN_STORE_POLL_INTERVAL_S": "0",
        "SPARTAN_MAX_BATCH_SIZE": "8",
        "SPARTAN_SHUTDOWN_TIMEOUT_S": "30",
    }
    return Replica("drain", env, tmp_path).start_ready()


def raw_request(port: int, method: str, path: str, body: bytes = b"", *, close: bool = True) -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: {'close' if close else 'keep-alive'}\r\n\r\n"
    )
    return head.encode() + body


def raw_predict_request(port: int) -> bytes:
    return raw_request(port, "POST", "/v1/tasks/sentiment/predict", json.dumps({"inputs": TEXTS}).encode())


def read_response(conn: socket.socket) -> tuple[bytes, bytes]:
    """One response (status line and headers, body) off a keep-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert length is not None, head
    while len(body) < int(length.group(1)):
        body += conn.recv(65536)
    return head, body


def test_request_arriving_just_after_sigterm_on_an_accepted_connection_is_answered(tmp_path: Path) -> None:
    """The race CI caught: the client connected before the signal, its request bytes came after.

    Plain uvicorn closes such a connection unanswered; the service gives its request time to arrive,
    and meanwhile, still running, takes no new connection. Two connections made before the signal:
    one the server has surely accepted (it answered a first request on it and keeps it alive), one
    fresh (accepted, or still in the kernel's queue).
    """
    replica = draining_replica(tmp_path)
    try:
        with (
            socket.create_connection(("127.0.0.1", replica.port), timeout=30) as kept,
            socket.create_connection(("127.0.0.1", replica.port), timeout=30) as fresh,
        ):
            kept.sendall(raw_request(replica.port, "GET", "/healthz", close=False))
            assert read_response(kept)[0].startswith(b"HTTP/1.1 200 OK")  # accepted, and now idle
            replica.send(signal.SIGTERM)
            wait_until(lambda: DRAINING in replica.log.read_text(), 30, "the drain to start", every_s=0.01)
            for conn in (kept, fresh):
                conn.sendall(raw_predict_request(replica.port))
            # While it drains, a new connection is not taken: the kernel drops its handshake (a timeout
            # here; a refusal where the listener is closed instead). On loopback an accepted handshake
            # takes microseconds, so 0.1 s tells them apart, and leaves most of the 0.5 s grace.
            with pytest.raises((httpx.ConnectError, httpx.ConnectTimeout)):
                httpx.get(f"{replica.url}/healthz", timeout=httpx.Timeout(0.1))
            assert replica.alive, "the process had exited: the new connection was not tried while draining"
            answers = [b"".join(iter(lambda conn=conn: conn.recv(65536), b"")) for conn in (kept, fresh)]
        assert replica.wait(40) in (0, -signal.SIGTERM)
    finally:
        replica.stop(signal.SIGKILL)
    for answer in answers:
        status_line, _, body = answer.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 200 OK", answer[:300]
        assert json.loads(body.partition(b"\r\n\r\n")[2])["task"] == "sentiment"


def test_sigterm_under_load_drops_no_accepted_request(tmp_path: Path) -> None:
    replica = draining_replica(tmp_path)
    stop = threading.Event()
    outcomes: list[tuple[float, str]] = []
    threads = [
        threading.Thread(target=client_loop, args=(replica.url, stop, outcomes)) for _ in range(CLIENTS)
    ]
    try:
        for thread in threads:
            thread.start()
        time.sleep(3)  # the queue is full of work when the signal comes
        sigterm_at = time.monotonic()
        replica.send(signal.SIGTERM)
        code = replica.wait(40)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        replica.stop(signal.SIGKILL)
    kinds = {kind for _, kind in outcomes}
    answered_after = [t for t, kind in outcomes if kind == "200" and t > sigterm_at]
    print(f"\nSIGTERM under load: {len(outcomes)} requests, {len(answered_after)} answered after the signal, "
          f"outcomes {sorted(kinds)}, exit code {code}")  # fmt: skip
    assert kinds <= {"200", "refused"}, outcomes
    assert answered_after, "no request was in flight at the signal: the test did not exercise draining"
    # uvicorn re-raises the signal once it has shut down cleanly, so the exit status says "SIGTERM".
    assert code in (0, -signal.SIGTERM)
    log = replica.log.read_text()
    assert "Application shutdown complete" in log  # the lifespan ran: batcher and poller stopped
    assert "timeout graceful shutdown exceeded" not in log  # nothing was cancelled at the deadline

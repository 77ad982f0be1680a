"""SIGTERM under load, on a real `spartan serve` process: it stops accepting, answers every request it
had accepted (queued ones included), and exits cleanly within its shutdown deadline."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from procs import ROOT, Replica

pytestmark = [pytest.mark.model, pytest.mark.slow]

CLIENTS = 12
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


def raw_predict_request(port: int) -> bytes:
    body = json.dumps({"inputs": TEXTS}).encode()
    head = (
        f"POST /v1/tasks/sentiment/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def test_request_arriving_just_after_sigterm_on_an_accepted_connection_is_answered(tmp_path: Path) -> None:
    """The race CI caught: the client connected before the signal, its request bytes came after.

    Plain uvicorn closes such a connection unanswered; the service gives its request time to arrive.
    """
    replica = draining_replica(tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", replica.port), timeout=30) as conn:
            time.sleep(0.3)  # the server has accepted the connection; no request yet
            replica.send(signal.SIGTERM)
            time.sleep(0.1)  # the signal is being handled: new handshakes stop
            conn.sendall(raw_predict_request(replica.port))
            answer = b"".join(iter(lambda: conn.recv(65536), b""))
        assert replica.wait(40) in (0, -signal.SIGTERM)
    finally:
        replica.stop(signal.SIGKILL)
    status_line, _, body = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK", answer[:300]
    assert json.loads(body.partition(b"\r\n\r\n")[2])["task"] == "sentiment"
    with pytest.raises(httpx.ConnectError):  # and new connections are refused
        httpx.get(f"{replica.url}/livez", timeout=5)


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

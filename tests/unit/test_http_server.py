"""The drain's first step on real loopback sockets: new handshakes stop, queued connections survive."""

from __future__ import annotations

import socket
import sys

import pytest

from app.http_server import refuse_new_handshakes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="socket filters are Linux-only")


def send_and_read(conn: socket.socket) -> bytes:
    conn.sendall(b"request")
    return conn.recv(16)


def test_new_handshakes_are_dropped_but_queued_connections_are_kept() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=8) as listener:
        address = listener.getsockname()
        queued = socket.create_connection(address, timeout=5)  # completed by the kernel, not accepted
        assert refuse_new_handshakes([listener])
        with pytest.raises(TimeoutError):  # the SYN is dropped: no answer at all
            socket.create_connection(address, timeout=0.5).close()
        accepted, _ = listener.accept()
        with accepted, queued:
            accepted.sendall(b"answer")
            assert send_and_read(queued) == b"answer"  # the queued connection is intact both ways
            assert accepted.recv(16) == b"request"
    with pytest.raises(ConnectionRefusedError):  # and once the listener closes, clients are refused
        socket.create_connection(address, timeout=5).close()


def test_without_a_filter_closing_a_listener_resets_its_queued_connections() -> None:
    """Why the filter exists: this is what plain uvicorn's shutdown does to a queued client."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=8)
    queued = socket.create_connection(listener.getsockname(), timeout=5)
    listener.close()
    with queued, pytest.raises(ConnectionResetError):  # the kernel reset it when the listener closed
        send_and_read(queued)

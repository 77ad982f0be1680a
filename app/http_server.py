"""The HTTP server: uvicorn, one worker, with a shutdown that answers every connection it accepted,
and a connection guard in its HTTP protocol (header deadline and size cap, connection cap)."""

from __future__ import annotations

import asyncio
import copy
import ctypes
import logging
import os
import signal
import socket
import struct
import sys
from asyncio import TimerHandle
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

import uvicorn
from fastapi import FastAPI
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.api.errors import error_response, error_type, status_for
from app.errors import HeadersTooLarge, ServerBusy, SpartanError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send
    from uvicorn.server import ServerState

    from app.settings import Settings

logger = logging.getLogger(__name__)

# How long connections made before SIGTERM get to be accepted and for their requests to arrive. A
# client writes its request right after connecting, so this only has to cover a busy event loop.
REQUEST_ARRIVAL_GRACE_S = 0.5

# A refused connection (431) is closed this long after its answer, or once the client has sent this
# much more: enough for a client to read the answer, little for a flood to cost.
LINGER_S = 1.0
LINGER_MAX_BYTES = 1024 * 1024

SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>; Python's socket module does not export it
# One classic-BPF instruction, BPF_RET | BPF_K with k = 0: "keep 0 bytes", i.e. drop every packet.
DROP_EVERY_PACKET = struct.pack("HBBI", 0x06, 0, 0, 0)


def refuse_new_handshakes(listeners: list[socket.socket]) -> bool:
    """Make the kernel drop new SYNs to these listening sockets, but keep their accept queues.

    Closing a listener resets the connections the kernel completed but the process has not accepted
    yet: their clients sent a request and get a reset. A socket filter that drops every packet stops
    new handshakes instead (their clients retry the SYN after a second and find the port closed),
    while connections already completed stay queued for the event loop to accept. Linux only;
    False where it is not available, and the caller closes the listener at once instead.
    """
    if sys.platform != "linux":
        return False
    program = ctypes.create_string_buffer(DROP_EVERY_PACKET)
    fprog = struct.pack("HP", 1, ctypes.addressof(program))  # struct sock_fprog {len, filter*}
    try:
        for listener in listeners:
            # A duplicate descriptor names the same socket: the filter lands on the listener itself.
            with socket.socket(fileno=os.dup(listener.fileno())) as same_socket:
                same_socket.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as err:
        logger.warning("Could not stop new connections with a socket filter (%s); closing the listener", err)
        return False
    return True


class DrainingServer(uvicorn.Server):
    """uvicorn's graceful shutdown, minus its two ways to drop a request.

    uvicorn closes the listener, which resets connections still in the kernel's accept queue, and in
    the same step every connection with no request in flight, including one accepted a moment ago
    whose request is still in the socket buffer. Either way a client that sent a request gets no
    answer (seen under load in CI). Here new handshakes stop first, the queued connections are
    accepted and their requests get a short grace to arrive and become in-flight; then uvicorn
    drains as usual: in-flight requests finish, idle connections close.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        listeners = [sock for server in self.servers for sock in server.sockets]
        if not refuse_new_handshakes(listeners):
            for server in self.servers:
                server.close()  # idempotent: uvicorn's own shutdown closes them again
        logger.info("Draining: no new connections, %.1f s for requests on their way", REQUEST_ARRIVAL_GRACE_S)
        await asyncio.sleep(REQUEST_ARRIVAL_GRACE_S)
        await super().shutdown(sockets)


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may cost before it has a request in flight (see GuardedHttpProtocol)."""

    header_timeout_s: float
    max_header_bytes: int
    max_connections: int


class GuardedConfig(uvicorn.Config):
    """uvicorn's Config, with the connection limits its protocol instances read."""

    def __init__(self, app: ASGIApp, limits: ConnectionLimits, **kwargs: Any) -> None:
        # uvicorn's own limit_concurrency counts idle connections too, and answers in plain text: the
        # protocol below replaces it.
        super().__init__(app, http=GuardedHttpProtocol, limit_concurrency=None, **kwargs)
        self.connection_limits = limits


def raw_error_response(error: SpartanError) -> bytes:
    """An HTTP/1.1 response in the one error shape, for the protocol to write before any app runs."""
    status = status_for(error)
    response = error_response(status, error_type(error), str(error), headers={"connection": "close"})
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    head += [name + b": " + value for name, value in response.raw_headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + response.body


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, made to bound what a connection costs before its request runs.

    - Header deadline: the request line and headers must arrive within header_timeout_s (of the
      connection's opening for its first request, of the first byte for a later keep-alive request);
      a connection that is silent or trickles its headers is closed then. Once the headers are in,
      the app's BodyDeadline times the body.
    - Header size: more than max_header_bytes of request line and headers is answered 431 in the
      error shape, and the connection closed. httptools buffers a header it has not seen the end of
      by itself, with no limit: the bytes received are counted while headers are incomplete (so at
      most one read, 256 KiB, is buffered beyond the cap), the headers' exact size once complete.
    - Connection cap: a connection beyond max_connections closes the one that has waited longest
      without a request in flight (idle before its first byte, sending headers, or idle keep-alive);
      idle sockets then cannot hold the file descriptors, nor lock out a client that sends a request.
      A request that arrives while max_connections requests are in flight gets 503 (server_busy).
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        assert isinstance(config, GuardedConfig), "GuardedHttpProtocol needs a GuardedConfig"
        self.limits = config.connection_limits
        self.guarded_app = self.app
        self.header_deadline: TimerHandle | None = None
        self.awaiting_headers = True  # from the opening, or a request's first byte, to its headers' end
        self.header_bytes = 0
        self.waiting_since = 0.0  # since when it has had no request in flight
        self.refused = False  # answered before its request ran (431): the connection is closing
        self.discarded_bytes = 0

    # ------------------------------------------------------------------------------- connection cap

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.waiting_since = self.loop.time()
        self.header_deadline = self.loop.call_later(self.limits.header_timeout_s, self.header_deadline_passed)
        if len(self.connections) > self.limits.max_connections:
            self.close_longest_waiting()

    def close_longest_waiting(self) -> None:
        # Not this one: with every other connection busy, it stays (one over the cap, until the next
        # newcomer closes it or its request gets the 503 of a busy server).
        waiting = [
            c
            for c in self.connections
            if isinstance(c, GuardedHttpProtocol) and c is not self and c.is_waiting()
        ]
        if waiting:
            oldest = min(waiting, key=lambda c: c.waiting_since)
            logger.debug("connection cap reached: closing the connection waiting longest (%s)", oldest.client)
            self.connections.discard(oldest)  # no longer counted, though its close completes later
            oldest.transport.close()

    def is_waiting(self) -> bool:
        """No request in flight: not yet sent, still sending its headers, or an idle keep-alive."""
        in_flight = self.cycle is not None and not self.cycle.response_complete
        return not in_flight and not self.pipeline and not self.transport.is_closing()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.waiting_since = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_header_deadline()
        super().connection_lost(exc)

    # ------------------------------------------------------------------------ header deadline, size

    def header_deadline_passed(self) -> None:
        self.header_deadline = None
        if self.awaiting_headers and not self.transport.is_closing():
            logger.debug(
                "closing %s: no complete request headers within %g s",
                self.client,
                self.limits.header_timeout_s,
            )
            self.transport.close()

    def cancel_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def data_received(self, data: bytes) -> None:
        if self.refused:  # answered already: what the client still sends is read and dropped, unparsed
            self.discarded_bytes += len(data)
            if self.discarded_bytes > LINGER_MAX_BYTES:
                self.transport.close()
            return
        super().data_received(data)
        if self.awaiting_headers and not self.transport.is_closing():
            self.header_bytes += len(data)
            if self.header_bytes > self.limits.max_header_bytes:
                self.refuse_headers(f"over {self.limits.max_header_bytes}")

    def refuse_headers(self, size: int | str) -> None:
        """Answer 431 and close. A lingering close: the answer, then the end of our side, then what
        the client still sends is dropped for a moment, so that the client reads the answer rather
        than a reset (closing with its bytes unread would reset the connection)."""
        self.refused = True
        self.cancel_header_deadline()
        error = HeadersTooLarge(
            f"the request line and headers are {size} bytes, more than the limit of "
            f"{self.limits.max_header_bytes} bytes (SPARTAN_MAX_HEADER_BYTES)"
        )
        self.transport.write(raw_error_response(error))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.header_deadline = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.awaiting_headers = True
        self.header_bytes = 0
        if self.header_deadline is None:  # a later request on a keep-alive connection: from its first byte
            self.header_deadline = self.loop.call_later(
                self.limits.header_timeout_s, self.header_deadline_passed
            )

    def on_headers_complete(self) -> None:
        self.awaiting_headers = False
        self.cancel_header_deadline()
        if self.refused:
            return
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            self.refuse_headers(size)
            return
        busy = len(self.tasks) >= self.limits.max_connections
        self.app = refuse_busy if busy else self.guarded_app  # what uvicorn's handler runs for this request
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.refused:  # a refused request's body, parsed in the same read, goes nowhere
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self.refused:
            super().on_message_complete()


async def refuse_busy(scope: Scope, receive: Receive, send: Send) -> None:
    error = ServerBusy(
        "the service is at its limit of requests in flight (SPARTAN_MAX_CONNECTIONS); retry shortly"
    )
    headers = {"connection": "close", "Retry-After": "1"}
    await error_response(status_for(error), error_type(error), str(error), headers=headers)(
        scope, receive, send
    )


# ----------------------------------------------------------------------------------- access log

REDACTED = "[redacted]"


def redact_query(target: str, keep: frozenset[str]) -> str:
    """`path?query` with every query value redacted but those of the parameters named in `keep`: a
    key a client put in the URL (`?api_key=...`, refused) must not reach the log."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    pairs = []
    for pair in query.split("&"):
        name, equals, _ = pair.partition("=")
        if not equals:
            pairs.append(REDACTED if pair else pair)  # a bare value: it could be anything
        elif unquote_plus(name) in keep:
            pairs.append(pair)
        else:
            pairs.append(f"{name}={REDACTED}")
    return f"{path}?{'&'.join(pairs)}"


class RedactQueryValues(logging.Filter):
    """On uvicorn's access logger: its records' third argument is the request target with its query."""

    def __init__(self, keep: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__()
        self.keep = frozenset(keep)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2], self.keep), *args[3:])
        return True


def query_parameter_names(app: ASGIApp) -> list[str]:
    """The query parameters the API defines (e.g. `replace`): their values are logged as sent."""
    if not isinstance(app, FastAPI):
        return []
    names = {
        parameter["name"]
        for operations in app.openapi().get("paths", {}).values()
        for operation in operations.values()
        for parameter in operation.get("parameters", [])
        if parameter.get("in") == "query"
    }
    return sorted(names)


def access_log_config(keep: list[str]) -> dict[str, Any]:
    """uvicorn's own logging configuration, with query values redacted in its access log."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact_query": {"()": RedactQueryValues, "keep": keep}}
    config["loggers"]["uvicorn.access"]["filters"] = ["redact_query"]
    return config


def serve_http(app: ASGIApp, settings: Settings) -> None:
    """Run `app` until SIGTERM or SIGINT, then drain; exit with status 3 if it never started, else 0."""
    limits = ConnectionLimits(settings.header_timeout_s, settings.max_header_bytes, settings.max_connections)
    config = GuardedConfig(
        app,
        limits,
        host=settings.host,
        port=settings.port,
        workers=1,  # the model and registry are process state: a second worker would be a second copy
        log_level=settings.log_level,
        log_config=access_log_config(query_parameter_names(app)),
        # SIGTERM: stop accepting, let accepted requests finish (the batcher keeps running until the
        # lifespan ends), then exit; requests still running after this deadline are cancelled.
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
    )
    server = DrainingServer(config)
    # uvicorn re-raises a handled SIGTERM once it has drained, to the handler it found: the default one
    # kills the process (status 143) after a clean shutdown. Its own handler there makes that a no-op.
    previous = signal.signal(signal.SIGTERM, server.handle_exit)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE: the port was taken, or the lifespan failed

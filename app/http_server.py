"""The HTTP server: uvicorn, one worker, with a shutdown that answers every connection it accepted."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import struct
import sys
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from app.settings import Settings

logger = logging.getLogger(__name__)

# How long connections made before SIGTERM get to be accepted and for their requests to arrive. A
# client writes its request right after connecting, so this only has to cover a busy event loop.
REQUEST_ARRIVAL_GRACE_S = 0.5

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


def serve_http(app: ASGIApp, settings: Settings) -> None:
    """Run `app` until SIGTERM or SIGINT, then drain; exit with status 3 if it never started, else 0."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,  # the model and registry are process state: a second worker would be a second copy
        log_level=settings.log_level,
        # SIGTERM: stop accepting, let accepted requests finish (the batcher keeps running until the
        # lifespan ends), then exit; requests still running after this deadline are cancelled.
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
        limit_concurrency=settings.max_connections,
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

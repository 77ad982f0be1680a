"""Body size and time limits answered in the one error shape.

Each route declares its limit (FastAPI `max_body_size`), and Starlette's limiter enforces it while the
body streams in. For a body whose declared Content-Length is already too large, though, that limiter
answers in plain text; this middleware answers first, in JSON, before reading a byte of the body.
"""

from __future__ import annotations

import asyncio
import time

from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import error_response
from app.errors import BodyTimeout


class DeclaredLengthLimit:
    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        self.routes = routes  # the API's routes, each with its `max_body_size`

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = Headers(scope=scope).get("content-length", "")
            limit = self._route_limit(scope)
            if limit is not None and declared.isdigit() and int(declared) > limit:
                message = (
                    f"the request body is {declared} bytes, more than this endpoint's limit of {limit} bytes"
                )
                await error_response(413, "payload_too_large", message)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _route_limit(self, scope: Scope) -> int | None:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                limit = getattr(route, "max_body_size", None)
                return limit if isinstance(limit, int) else None
        return None


class BodyDeadline:
    """The whole request body must arrive within `timeout_s` of the request's start.

    A client that sends its body slowly (or stops half-way) would otherwise hold its connection and
    the request's memory for as long as it likes. Past the deadline, reading the body raises
    BodyTimeout (408). Once the body is complete, `receive` is passed through untouched (it then
    only waits for a disconnect).
    """

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.timeout_s
        body_done = False

        async def receive_before_deadline() -> dict[str, object]:
            nonlocal body_done
            if body_done:
                return dict(await receive())
            remaining = deadline - time.monotonic()
            try:
                message = dict(await asyncio.wait_for(receive(), timeout=max(remaining, 0.001)))
            except TimeoutError:
                raise BodyTimeout(
                    f"the request body did not arrive within {self.timeout_s:g} s (SPARTAN_BODY_TIMEOUT_S)"
                ) from None
            body_done = message.get("type") != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, receive_before_deadline, send)

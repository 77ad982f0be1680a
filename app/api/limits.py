"""Body size limits answered in the one error shape.

Each route declares its limit (FastAPI `max_body_size`), and Starlette's limiter enforces it while the
body streams in. For a body whose declared Content-Length is already too large, though, that limiter
answers in plain text; this middleware answers first, in JSON, before reading a byte of the body.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import error_response


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

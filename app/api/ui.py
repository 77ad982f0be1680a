"""GET /ui: a small read-only page over the public API (tasks, a prediction box, routing heatmaps).

Plain HTML and JavaScript shipped in the package (app/api/static): no build step and nothing fetched
from a CDN at run time. The page itself is public; what it shows comes from the API with the key the
user types into it (the predict key, where one is set).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

STATIC = Path(__file__).parent / "static"
# The page runs only its own script, talks only to this origin, and may not be framed.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=_HEADERS)


async def script() -> FileResponse:
    return FileResponse(STATIC / "app.js", media_type="text/javascript", headers=_HEADERS)


async def root() -> RedirectResponse:
    return RedirectResponse("/ui")


def build_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)
    router.add_api_route("/ui", page, methods=["GET"])
    router.add_api_route("/ui/app.js", script, methods=["GET"])
    router.add_api_route("/", root, methods=["GET"])
    return router

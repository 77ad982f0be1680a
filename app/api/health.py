"""Probes and metrics: /healthz (process alive), /readyz (backbone loaded, batch worker alive), /metrics
(guarded by the metrics key, or like the task listings where none is set)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.deps import Services, metrics_guarded, require_metrics_reader
from app.api.errors import error_responses
from app.api.schemas import Health
from app.metrics import Metrics
from app.settings import Settings


async def healthz() -> Health:
    """Liveness: the process answers. Never touches the model."""
    return Health(status="alive")


async def readyz(request: Request) -> JSONResponse:
    """Readiness: the backbone is loaded and the batch worker is alive and not stuck. `store` says
    whether the memory store answers (`down`: cold tasks and writes get 503, resident tasks serve)."""
    svc: Services | None = getattr(request.app.state, "services", None)
    reasons = ["the backbone and registry are not loaded yet"] if svc is None else []
    if svc is not None and (problem := svc.batcher.health()) is not None:
        reasons.append(problem)
    # The store is shown, not a reason to be unready: resident tasks still serve while the shared
    # store is down, and every replica would leave the load balancer at once if it were.
    store: Literal["up", "down"] | None = None
    if svc is not None:
        store = "up" if svc.registry.store_up else "down"
    health = Health(status="not_ready" if reasons else "ready", reasons=reasons, store=store)
    return JSONResponse(health.model_dump(), status_code=503 if reasons else 200)


async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this app's metrics."""
    registry: Metrics = request.app.state.metrics
    return Response(registry.exposition(), media_type=CONTENT_TYPE_LATEST)


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["health"])
    router.add_api_route("/healthz", healthz, methods=["GET"], response_model=Health, summary="Liveness")
    router.add_api_route(
        "/readyz",
        readyz,
        methods=["GET"],
        response_model=Health,
        responses={503: {"model": Health, "description": "Not ready"}},
        summary="Readiness",
    )
    router.add_api_route(
        "/metrics",
        metrics,
        methods=["GET"],
        response_class=Response,
        # Declared only where enforced: an open route with a security requirement would be a lie.
        dependencies=[Depends(require_metrics_reader)] if metrics_guarded(settings) else [],
        responses={
            200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus metrics"},
            **(error_responses(401) if metrics_guarded(settings) else {}),
        },
        summary="Prometheus metrics",
    )
    return router

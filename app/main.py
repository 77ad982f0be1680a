"""The application factory: `create_app(settings)`; the lifespan builds backbone, registry and batcher.

Nothing is loaded at import. For uvicorn: `uvicorn app.main:create_app --factory` (one worker: the
model and the registry are process state; several workers would each load their own), or
`spartan serve`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import embeddings, health, jobs, predict, tasks, ui
from app.api.deps import Services
from app.api.errors import install_error_handlers
from app.api.limits import BodyDeadline, DeclaredLengthLimit
from app.api.uploads import UploadBudget
from app.engine.batcher import Batcher, BatchingConfig
from app.engine.embedder import Embedder
from app.engine.encoder import SpartanEncoder
from app.engine.inputs import InputLimits
from app.engine.predictor import Predictor
from app.engine.routing_tally import RoutingTally
from app.engine.runner import EncoderRunner
from app.engine.serving import serving_encoder
from app.jobs.factory import open_job_records
from app.jobs.manager import JobManager, JobsConfig
from app.metrics import Metrics, package_version
from app.registry.factory import open_store
from app.registry.registry import Registry, RegistryConfig
from app.settings import Settings
from app.threads import started_pool

log = logging.getLogger(__name__)

# Threads of the loop's default executor: uploads, deletes and listings run their registry calls there
# (predictions never do: they go to the batcher, and cold loads to the registry's loader threads).
ADMIN_THREADS = 4
# How long a starting replica waits for its memory store (an S3 server starting beside it) to answer.
STORE_START_TIMEOUT_S = 60.0

DESCRIPTION = """
One frozen backbone, many task memories (SPARTAN): each request is routed through its task's memory;
requests of different tasks share backbone forward passes. Upload memories with
`PUT /v1/tasks/{task}/memory`; they are validated against the served backbone, stored atomically and
swapped in without a restart. Or train one from labelled rows with
`POST /v1/tasks/{task}/training-jobs`: the job runs in a process of its own and installs its memory
through the same upload path.
"""


def create_app(settings: Settings | None = None, *, encoder: SpartanEncoder | None = None) -> FastAPI:
    """A new app. `encoder` lets tests share one loaded backbone between apps (it is not closed)."""
    settings = settings or Settings()
    metrics = Metrics(settings.metrics_max_task_labels)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        asyncio.get_running_loop().set_default_executor(started_pool(ADMIN_THREADS, "spartan-admin"))
        services = await asyncio.to_thread(build_services, settings, metrics, encoder)
        # The backbone, tokenizer and registry are hundreds of thousands of long-lived objects: moved
        # out of the collector's reach, a full collection no longer walks them (it paused the event
        # loop for tens of ms, the tail latency of every request, 429s included).
        gc.collect()
        gc.freeze()
        announce_security(settings)
        app.state.services = services
        try:
            yield
        finally:
            app.state.services = None
            await asyncio.to_thread(shutdown, services, close_encoder=encoder is None)
            gc.unfreeze()  # what this app froze becomes collectable again (tests build many apps)

    app = FastAPI(
        title="spartan-serve",
        version=package_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.services = None
    app.state.upload_budget = UploadBudget(settings.max_upload_bytes_in_flight)
    install_error_handlers(app)
    routers = [
        predict.build_router(settings),
        embeddings.build_router(settings),
        tasks.build_router(settings),
        jobs.build_router(settings),
        health.build_router(settings),
        ui.build_router(),
    ]
    for router in routers:
        app.include_router(router)
    app.add_middleware(DeclaredLengthLimit, routes=[route for router in routers for route in router.routes])
    app.add_middleware(BodyDeadline, timeout_s=settings.body_timeout_s)
    return app


def build_services(settings: Settings, metrics: Metrics, encoder: SpartanEncoder | None) -> Services:
    if encoder is None:
        encoder = serving_encoder(settings)
    metrics.set_build_info(encoder.backbone.name, encoder.backbone.fingerprint, encoder.runtime)
    registry = Registry(
        open_store(settings), encoder.identity(), RegistryConfig.from_settings(settings), metrics=metrics
    )
    routing_tally = RoutingTally() if settings.routing_stats else None
    if routing_tally is not None:  # before any load, so that every installed memory is announced
        registry.add_listener(routing_tally.on_memory_change)
    registry.refresh_when_reachable(STORE_START_TIMEOUT_S)
    registry.load_pinned()
    batcher = Batcher(
        EncoderRunner(encoder, routing_tally),
        BatchingConfig.from_settings(settings, encoder.concurrent_passes),
        metrics,
    )
    batcher.start()
    registry.start_polling(settings.store_poll_interval_s)
    limits = InputLimits.from_settings(settings)
    log.info(
        "serving %d tasks from %s on backbone %s (max batch %d, max wait %.1f ms)",
        len(registry.list()),
        registry.store.location,
        encoder.backbone.name,
        settings.max_batch_size,
        settings.max_wait_ms,
    )
    predictor = Predictor(registry, batcher, metrics, limits)
    embedding = encoder.backbone.sentence_embedding
    embedder = Embedder(
        batcher,
        metrics,
        limits,
        model=encoder.backbone.name,
        width=encoder.backbone.hidden_size,
        max_length=embedding.max_length,
    )
    # Training jobs run in processes of their own (app/jobs/worker.py); this only supervises them.
    job_manager = JobManager(
        registry, open_job_records(settings), JobsConfig.from_settings(settings), metrics
    )
    job_manager.start()
    return Services(
        settings, metrics, encoder, registry, batcher, predictor, embedder, routing_tally, job_manager
    )


def shutdown(services: Services, *, close_encoder: bool) -> None:
    if services.jobs is not None:
        services.jobs.close()  # first: a job ending now must not install into a stopping registry
    services.registry.stop_polling()
    services.batcher.stop()
    services.registry.close()  # the cold-load threads, once loads under way are done
    if close_encoder:
        services.encoder.close()


def announce_security(settings: Settings) -> None:
    """Say at start what is protected; never log a key."""
    if settings.admin_api_key is None and settings.allow_unauthenticated_writes:
        log.warning(
            "UNAUTHENTICATED WRITES ARE ON: anyone can upload and delete task memories (development only)"
        )
    elif settings.admin_api_key is None:
        log.warning(
            "writes are refused: no admin key (set SPARTAN_ADMIN_API_KEY, or "
            "SPARTAN_ALLOW_UNAUTHENTICATED_WRITES=true for development)"
        )
    if settings.predict_api_key is None:
        log.info("predictions and listings are open (no SPARTAN_PREDICT_API_KEY)")
    if settings.metrics_api_key is None and settings.predict_api_key is None:
        log.info("/metrics is open (no SPARTAN_METRICS_API_KEY)")

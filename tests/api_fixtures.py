"""Fixtures of the API tests: memories built on the real MiniLM encoder, per-test settings, and apps
served in-process (httpx's ASGI transport, lifespan entered: registry, batcher thread and all), all
sharing the session's one loaded backbone."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI

from app.main import create_app
from app.settings import Settings
from app.spartan.memfile import memory_to_bytes
from app.spartan.memory import MemorySpec, TaskMemory, TaskType

MemoryMaker = Callable[..., TaskMemory]
Served = tuple[FastAPI, httpx.AsyncClient]


def build_memory(
    encoder: Any,
    *,
    seed: int = 0,
    labels: tuple[str, ...] = ("negative", "positive"),
    task_type: TaskType = "classification",
    max_length: int = 128,
    text_pairs: bool = False,
    layernorms: bool = True,
) -> TaskMemory:
    """A random memory, perturbed so that it changes the backbone's states and its predictions are
    not degenerate (probabilities well inside (0, 1), different inputs -> different outputs)."""
    backbone = encoder.backbone
    spec = MemorySpec(
        num_layers=backbone.num_layers,
        hidden_size=backbone.hidden_size,
        task_type=task_type,
        labels=labels if task_type == "classification" else (),
        pooling=backbone.pooling,
        max_length=max_length,
        text_pairs=text_pairs,
        backbone_id=backbone.name,
        backbone_fingerprint=backbone.fingerprint,
        layernorm_names=tuple(encoder.layernorm_names) if layernorms else (),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the same seed gives the same memory, whatever ran before
        torch.manual_seed(seed)
        memory = TaskMemory(spec)
    memory.init_layernorms(encoder.base_layernorms())
    with torch.no_grad():
        for name, param in memory.named_parameters():
            scale = 0.05 if name.startswith(("head.out", "layernorms")) else 0.2
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    memory.eval()
    return memory


@pytest.fixture(scope="session")
def make_memory(minilm_encoder: Any) -> MemoryMaker:
    def make(**kwargs: Any) -> TaskMemory:
        return build_memory(minilm_encoder, **kwargs)

    return make


@pytest.fixture(scope="session")
def memory_file(make_memory: MemoryMaker) -> Callable[..., bytes]:
    def make(**kwargs: Any) -> bytes:
        return memory_to_bytes(make_memory(**kwargs))

    return make


@pytest.fixture
def settings_for(tmp_path: Path) -> Callable[..., Settings]:
    """Settings of a test service: its own store folder, no polling, dev writes unless keys are given."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "memory_dir": tmp_path / "memories",
            "admin_api_key": None,  # explicit: a key in the environment must not change the tests
            "predict_api_key": None,
            "allow_unauthenticated_writes": True,
            "store_poll_interval_s": 0,
            **overrides,
        }
        return Settings(**values)

    return make


@pytest.fixture(scope="session")
def write_memory() -> Callable[[Settings, str, bytes], None]:
    """Put a memory file straight into a service's store folder (as a deploy or a sync job would)."""

    def write(settings: Settings, task: str, data: bytes) -> None:
        settings.memory_dir.mkdir(parents=True, exist_ok=True)
        (settings.memory_dir / f"{task}.safetensors").write_bytes(data)

    return write


@pytest.fixture(scope="session")
def serve(minilm_encoder: Any) -> Callable[[Settings], AbstractAsyncContextManager[Served]]:
    """`async with serve(settings) as (app, client)`: a started app and a client talking to it."""

    @asynccontextmanager
    async def served(settings: Settings) -> AsyncIterator[Served]:
        app = create_app(settings, encoder=minilm_encoder)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://spartan.test", timeout=120
            ) as client:
                yield app, client

    return served

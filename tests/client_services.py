"""A real `spartan serve` process on the tiny random backbone for the client and remote CLI tests,
with both keys set, a small upload limit, and two tasks (a text task and a pair task) in its store."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import build_memory
from procs import Replica

from app.spartan.memfile import memory_to_bytes

ADMIN_KEY = "client-test-admin-key-0123456789"
PREDICT_KEY = "client-test-predict-key-0123456789"


@dataclass
class Service:
    url: str
    sentiment: bytes  # the memory file of task `sentiment` as stored at start
    pairs: bytes  # a pair task's memory file (stored as `pairs`)
    other: bytes  # another valid memory, not in the store
    max_upload_bytes: int


@pytest.fixture(scope="module", name="service")
def service_fixture(
    tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path, tiny_encoder: Any
) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("client-service")
    sentiment = memory_to_bytes(build_memory(tiny_encoder, seed=1))
    pairs = memory_to_bytes(build_memory(tiny_encoder, seed=2, text_pairs=True))
    other = memory_to_bytes(build_memory(tiny_encoder, seed=3))
    store = workdir / "memories"
    store.mkdir()
    (store / "sentiment.safetensors").write_bytes(sentiment)
    (store / "pairs.safetensors").write_bytes(pairs)
    limit = max(len(sentiment), len(other)) + 4096
    env = {
        "SPARTAN_BACKBONE": str(tiny_backbone_dir),
        "SPARTAN_MEMORY_DIR": str(store),
        "SPARTAN_STORE_POLL_INTERVAL_S": "0",
        "SPARTAN_ADMIN_API_KEY": ADMIN_KEY,
        "SPARTAN_PREDICT_API_KEY": PREDICT_KEY,
        "SPARTAN_ALLOW_UNAUTHENTICATED_WRITES": "false",
        "SPARTAN_MAX_UPLOAD_BYTES": str(limit),
    }
    replica = Replica("client", env, workdir).start_ready()
    try:
        yield Service(replica.url, sentiment, pairs, other, limit)
    finally:
        replica.stop()

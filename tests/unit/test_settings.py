"""Settings: the docs table lists every setting and nothing else; keys that protect nothing are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.settings import Settings


def test_every_setting_is_documented_and_every_documented_one_exists(repo_root: Path) -> None:
    text = (repo_root / "docs" / "SERVICE.md").read_text()
    table = text[text.index("## Settings") :]
    documented = set(re.findall(r"`SPARTAN_([A-Z0-9_]+)`", table))
    fields = {name.upper() for name in Settings.model_fields}
    assert fields - documented == set(), "settings missing from docs/SERVICE.md"
    assert documented - fields == set(), "docs/SERVICE.md documents settings that do not exist"


def test_empty_or_short_keys_are_refused_at_start() -> None:
    for key in ("", "short-key"):
        with pytest.raises(ValueError, match="admin_api_key must be at least 16 characters"):
            Settings(admin_api_key=key)
    with pytest.raises(ValueError, match="predict_api_key must be at least 16"):
        Settings(predict_api_key="x" * 15)
    assert Settings(admin_api_key="x" * 16).admin_api_key is not None

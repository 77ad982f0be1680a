"""The settings table in docs/SERVICE.md documents every setting there is, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from app.settings import Settings


def test_every_setting_is_documented_and_every_documented_one_exists(repo_root: Path) -> None:
    text = (repo_root / "docs" / "SERVICE.md").read_text()
    table = text[text.index("## Settings") :]
    documented = set(re.findall(r"`SPARTAN_([A-Z0-9_]+)`", table))
    fields = {name.upper() for name in Settings.model_fields}
    assert fields - documented == set(), "settings missing from docs/SERVICE.md"
    assert documented - fields == set(), "docs/SERVICE.md documents settings that do not exist"

"""Task names: the one rule for what a task may be called (the store's keys, the API's paths)."""

from __future__ import annotations

import re

from app.errors import InvalidTaskName

MAX_TASK_NAME = 64
TASK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
TASK_NAME_PATTERN = f"^{TASK_NAME_RE.pattern}$"  # for the OpenAPI schema


def validate_task_name(name: str) -> str:
    """The name itself if it is allowed; InvalidTaskName (with the rule) otherwise."""
    if not TASK_NAME_RE.fullmatch(name):
        shown = name if len(name) <= MAX_TASK_NAME else name[:MAX_TASK_NAME] + "..."
        raise InvalidTaskName(
            f"invalid task name {shown!r}: use 1 to {MAX_TASK_NAME} letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name

"""What a prediction request's inputs are, and the checks they pass before they are queued.

A request's memory is resolved before these run, so the checks can use the task's own spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.errors import InvalidInput
from app.settings import Settings
from app.spartan.memory import MemorySpec

TextInput = tuple[str, str | None]  # a text, and its pair for pair tasks


@dataclass(frozen=True)
class InputLimits:
    max_inputs: int
    max_text_chars: int

    @classmethod
    def from_settings(cls, settings: Settings) -> InputLimits:
        return cls(settings.max_inputs_per_request, settings.max_text_chars)


def check_limits(inputs: Sequence[TextInput], limits: InputLimits) -> None:
    if not inputs:
        raise InvalidInput("inputs: give at least one text")
    if len(inputs) > limits.max_inputs:
        raise InvalidInput(f"inputs: {len(inputs)} inputs, at most {limits.max_inputs} per request")
    for index, (text, pair) in enumerate(inputs):
        longest = max(len(text), len(pair or ""))
        if longest > limits.max_text_chars:
            raise InvalidInput(
                f"inputs[{index}]: a text of {longest} characters, at most {limits.max_text_chars}"
            )


def check_fits_task(task: str, spec: MemorySpec, inputs: Sequence[TextInput]) -> None:
    """A text pair only for a task trained on pairs (a pair task takes single texts too, as in training)."""
    if spec.text_pairs:
        return
    for index, (_, pair) in enumerate(inputs):
        if pair is not None:
            raise InvalidInput(f"inputs[{index}] is a text pair, but task {task!r} takes single texts")

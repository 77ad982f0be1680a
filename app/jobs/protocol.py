"""What the serving process and a training job's process tell each other.

The serving process writes the job into a private work folder (`job.json`: the backbone, the thread
budget and niceness, the trainer's configuration, the examples) and starts `python -m app.jobs.worker
<folder>`. The worker answers on its stdout with one JSON object per line, an `event` and its fields:

  loading  pid                                 the process started; the backbone is loading
  started  epochs, steps, train_examples       training begins: `steps` optimizer steps in all
  step     step, loss?                         an optimizer step finished (loss: the latest steps' mean)
  epoch    epoch, train_loss, dev, seconds     an epoch finished and was scored on dev
  done     report, memory                      trained; the memory file is `memory` in the folder
  error    message, type                       the job could not be done (the process then exits 1)

Anything else the worker or its libraries print goes to stderr (the service log). The worker never
touches the store: the serving process installs what it trained through the upload path, so a worker
that dies leaves nothing anywhere but its own folder, which the serving process removes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the worker reads its job before it loads torch
    from app.training.datasets import TaskData

JOB_FILE = "job.json"
MEMORY_FILE = "memory.safetensors"
EVENTS = ("loading", "started", "step", "epoch", "done", "error")


def encode_data(data: TaskData) -> dict[str, Any]:
    def rows(examples: list[Any]) -> list[list[Any]]:
        return [[ex.text, ex.text_pair, ex.label] for ex in examples]

    return {
        "name": data.name,
        "task_type": data.task_type,
        "labels": list(data.labels),
        "train": rows(data.train),
        "dev": rows(data.dev),
        "test": rows(data.test),
    }


def decode_data(value: dict[str, Any]) -> TaskData:
    from app.training.datasets import Example, TaskData

    def examples(rows: list[list[Any]]) -> list[Example]:
        return [Example(text, label, pair) for text, pair, label in rows]

    return TaskData(
        value["name"],
        value["task_type"],
        tuple(value["labels"]),
        examples(value["train"]),
        examples(value["dev"]),
        examples(value["test"]),
    )


def write_job(folder: Path, job: dict[str, Any]) -> Path:
    path = folder / JOB_FILE
    path.write_text(json.dumps(job, ensure_ascii=False))
    return path


def read_job(folder: Path) -> dict[str, Any]:
    value = json.loads((folder / JOB_FILE).read_text())
    assert isinstance(value, dict)
    return value


def event_line(event: str, **fields: Any) -> str:
    assert event in EVENTS, event
    return json.dumps({"event": event, **fields}) + "\n"


def parse_event(line: str) -> dict[str, Any] | None:
    """One event of the worker's stdout, or None for a line that is not one (it is logged, not trusted)."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("event") not in EVENTS:
        return None
    return value

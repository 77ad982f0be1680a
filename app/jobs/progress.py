"""Watching `train_memory` from the outside, in the job's own process: steps, losses, epochs.

The trainer takes no progress callback (yet), so the worker observes it three ways, each of which
only ever adds information and never changes what is trained:
* every optimizer step: torch's global optimizer step hook (a public torch API), which fires for
  whatever loop the trainer runs;
* the step's loss: the trainer's `task_loss`, wrapped to note the value it returns, if it has one;
* each finished epoch: the trainer's own log record of it (`epoch N: loss L dev {...} (S s)`).
If the trainer changes shape, what is no longer seen is simply missing from the progress; the job's
final record always comes from the trainer's own report. All of it is process state of the worker
process only (the serving process never imports this module), and is undone on exit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch.optim.optimizer as torch_optimizer

from app.training import trainer

Emit = Callable[..., None]
LOSS_WINDOW = 50  # steps in the running loss, as the trainer's own progress bar shows it


class _EpochRecords(logging.Handler):
    """The trainer's "epoch %d: loss %.4f dev %s (%.1fs)" record, turned into an `epoch` event."""

    def __init__(self, emit: Emit) -> None:
        super().__init__(logging.INFO)
        self._emit = emit

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if not (isinstance(record.msg, str) and record.msg.startswith("epoch ")):
            return
        if not (isinstance(args, tuple) and len(args) == 4 and isinstance(args[2], dict)):
            return
        epoch, loss, dev, seconds = args
        if not (isinstance(epoch, int) and isinstance(loss, float) and isinstance(seconds, float)):
            return
        self._emit("epoch", epoch=epoch, train_loss=loss, dev=dev, seconds=seconds)


@contextmanager
def observe_training(emit: Emit) -> Iterator[None]:
    """While inside: an event per optimizer step (with the running loss) and per finished epoch."""
    losses: list[float] = []
    steps = 0

    def on_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        nonlocal steps
        steps += 1
        recent = losses[-LOSS_WINDOW:]
        emit("step", step=steps, loss=float(np.mean(recent)) if recent else None)

    original_loss = getattr(trainer, "task_loss", None)

    def task_loss(*args: Any, **kwargs: Any) -> Any:
        assert original_loss is not None
        loss = original_loss(*args, **kwargs)
        losses.append(float(loss.detach()))
        return loss

    step_hook = torch_optimizer.register_optimizer_step_post_hook(on_step)
    if original_loss is not None:
        trainer.task_loss = task_loss
    epochs = _EpochRecords(emit)
    trainer_log = logging.getLogger(trainer.__name__)
    trainer_log.addHandler(epochs)
    level = trainer_log.level
    if not trainer_log.isEnabledFor(logging.INFO):
        trainer_log.setLevel(logging.INFO)
    try:
        yield
    finally:
        trainer_log.setLevel(level)
        trainer_log.removeHandler(epochs)
        if original_loss is not None:
            trainer.task_loss = original_loss
        step_hook.remove()

"""What a training job is asked to do, and the trainer's configuration that follows from it.

Every option left unset takes the trainer's own default: its few-shot recipe, read from
app/training/trainer.py at each job (its `few_shot_config(num_layers)` where it has one, the recipe
`spartan train --few-shot` uses; else FEW_SHOT_EPOCHS and FEW_SHOT_LR over TrainConfig's defaults),
so a better recipe in the trainer is what jobs use, with nothing to change here. A job is for a few
hundred examples, so the few-shot recipe is its default whether or not `few_shot` is given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from app.errors import TrainingDataInvalid
from app.spartan.memory import TaskType
from app.training import trainer
from app.training.trainer import FEW_SHOT_EPOCHS, FEW_SHOT_LR, TrainConfig

DEFAULT_DEV_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.1


def recipe(num_layers: int) -> TrainConfig:
    """The trainer's few-shot recipe for a backbone of `num_layers` layers: what a job trains with
    unless its options say otherwise."""
    make = getattr(trainer, "few_shot_config", None)  # the fast recipe's home once it lands there
    if make is not None:
        made = make(num_layers)
        assert isinstance(made, TrainConfig)
        return made
    return replace(TrainConfig(), epochs=FEW_SHOT_EPOCHS, lr=FEW_SHOT_LR)


@dataclass(frozen=True)
class JobOptions:
    """A job's options as given; None = the recipe's value."""

    few_shot: int | None = None  # keep this many training rows (stratified); None = all
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    max_length: int | None = None
    num_parents: int | None = None  # E
    num_children: int | None = None  # C
    top_k: int | None = None  # k
    temperature: float | None = None  # T
    seed: int | None = None  # of the splits, the few-shot sample and the training
    dev_fraction: float = DEFAULT_DEV_FRACTION  # of the training rows, when no dev rows are given
    test_fraction: float = DEFAULT_TEST_FRACTION  # likewise for test rows
    task_type: TaskType | None = None  # None = inferred from the labels

    @property
    def seed_value(self) -> int:
        return self.seed if self.seed is not None else TrainConfig().seed

    def train_config(self, num_layers: int) -> TrainConfig:
        """The recipe with every option given put in; TrainingDataInvalid if they do not fit together."""
        names = {f.name for f in fields(TrainConfig)}
        given = {f.name: getattr(self, f.name) for f in fields(self) if f.name in names}
        config = replace(recipe(num_layers), **{k: v for k, v in given.items() if v is not None})
        if config.top_k > config.num_parents:
            raise TrainingDataInvalid(
                f"top_k {config.top_k} exceeds num_parents {config.num_parents} (a token picks k of the "
                "E parents)",
                split=None, row=None, line=None, reason="bad_options",
            )  # fmt: skip
        if self.dev_fraction + self.test_fraction >= 1.0:
            raise TrainingDataInvalid(
                f"dev_fraction + test_fraction is {self.dev_fraction + self.test_fraction:g}: nothing would "
                "be left to train on", split=None, row=None, line=None, reason="bad_options",
            )  # fmt: skip
        return config

    def described(self, num_layers: int) -> dict[str, Any]:
        """What the job record shows: the resolved trainer configuration and the data options."""
        return {
            **asdict(self.train_config(num_layers)),
            "few_shot": self.few_shot,
            "dev_fraction": self.dev_fraction,
            "test_fraction": self.test_fraction,
        }

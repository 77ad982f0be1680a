"""One training loop for every method of a comparison (same optimiser, schedule, batches and budget).

AdamW with linear decay over all steps, batch 16, the model in train mode (dropout in the methods' own
modules; the frozen backbone's dropout is off, see peers.silence_backbone_dropout), a dev evaluation
every `eval_every` epochs, and the best dev epoch's per-task parameters kept for the test score.
Head-only trains on cached backbone features (the same numbers, computed once).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from app.training.datasets import Example, TaskData
from app.training.metrics import compute_metrics, primary_metric
from app.training.trainer import seed_everything
from benchmarks.peers import Built, PooledHeadModel


@dataclass(frozen=True)
class FitConfig:
    lr: float
    epochs: int
    batch_size: int = 16
    max_length: int = 128
    eval_every: int = 1
    weight_decay: float = 0.01
    seed: int = 0
    eval_batch_size: int = 64


@dataclass
class FitResult:
    dev: dict[str, float]
    test: dict[str, float]
    best_epoch: int
    steps: int
    train_seconds: float  # optimisation only, dev evaluations excluded
    step_ms: list[float] = field(default_factory=list)


def encode(
    built: Built, examples: Sequence[Example], pairs: bool, max_length: int
) -> dict[str, torch.Tensor]:
    texts = [ex.text for ex in examples]
    second = [ex.text_pair or "" for ex in examples] if pairs else None
    return built.tokenize(texts, second, max_length)


def targets(data: TaskData, examples: Sequence[Example]) -> torch.Tensor:
    if data.task_type == "regression":
        return torch.tensor([float(data.label_index(ex)) for ex in examples])
    return torch.tensor([int(data.label_index(ex)) for ex in examples])


def loss_of(data: TaskData, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if data.task_type == "regression":
        return F.mse_loss(outputs.squeeze(-1), target)
    return F.cross_entropy(outputs, target)


Runner = Callable[[Sequence[Example]], torch.Tensor]


def model_runner(built: Built, data: TaskData, config: FitConfig) -> Runner:
    """Examples -> head outputs through the whole model (tokenise, backbone + method, head)."""

    def run(batch: Sequence[Example]) -> torch.Tensor:
        return built.model(encode(built, batch, data.has_pairs, config.max_length))

    return run


def cached_head_runner(built: Built, data: TaskData, config: FitConfig) -> Runner:
    """Head-only: the frozen backbone's pooled features are the same every epoch (its dropout is off),
    so compute them once per distinct example and train only the head on them."""
    model = built.model
    assert isinstance(model, PooledHeadModel)
    assert model.head is not None
    examples = list(dict.fromkeys([*data.train, *data.dev, *data.test]))
    features = in_batches(
        examples, config, lambda batch: model.pooled(encode(built, batch, data.has_pairs, config.max_length))
    )
    row = {example: i for i, example in enumerate(examples)}
    head = model.head
    return lambda batch: head(features[[row[ex] for ex in batch]])


def in_batches(examples: Sequence[Example], config: FitConfig, run: Runner) -> torch.Tensor:
    """run() over examples in inference mode, in input order; batches of similar length waste little
    compute on padding."""
    order = sorted(
        range(len(examples)), key=lambda i: len(examples[i].text) + len(examples[i].text_pair or "")
    )
    result: torch.Tensor | None = None
    with torch.inference_mode():
        for start in range(0, len(order), config.eval_batch_size):
            positions = order[start : start + config.eval_batch_size]
            outputs = run([examples[i] for i in positions]).float()
            if result is None:
                result = torch.empty(len(examples), outputs.shape[-1])
            result[positions] = outputs
    assert result is not None
    return result


def predict(built: Built, examples: Sequence[Example], config: FitConfig, run: Runner) -> torch.Tensor:
    model = built.model
    was_training = model.training
    model.eval()
    try:
        return in_batches(examples, config, run)
    finally:
        model.train(was_training)


def score(
    built: Built, data: TaskData, examples: Sequence[Example], config: FitConfig, run: Runner
) -> dict[str, float]:
    if not examples:
        return {}
    outputs = predict(built, examples, config, run)
    truth = [data.label_index(ex) for ex in examples]
    guess = outputs.squeeze(-1).tolist() if data.task_type == "regression" else outputs.argmax(-1).tolist()
    return compute_metrics(data.task_type, truth, guess)


def fit(built: Built, data: TaskData, config: FitConfig) -> FitResult:
    """Train the method's per-task parameters on data.train; test the best dev epoch."""
    seed_everything(config.seed)
    model = built.model
    params = model.trainable()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(data.train) // config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total))
    metric = primary_metric(data.task_type)
    best: tuple[float, int, dict[str, float], list[torch.Tensor]] = (-float("inf"), 0, {}, _snapshot(params))
    step_ms: list[float] = []
    rng = np.random.default_rng(config.seed)
    make_runner = cached_head_runner if model.method == "head" else model_runner
    run = make_runner(built, data, config)
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = rng.permutation(len(data.train))
        for start in range(0, len(order), config.batch_size):
            batch = [data.train[i] for i in order[start : start + config.batch_size]]
            began = time.perf_counter()
            outputs = run(batch)
            loss = loss_of(data, outputs, targets(data, batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step_ms.append((time.perf_counter() - began) * 1000)
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            dev = score(built, data, data.dev, config, run)
            value = dev.get(metric, -float(loss.item()))
            if value > best[0]:
                best = (value, epoch, dev, _snapshot(params))
    _restore(params, best[3])
    return FitResult(
        dev=best[2],
        test=score(built, data, data.test, config, run),
        best_epoch=best[1],
        steps=len(step_ms),
        train_seconds=sum(step_ms) / 1000,
        step_ms=step_ms,
    )


def _snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [copy.deepcopy(p.detach()) for p in params]


def _restore(params: list[torch.nn.Parameter], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for param, value in zip(params, saved, strict=True):
            param.copy_(value)

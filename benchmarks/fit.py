"""One training loop for every method of a comparison: AdamW with linear decay, batch 16, the same batches
and budget, a dev evaluation every `eval_every` epochs, the best dev epoch's parameters kept for the test.
The frozen backbone's dropout is off (peers.silence_backbone_dropout); head-only trains on its features,
computed once.
"""

from __future__ import annotations

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

Runner = Callable[[Sequence[Example]], torch.Tensor]


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
    second = [ex.text_pair or "" for ex in examples] if pairs else None
    return built.tokenize([ex.text for ex in examples], second, max_length)


def targets(data: TaskData, examples: Sequence[Example]) -> torch.Tensor:
    kind = float if data.task_type == "regression" else int
    return torch.tensor([kind(data.label_index(ex)) for ex in examples])


def loss_of(data: TaskData, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if data.task_type == "regression":
        return F.mse_loss(outputs.squeeze(-1), target)
    return F.cross_entropy(outputs, target)


def cached_head_runner(built: Built, data: TaskData, config: FitConfig) -> Runner:
    """Head-only: the frozen backbone's pooled features are the same every epoch (its dropout is off),
    so compute them once per distinct example and train only the head on them."""
    model = built.model
    assert isinstance(model, PooledHeadModel)
    examples = list(dict.fromkeys([*data.train, *data.dev, *data.test]))
    features = in_batches(
        examples, config, lambda batch: model.pooled(encode(built, batch, data.has_pairs, config.max_length))
    )
    row = {example: i for i, example in enumerate(examples)}
    head = model.head
    return lambda batch: head(features[[row[ex] for ex in batch]])


def in_batches(examples: Sequence[Example], config: FitConfig, run: Runner) -> torch.Tensor:
    """run() over examples in inference mode, in input order; batched by length to waste little padding."""
    order = sorted(
        range(len(examples)), key=lambda i: len(examples[i].text) + len(examples[i].text_pair or "")
    )
    result = torch.empty(0)
    with torch.inference_mode():
        for start in range(0, len(order), config.eval_batch_size):
            positions = order[start : start + config.eval_batch_size]
            outputs = run([examples[i] for i in positions]).float()
            if start == 0:
                result = torch.empty(len(examples), outputs.shape[-1])
            result[positions] = outputs
    return result


def score(
    built: Built, data: TaskData, examples: Sequence[Example], config: FitConfig, run: Runner
) -> dict[str, float]:
    """The metrics of `examples`, in eval mode. bench_training_speed times fit's calls of this by name."""
    if not examples:
        return {}
    was_training = built.model.training
    built.model.eval()
    try:
        outputs = in_batches(examples, config, run)
    finally:
        built.model.train(was_training)
    truth = [data.label_index(ex) for ex in examples]
    guess = outputs.squeeze(-1).tolist() if data.task_type == "regression" else outputs.argmax(-1).tolist()
    return compute_metrics(data.task_type, truth, guess)


def fit(built: Built, data: TaskData, config: FitConfig) -> FitResult:
    """Train the method's per-task parameters on data.train; test the best dev epoch."""
    seed_everything(config.seed)
    model = built.model
    params = model.trainable()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = -(-len(data.train) // config.batch_size) * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total))
    metric = primary_metric(data.task_type)
    best_value, best_epoch, best_dev, best_params = -float("inf"), 0, {}, [p.detach().clone() for p in params]
    step_ms: list[float] = []
    rng = np.random.default_rng(config.seed)

    def run_model(batch: Sequence[Example]) -> torch.Tensor:
        return model(encode(built, batch, data.has_pairs, config.max_length))

    run = cached_head_runner(built, data, config) if model.method == "head" else run_model
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = rng.permutation(len(data.train))
        for start in range(0, len(order), config.batch_size):
            batch = [data.train[i] for i in order[start : start + config.batch_size]]
            began = time.perf_counter()
            loss = loss_of(data, run(batch), targets(data, batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step_ms.append((time.perf_counter() - began) * 1000)
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            dev = score(built, data, data.dev, config, run)
            value = dev.get(metric, -float(loss.item()))
            if value > best_value:
                best_value, best_epoch, best_dev = value, epoch, dev
                best_params = [p.detach().clone() for p in params]
    with torch.no_grad():
        for param, saved in zip(params, best_params, strict=True):
            param.copy_(saved)
    test = score(built, data, data.test, config, run)
    return FitResult(best_dev, test, best_epoch, len(step_ms), sum(step_ms) / 1000, step_ms)

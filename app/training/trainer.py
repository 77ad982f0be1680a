"""Fine-tuning one task memory on a frozen backbone, and scoring memories on labelled examples."""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from app.engine.batcher import plan_passes
from app.engine.encoder import RowGroup, SpartanEncoder
from app.spartan.memfile import memory_to_bytes
from app.spartan.memory import MemorySpec, TaskMemory
from app.training.datasets import Example, TaskData
from app.training.features import PreparedExamples
from app.training.metrics import compute_metrics, primary_metric

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Defaults are the reference scripts' (see shared/SPARTAN.md): a memory after every layer, dev
    scored after every epoch, the best epoch kept."""

    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 16
    max_length: int = 128
    seed: int = 42
    num_parents: int = 16
    num_children: int = 3
    top_k: int = 8
    temperature: float = 1.6
    train_layernorm: bool = True
    balance_weight: float = 0.0
    dropout: float = 0.1
    weight_decay: float = 0.01
    eval_batch_size: int = 64
    # Memories in the top N layers only (None: every layer). The layers below then run once per
    # example (training/features.py), and each step's forward and backward cover the top N only.
    memory_layers: int | None = None
    # The task's LayerNorm copies in the top N layers only (None: in every memory layer). One layer
    # fewer than memory_layers puts the lowest memory on the cached states: a memory more, same cost.
    layernorm_layers: int | None = None
    eval_every: int = 1  # dev is scored after every `eval_every`-th epoch and after the last
    # Stop after this many dev scorings in a row without a new best (None: run every epoch).
    patience: int | None = None
    # At most this much of the lower layers' states is kept (float32; the training set first, then dev);
    # a set beyond it takes the full forward (same results, slower). 200 MiniLM examples of 128 tokens
    # need 39 MB; a dev split of 5,000 long texts ~1 GB, too much for a small device.
    feature_cache_mb: int = 256
    # A step's rows are sorted by length and cut into micro-batches where that saves more padded tokens
    # than this (the service's pass planning); their gradients add up to the whole batch's, so the step
    # is the same, only cheaper. None: one pass per step (needed for the load-balancing loss, which is a
    # statistic of the whole batch).
    step_overhead_tokens: int | None = 96
    # Each step's forward under bf16 autocast (the layers' matmuls in bf16 on oneDNN; the memory's
    # parameters, the loss and the optimiser stay float32), for CPUs with native bfloat16. Off in the
    # recipe: on the suite it saved ~7% of the time but held 4x the memory (a 200-example run peaked
    # at 1,086 MiB against 263: oneDNN keeps bf16 kernels and weight copies per batch shape), too much
    # for the small devices few-shot training is for (docs/RESULTS.md section 3c).
    bf16_steps: bool = False

    def first_memory_layer(self, num_layers: int) -> int:
        if self.memory_layers is None:
            return 0
        if not 1 <= self.memory_layers <= num_layers:
            raise ValueError(f"memory_layers {self.memory_layers}: the backbone has {num_layers} layers")
        return num_layers - self.memory_layers


# The few-shot recipe (`spartan train --few-shot`; docs/RESULTS.md section 3b): the top half of the
# layers run in each step (with the task's LayerNorm copies), a memory after each of them and one more
# on the cached output of the layer below; the layers below that run once per example. lr 3e-3 for 10
# epochs, dev scored after epochs 5 and 10 (the benchmark protocol's schedule), the better one kept.
FEW_SHOT_EPOCHS = 10
FEW_SHOT_LR = 3e-3
FEW_SHOT_EVAL_EVERY = 5
FEW_SHOT_TRAINED_SHARE = 0.5  # of the layers, from the top, that run in every step (rounded up)


def few_shot_config(num_layers: int, **changes: Any) -> TrainConfig:
    """The few-shot recipe for a backbone of `num_layers` layers; `changes` replace its fields."""
    trained = math.ceil(num_layers * FEW_SHOT_TRAINED_SHARE)
    recipe = TrainConfig(
        epochs=FEW_SHOT_EPOCHS,
        lr=FEW_SHOT_LR,
        memory_layers=min(trained + 1, num_layers),
        layernorm_layers=trained,
        eval_every=FEW_SHOT_EVAL_EVERY,
    )
    return replace(recipe, **changes)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    seconds: float  # this epoch's training steps
    steps: int
    dev: dict[str, float]  # empty where dev was not scored
    elapsed: float = 0.0  # since training started, at this epoch's end (preparation, dev scoring included)


@dataclass
class TrainReport:
    dataset: str
    backbone: str
    config: dict[str, object]
    train_examples: int
    trainable_parameters: int
    memory_bytes: int = 0
    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    dev: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    seconds_total: float = 0.0  # preparation, every epoch and dev scoring (not the test scoring)
    seconds_to_best: float = 0.0  # from the start to the end of the kept epoch (its dev scoring included)
    prepare_seconds: float = 0.0  # tokenising, and running the layers below the memories once
    cached_bytes: int = 0  # of those layers' states

    def summary(self) -> dict[str, object]:
        """The compact record stored inside the memory file's metadata."""
        return {
            "dataset": self.dataset,
            "train_examples": self.train_examples,
            "best_epoch": self.best_epoch,
            "dev": self.dev,
            "config": self.config,
        }

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def new_memory(encoder: SpartanEncoder, data: TaskData, config: TrainConfig) -> TaskMemory:
    backbone = encoder.backbone
    first = config.first_memory_layer(backbone.num_layers)
    layernorms_first = max(first, backbone.num_layers - (config.layernorm_layers or backbone.num_layers))
    spec = MemorySpec(
        num_layers=backbone.num_layers,
        hidden_size=backbone.hidden_size,
        num_parents=config.num_parents,
        num_children=config.num_children,
        top_k=config.top_k,
        temperature=config.temperature,
        task_type=data.task_type,
        labels=data.labels,
        pooling=backbone.pooling,
        max_length=config.max_length,
        text_pairs=data.has_pairs,
        backbone_id=backbone.name,
        backbone_fingerprint=backbone.fingerprint,
        layernorm_names=encoder.layernorms_from(layernorms_first) if config.train_layernorm else (),
        dropout=config.dropout,
        first_memory_layer=first,
    )
    memory = TaskMemory(spec)
    memory.init_layernorms(encoder.base_layernorms())
    return memory


def batch_indices(
    examples: Sequence[Example], size: int, *, shuffle: bool, seed: int = 0
) -> Iterator[list[int]]:
    """Positions of each batch: shuffled for training, length-sorted for inference.

    Positions, not examples, so results go back to their input row even when one Example object
    appears twice in the list.
    """
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    else:
        # Inference: group similar lengths so little compute goes to padding; results are re-ordered.
        order.sort(key=lambda i: len(examples[i].text) + len(examples[i].text_pair or ""))
    for start in range(0, len(order), size):
        yield order[start : start + size]


def forward_examples(
    encoder: SpartanEncoder, memory: TaskMemory, examples: Sequence[Example], *, balance: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    texts = [ex.text for ex in examples]
    pairs = [ex.text_pair or "" for ex in examples] if memory.spec.text_pairs else None
    encoding = encoder.encode(texts, pairs, memory.spec.max_length)
    group = RowGroup(memory, torch.arange(len(examples)))
    out = encoder.forward(encoding, [group], balance=balance)
    assert out.outputs[0] is not None
    return out.outputs[0], out.balance_loss


def task_loss(
    memory: TaskMemory, outputs: torch.Tensor, data: TaskData, examples: Sequence[Example]
) -> torch.Tensor:
    if memory.spec.task_type == "regression":
        target = torch.tensor([float(data.label_index(ex)) for ex in examples])
        return F.mse_loss(outputs.squeeze(-1), target)
    labels = torch.tensor([int(data.label_index(ex)) for ex in examples])
    return F.cross_entropy(outputs, labels)


def predict_outputs(
    encoder: SpartanEncoder, memory: TaskMemory, examples: Sequence[Example], batch_size: int = 64
) -> torch.Tensor:
    """Head outputs (logits, or the value for regression) for every example, in input order."""
    was_training = memory.training
    memory.eval()
    result = torch.empty(len(examples), memory.spec.num_outputs)
    with torch.inference_mode():
        for positions in batch_indices(examples, batch_size, shuffle=False):
            outputs, _ = forward_examples(encoder, memory, [examples[i] for i in positions])
            result[positions] = outputs.float()
    memory.train(was_training)
    return result


def evaluate(
    encoder: SpartanEncoder,
    memory: TaskMemory,
    data: TaskData,
    examples: Sequence[Example],
    batch_size: int = 64,
) -> dict[str, float]:
    if not examples:
        return {}
    return score_outputs(memory, data, examples, predict_outputs(encoder, memory, examples, batch_size))


def score_outputs(
    memory: TaskMemory, data: TaskData, examples: Sequence[Example], outputs: torch.Tensor
) -> dict[str, float]:
    """The metrics of head outputs already computed (predict_outputs) for these examples."""
    if not examples:
        return {}
    truth = [data.label_index(ex) for ex in examples]
    predicted = (
        outputs.squeeze(-1).tolist() if memory.spec.task_type == "regression" else outputs.argmax(-1).tolist()
    )
    return compute_metrics(memory.spec.task_type, truth, predicted)


def train_memory(
    encoder: SpartanEncoder, data: TaskData, config: TrainConfig, *, show_progress: bool = True
) -> tuple[TaskMemory, TrainReport]:
    """Train a new memory on data.train, keep the epoch that scores best on data.dev."""
    if not data.train:
        raise ValueError("no training examples")
    started = time.perf_counter()
    seed_everything(config.seed)
    memory = new_memory(encoder, data, config)
    budget = config.feature_cache_mb << 20
    train = PreparedExamples(
        encoder, memory, data.train, cache_bytes=budget, batch_size=config.eval_batch_size
    )
    dev = PreparedExamples(
        encoder, memory, data.dev, cache_bytes=budget - train.cache_bytes, batch_size=config.eval_batch_size
    )
    params = [p for p in memory.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(data.train) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))
    report = TrainReport(
        dataset=data.name,
        backbone=encoder.backbone.name,
        config=asdict(config),
        train_examples=len(data.train),
        trainable_parameters=sum(p.numel() for p in params),
        prepare_seconds=time.perf_counter() - started,
        cached_bytes=train.cache_bytes + dev.cache_bytes,
    )
    metric = primary_metric(data.task_type)
    best_score, best_state = -float("inf"), copy.deepcopy(memory.state_dict())
    stale = 0  # dev scorings since the last new best
    for epoch in range(1, config.epochs + 1):
        record = run_epoch(train, memory, data, config, optimizer, scheduler, epoch, show_progress)
        report.epochs.append(record)
        if epoch % config.eval_every and epoch != config.epochs:
            record.elapsed = time.perf_counter() - started
            continue
        record.dev = score_outputs(memory, data, data.dev, dev.predict(memory, config.eval_batch_size))
        record.elapsed = time.perf_counter() - started
        log.info("epoch %d: loss %.4f dev %s (%.1fs)", epoch, record.train_loss, record.dev, record.seconds)
        score = record.dev.get(metric, -record.train_loss)
        if score > best_score:
            best_score, best_state, report.best_epoch, stale = (
                score,
                copy.deepcopy(memory.state_dict()),
                epoch,
                0,
            )
        else:
            stale += 1
            if config.patience is not None and stale >= config.patience:
                break
    memory.load_state_dict(best_state)
    memory.eval()
    report.seconds_total = time.perf_counter() - started
    report.seconds_to_best = report.epochs[report.best_epoch - 1].elapsed
    report.dev = report.epochs[report.best_epoch - 1].dev
    # The test split through the full forward, as the service will run the memory.
    report.test = evaluate(encoder, memory, data, data.test, config.eval_batch_size)
    memory.spec = replace(memory.spec, training=report.summary())
    report.memory_bytes = len(memory_to_bytes(memory))
    return memory, report


def run_epoch(
    train: PreparedExamples,
    memory: TaskMemory,
    data: TaskData,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    show_progress: bool,
) -> EpochRecord:
    memory.train()
    started, losses = time.perf_counter(), []
    steps = batch_indices(data.train, config.batch_size, shuffle=True, seed=config.seed + epoch)
    total = -(-len(data.train) // config.batch_size)
    bar = tqdm(
        steps, total=total, desc=f"epoch {epoch}/{config.epochs}", disable=not show_progress, leave=False
    )
    for positions in bar:
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate_step(train, memory, data, config, positions)
        optimizer.step()
        scheduler.step()
        losses.append(loss)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return EpochRecord(epoch, float(np.mean(losses)), time.perf_counter() - started, len(losses), {})


def step_parts(train: PreparedExamples, positions: list[int], config: TrainConfig) -> list[list[int]]:
    """The micro-batches of one step: length-sorted groups of `positions` (or all of them at once)."""
    if config.step_overhead_tokens is None or config.balance_weight > 0:
        return [positions]
    lengths = [train.rows[i].length for i in positions]
    planned = plan_passes(lengths, len(positions), config.step_overhead_tokens)
    return [[positions[i] for i in part] for part in planned]


def accumulate_step(
    train: PreparedExamples, memory: TaskMemory, data: TaskData, config: TrainConfig, positions: list[int]
) -> float:
    """Back-propagate one step's loss (the mean over `positions`) micro-batch by micro-batch: each
    part's mean loss weighted by its share of the rows, so the gradients sum to the whole batch's.
    Rows do not interact in a forward pass (padding is masked), so only float rounding and the dropout
    draws differ from one pass over the padded batch. Returns the step's loss."""
    total = 0.0
    for part in step_parts(train, positions, config):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16_steps):
            outputs, balance = train.outputs(memory, part, balance=config.balance_weight > 0)
        loss = task_loss(memory, outputs.float(), data, [data.train[i] for i in part])
        if balance is not None:
            loss = loss + config.balance_weight * balance
        weighted = loss * (len(part) / len(positions))
        weighted.backward()
        total += weighted.item()
    return total


def prediction_records(
    memory: TaskMemory, examples: Sequence[Example], outputs: torch.Tensor
) -> Iterator[dict[str, object]]:
    """One record per example: its texts, gold label, and the prediction (with its probability for a
    classification task; the predicted value is the prediction of a regression task)."""
    if memory.spec.task_type == "regression":
        for ex, value in zip(examples, outputs.squeeze(-1).tolist(), strict=True):
            yield {"text": ex.text, "pair": ex.text_pair, "label": ex.label, "predicted": value}
        return
    scores, indices = outputs.softmax(-1).max(-1)
    for ex, score, index in zip(examples, scores.tolist(), indices.tolist(), strict=True):
        yield {
            "text": ex.text,
            "pair": ex.text_pair,
            "label": ex.label,
            "predicted": memory.spec.labels[index],
            "score": score,
        }

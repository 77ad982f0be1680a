"""Fine-tuning one task memory on a frozen backbone, and scoring memories on labelled examples."""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from app.engine.encoder import RowGroup, SpartanEncoder
from app.spartan.memfile import memory_to_bytes
from app.spartan.memory import MemorySpec, TaskMemory
from app.training.datasets import Example, TaskData
from app.training.metrics import compute_metrics, primary_metric

log = logging.getLogger(__name__)


# The few-shot recipe of docs/RESULTS.md (section 1.4: lr 3e-3 for 10 epochs on 200 examples); the
# full-data defaults below (lr 1e-3, 3 epochs) under-train a few hundred examples.
FEW_SHOT_EPOCHS = 10
FEW_SHOT_LR = 3e-3


@dataclass(frozen=True)
class TrainConfig:
    """Defaults are the reference scripts' (see shared/SPARTAN.md)."""

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


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    seconds: float
    steps: int
    dev: dict[str, float]


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
    seconds_total: float = 0.0

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
        layernorm_names=tuple(encoder.layernorm_names) if config.train_layernorm else (),
        dropout=config.dropout,
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
    seed_everything(config.seed)
    memory = new_memory(encoder, data, config)
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
    )
    metric = primary_metric(data.task_type)
    best_score, best_state = -float("inf"), copy.deepcopy(memory.state_dict())
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        record = run_epoch(encoder, memory, data, config, optimizer, scheduler, epoch, show_progress)
        record.dev = evaluate(encoder, memory, data, data.dev, config.eval_batch_size)
        report.epochs.append(record)
        log.info("epoch %d: loss %.4f dev %s (%.1fs)", epoch, record.train_loss, record.dev, record.seconds)
        score = record.dev.get(metric, -record.train_loss)
        if score > best_score:
            best_score, best_state, report.best_epoch = score, copy.deepcopy(memory.state_dict()), epoch
    memory.load_state_dict(best_state)
    memory.eval()
    report.seconds_total = time.perf_counter() - started
    report.dev = report.epochs[report.best_epoch - 1].dev
    report.test = evaluate(encoder, memory, data, data.test, config.eval_batch_size)
    memory.spec = replace(memory.spec, training=report.summary())
    report.memory_bytes = len(memory_to_bytes(memory))
    return memory, report


def run_epoch(
    encoder: SpartanEncoder,
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
        chunk = [data.train[i] for i in positions]
        outputs, balance = forward_examples(encoder, memory, chunk, balance=config.balance_weight > 0)
        loss = task_loss(memory, outputs, data, chunk)
        if balance is not None:
            loss = loss + config.balance_weight * balance
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return EpochRecord(epoch, float(np.mean(losses)), time.perf_counter() - started, len(losses), {})


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

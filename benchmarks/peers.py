"""SPARTAN and its peers on one frozen backbone, the peers built with their own libraries (AdapterHub
`adapters`, PEFT), never re-implemented. Every method is a `TaskModel`: backbone + its per-task modules ->
pooled state -> the same `TaskHead` as SPARTAN's; only the per-task parameters train. The methods and
their settings: docs/RESULTS.md, first table; "bare" is the backbone alone, without a head.
Runs in the peers' environment (`make peers-env`); `adapters` does not support MPNet.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # assets come from packages; never reach a hub

from app.engine.backbone import Backbone, load_backbone, pool
from app.engine.encoder import RowGroup, SpartanEncoder
from app.spartan.memfile import memory_to_bytes
from app.spartan.memory import TaskHead, TaskMemory
from app.training.datasets import TaskData
from app.training.trainer import TrainConfig, new_memory, seed_everything

METHODS = ("bare", "head", "spartan", "pfeiffer", "houlsby", "lora", "ia3", "bitfit", "full")
TRAINABLE_METHODS = tuple(m for m in METHODS if m != "bare")
# Short names for the command line; the service's catalog knows the full names.
BACKBONE_NAMES = {"minilm": "all-MiniLM-L6-v2", "mpnet": "all-mpnet-base-v2"}
# PEFT's target modules by model family: LoRA's query and value; IA3's targets and feedforward modules.
_PEFT_TARGETS = {
    "bert": (["query", "value"], ["key", "value", "output.dense"], ["output.dense"]),
    "mpnet": (["q", "v"], ["k", "v", "output.dense"], ["output.dense"]),
}
_ADAPTER_CONFIGS = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn"}


class MethodUnavailable(Exception):
    """This method cannot run on this backbone (e.g. `adapters` has no MPNet support)."""


@dataclass(frozen=True)
class SpartanConfig:
    """SPARTAN's own hyperparameters (E parents, C children, top-k, temperature T, LayerNorm copies), as
    TrainConfig's fields of the same names."""

    num_parents: int = 16
    num_children: int = 3
    top_k: int = 8
    temperature: float = 1.6
    train_layernorm: bool = True


class TaskModel(nn.Module):
    """One method on one task: encoding -> head outputs [batch, num_outputs]."""

    method: str

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def task_bytes(self) -> int:
        """What a multi-task server stores per task for this method (float32)."""
        return sum(p.numel() * p.element_size() for p in self.trainable())


class PooledHeadModel(TaskModel):
    """A (possibly adapted) backbone, pooled as the backbone was trained, then the task head."""

    def __init__(self, method: str, model: nn.Module, pooling: str, head: nn.Module | None):
        super().__init__()
        self.method, self.model, self.pooling, self.head = method, model, pooling, head

    def pooled(self, encoding: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(**encoding).last_hidden_state
        return pool(hidden, encoding["attention_mask"], self.pooling)  # type: ignore[arg-type]

    def forward(self, encoding: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = self.pooled(encoding)
        return pooled if self.head is None else self.head(pooled)


class SpartanModel(TaskModel):
    """The project's encoder with one task memory on every row."""

    def __init__(self, encoder: SpartanEncoder, memory: TaskMemory):
        super().__init__()
        self.method, self.encoder, self.memory = "spartan", encoder, memory
        self.backbone_model = encoder.backbone.model  # registered so .train()/.eval() reach it

    def forward(self, encoding: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = torch.arange(encoding["attention_mask"].shape[0])
        output = self.encoder.forward(encoding, [RowGroup(self.memory, rows)]).outputs[0]
        assert output is not None
        return output

    def task_bytes(self) -> int:
        return len(memory_to_bytes(self.memory))  # the real file the service loads


@dataclass
class Built:
    model: TaskModel
    backbone: Backbone

    def tokenize(self, texts: list[str], pairs: list[str] | None, max_length: int) -> dict[str, torch.Tensor]:
        return dict(self.backbone.tokenize(texts, pairs, max_length))


def build(
    method: str,
    backbone_name: str,
    cache_dir: Path,
    *,
    num_outputs: int,
    data: TaskData | None = None,
    spartan: SpartanConfig | None = None,
    seed: int = 0,
) -> Built:
    """A fresh backbone (methods modify it in place) with `method`'s per-task modules and head."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    seed_everything(seed)
    backbone = load_backbone(BACKBONE_NAMES.get(backbone_name, backbone_name), cache_dir)
    silence_backbone_dropout(backbone.model)
    if method == "spartan":
        return Built(_spartan(backbone, num_outputs, data, spartan or SpartanConfig()), backbone)
    head = None if method == "bare" else TaskHead(backbone.hidden_size, num_outputs, dropout=0.1)
    return Built(PooledHeadModel(method, adapt(method, backbone), backbone.pooling, head), backbone)


def silence_backbone_dropout(model: nn.Module) -> None:
    """The frozen backbone computes the same features in training as in serving (as SPARTAN's trainer
    does); called before a method adds its modules, so theirs (LoRA, head, memory) keep their dropout."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _spartan(backbone: Backbone, num_outputs: int, data: TaskData | None, config: SpartanConfig) -> TaskModel:
    """A fresh memory exactly as `spartan train` starts one (app.training.trainer.new_memory)."""
    encoder = SpartanEncoder(backbone)
    if data is None:  # speed benchmarks: only the shape matters, not the labels' names
        labels = tuple(str(i) for i in range(num_outputs))
        data = TaskData("untitled", "classification", labels, [], [], [])
    return SpartanModel(encoder, new_memory(encoder, data, TrainConfig(**asdict(config))))


def adapt(method: str, backbone: Backbone) -> nn.Module:
    """The backbone model with `method`'s per-task modules, those (or for bitfit and full, its biases or
    all its weights) trainable; bare and head take it as it is."""
    model: Any = backbone.model  # adapters.init() swaps in its own model class at runtime
    model_type = str(model.config.model_type)
    if method in _ADAPTER_CONFIGS:
        import adapters

        try:
            adapters.init(model)
        except (ValueError, KeyError) as err:
            raise MethodUnavailable(f"`adapters` does not support {model_type}: {err}") from err
        model.add_adapter("task", config=adapters.AdapterConfig.load(_ADAPTER_CONFIGS[method]))
        model.train_adapter("task")  # freezes everything but the adapter
        model.set_active_adapters("task")
    elif method in ("lora", "ia3"):
        import peft

        if model_type not in _PEFT_TARGETS:
            raise MethodUnavailable(f"no PEFT target modules known for model type {model_type!r}")
        query_value, ia3_targets, feedforward = _PEFT_TARGETS[model_type]
        config = (  # LoRA NOT merged: a multi-task server cannot merge a task into the shared backbone
            peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=query_value)
            if method == "lora"
            else peft.IA3Config(target_modules=ia3_targets, feedforward_modules=feedforward)
        )
        model = peft.get_peft_model(model, config)
    elif method == "bitfit":
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.endswith(".bias"))
    elif method == "full":
        model.requires_grad_(True)
    return model

"""SPARTAN and its peers on one frozen backbone, built with the peers' own libraries.

Every method is a `TaskModel`: backbone (+ the method's per-task modules) -> pooled state -> the same
`TaskHead` (dense + tanh + linear, as SPARTAN's). Only the per-task parameters train. The peers come
from AdapterHub `adapters` (bottleneck adapters) and PEFT (LoRA, IA3), never re-implemented here:

  bare      the backbone alone, no head: the physical speed limit of any per-task module
  head      frozen backbone + trained head (the lower reference)
  spartan   this project's memory (app.engine.encoder + app.spartan.memory)
  pfeiffer  `adapters` "seq_bn" (Pfeiffer: one bottleneck after the FFN), reduction factor 16
  houlsby   `adapters` "double_seq_bn" (Houlsby: after attention and after the FFN), reduction 16
  lora      PEFT LoRA r=8 (alpha 16, dropout 0.1) on the attention query and value, NOT merged
            (a multi-task server cannot merge one task's weights into the shared backbone)
  ia3       PEFT IA3 on keys, values and the FFN output
  bitfit    bias-only tuning (every bias of the backbone trains; the weights stay frozen)
  full      full fine-tuning: every backbone weight trains (the upper reference; a model copy per task)

This runs in the peers' environment (`make peers-env`: transformers 4.57.6, adapters 1.3.0, PEFT), not
in the service's. `adapters` does not support MPNet, so pfeiffer/houlsby on MPNet are reported missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
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
# Attention projections by model family, for PEFT's target_modules (LoRA on query and value).
_QUERY_VALUE = {"bert": ["query", "value"], "mpnet": ["q", "v"]}
_IA3_TARGETS = {
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "mpnet": (["k", "v", "output.dense"], ["output.dense"]),
}
_ADAPTER_CONFIGS = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn"}


class MethodUnavailable(Exception):
    """This method cannot run on this backbone (e.g. `adapters` has no MPNet support)."""


@dataclass(frozen=True)
class SpartanConfig:
    """SPARTAN's own hyperparameters (E parents, C children, top-k, temperature T, LayerNorm copies)."""

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
        self.method = method
        self.model = model
        self.pooling = pooling
        self.head = head

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
        self.method = "spartan"
        self.encoder = encoder
        self.memory = memory
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


def family(backbone: Backbone) -> str:
    model_type = str(backbone.model.config.model_type)
    if model_type not in _QUERY_VALUE:
        raise MethodUnavailable(f"no PEFT target modules known for model type {model_type!r}")
    return model_type


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
    model = _ADAPT[method](backbone) if method in _ADAPT else backbone.model
    return Built(PooledHeadModel(method, model, backbone.pooling, head), backbone)


def silence_backbone_dropout(model: nn.Module) -> None:
    """The frozen backbone computes the same features in training as in serving (as SPARTAN's own
    trainer does); only the methods' own modules (LoRA, head, memory) keep their dropout. Done before
    a method adds its modules, so theirs are untouched."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _spartan(backbone: Backbone, num_outputs: int, data: TaskData | None, config: SpartanConfig) -> TaskModel:
    """A fresh memory exactly as `spartan train` starts one (app.training.trainer.new_memory)."""
    encoder = SpartanEncoder(backbone)
    if data is None:  # speed benchmarks: only the shape matters, not the labels' names
        labels = tuple(str(i) for i in range(num_outputs))
        data = TaskData("untitled", "classification", labels, [], [], [])
    train = TrainConfig(
        num_parents=config.num_parents,
        num_children=config.num_children,
        top_k=config.top_k,
        temperature=config.temperature,
        train_layernorm=config.train_layernorm,
    )
    return SpartanModel(encoder, new_memory(encoder, data, train))


def _bottleneck_adapter(kind: str) -> Callable[[Backbone], nn.Module]:
    def adapt(backbone: Backbone) -> nn.Module:
        import adapters

        model: Any = backbone.model  # adapters.init() swaps in its own model class at runtime
        try:
            adapters.init(model)
        except (ValueError, KeyError) as err:
            raise MethodUnavailable(f"`adapters` does not support {model.config.model_type}: {err}") from err
        model.add_adapter("task", config=adapters.AdapterConfig.load(_ADAPTER_CONFIGS[kind]))
        model.train_adapter("task")  # freezes everything but the adapter
        model.set_active_adapters("task")
        return model

    return adapt


def _lora(backbone: Backbone) -> nn.Module:
    import peft

    config = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.1, target_modules=_QUERY_VALUE[family(backbone)]
    )
    return peft.get_peft_model(backbone.model, config)


def _ia3(backbone: Backbone) -> nn.Module:
    import peft

    targets, feedforward = _IA3_TARGETS[family(backbone)]
    return peft.get_peft_model(
        backbone.model, peft.IA3Config(target_modules=targets, feedforward_modules=feedforward)
    )


def _bitfit(backbone: Backbone) -> nn.Module:
    for name, parameter in backbone.model.named_parameters():
        parameter.requires_grad_(name.endswith(".bias"))
    return backbone.model


def _full(backbone: Backbone) -> nn.Module:
    backbone.model.requires_grad_(True)
    return backbone.model


_ADAPT: dict[str, Callable[[Backbone], nn.Module]] = {
    "pfeiffer": _bottleneck_adapter("pfeiffer"),
    "houlsby": _bottleneck_adapter("houlsby"),
    "lora": _lora,
    "ia3": _ia3,
    "bitfit": _bitfit,
    "full": _full,
}

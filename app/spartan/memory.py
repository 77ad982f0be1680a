"""A task memory: the only trained, per-task part of SPARTAN.

One `MemoryLayer` per Transformer layer (parent keys, child keys, child values), or per layer of the
top ones only (`MemorySpec.first_memory_layer`), a task head on the pooled final state, and optionally
the task's own copy of backbone LayerNorms' weights and biases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from app.spartan.layer import (
    MemoryOutput,
    dense_memory_fused,
    fused_layout,
    memory_forward,
    uses_dense,
)

TaskType = Literal["classification", "regression"]
Pooling = Literal["mean", "first"]


@dataclass(frozen=True)
class MemorySpec:
    """Everything needed to rebuild a memory's shapes and to use it correctly on its backbone."""

    num_layers: int
    hidden_size: int
    num_parents: int = 16
    num_children: int = 3
    top_k: int = 8
    temperature: float = 1.6
    task_type: TaskType = "classification"
    labels: tuple[str, ...] = ("negative", "positive")
    pooling: Pooling = "mean"
    max_length: int = 128
    text_pairs: bool = False
    backbone_id: str = ""
    backbone_fingerprint: str = ""
    # Names (in the backbone's module tree) of the LayerNorms this task carries its own affine for.
    layernorm_names: tuple[str, ...] = ()
    dropout: float = 0.1
    training: dict[str, object] = field(default_factory=dict, compare=False, hash=False)
    # Layers first_memory_layer .. num_layers - 1 carry a memory; the ones below run as the bare
    # backbone (0 = every layer, as in the paper). Below it the task changes nothing, so training can
    # compute those layers' outputs once per example and back-propagate through the top layers only.
    first_memory_layer: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.first_memory_layer < self.num_layers:
            raise ValueError(
                f"first_memory_layer {self.first_memory_layer} is not a layer of 0..{self.num_layers - 1}"
            )

    @property
    def memory_layer_indices(self) -> range:
        """The Transformer layers (0 = the first) that carry a memory, in order."""
        return range(self.first_memory_layer, self.num_layers)

    @property
    def num_outputs(self) -> int:
        return 1 if self.task_type == "regression" else len(self.labels)

    @property
    def num_cells(self) -> int:
        return self.num_parents * self.num_children


def _init_normal(*shape: int) -> nn.Parameter:
    # N(0, 0.02) as in the reference code: m starts close to 0, so the memory starts near the identity.
    return nn.Parameter(torch.randn(*shape) * 0.02)


class MemoryLayer(nn.Module):
    """One layer's memory: P [E, H], K [E, C, H], V [E, C, H]. No biases (the reference's were unused)."""

    def __init__(self, hidden: int, num_parents: int, num_children: int, top_k: int, temperature: float):
        super().__init__()
        self.parent_keys = _init_normal(num_parents, hidden)
        self.child_keys = _init_normal(num_parents, num_children, hidden)
        self.child_values = _init_normal(num_parents, num_children, hidden)
        self.top_k = top_k
        self.temperature = temperature
        self._layout_key: tuple[int, ...] = ()
        self._layout: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, h: torch.Tensor) -> MemoryOutput:
        num_parents, num_children, _ = self.child_keys.shape
        # Parameters made under inference_mode have no version counter to validate a cache with.
        if (
            torch.is_grad_enabled()
            or self.child_keys.is_inference()
            or not uses_dense(num_parents, num_children)
        ):
            return memory_forward(
                h, self.parent_keys, self.child_keys, self.child_values, self.top_k, self.temperature
            )
        scores_t, values = self._inference_layout()
        return dense_memory_fused(h, scores_t, values, num_parents, num_children, self.top_k)

    def serving_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused layout (`fused_layout`) of the current parameters: cached where parameters have
        version counters, built afresh for parameters made under inference_mode."""
        if self.child_keys.is_inference():
            with torch.no_grad():
                return fused_layout(self.parent_keys, self.child_keys, self.child_values, self.temperature)
        return self._inference_layout()

    def _inference_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Serving's fused layout ([P^T | child keys / T], child-major values), rebuilt only when a
        parameter changes.

        Serving calls this once per layer per batch; caching saves the copies and the second GEMM per
        call, which is most of the memory's cost at small batches. Tensor versions catch any in-place
        update.
        """
        params = (self.parent_keys, self.child_keys, self.child_values)
        key = tuple(part for p in params for part in (id(p), p._version))
        if self._layout is None or key != self._layout_key:
            with torch.no_grad():
                self._layout = fused_layout(*params, self.temperature)
            self._layout_key = key
        return self._layout

    def inference_cache_bytes(self) -> int:
        """Bytes `_inference_layout` keeps once this layer has served (0 on the sparse path)."""
        num_parents, num_children, hidden = self.child_keys.shape
        if not uses_dense(num_parents, num_children):
            return 0
        cells = num_parents * num_children
        return (2 * cells + num_parents) * hidden * self.child_keys.element_size()


class NoMemory(nn.Module):
    """The place of a layer without a memory (below `first_memory_layer`): no parameters, never run."""


class TaskHead(nn.Module):
    """dense(H, H) + tanh + dropout + linear(H, outputs), on the pooled final hidden state."""

    def __init__(self, hidden: int, outputs: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, outputs)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(torch.tanh(self.dense(pooled))))


class LayerNormOverride(nn.Module):
    """A task's own weight and bias for one backbone LayerNorm."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())


def layernorm_key(module_name: str) -> str:
    # nn.ModuleDict keys cannot contain dots; module names always do.
    return module_name.replace(".", "__")


class TaskMemory(nn.Module):
    """The per-task parameters. `spec` says how to use them; `version` is set when loaded from a file."""

    def __init__(self, spec: MemorySpec):
        super().__init__()
        self.spec = spec
        # Indexed by Transformer layer, so parameter names (layers.{i}.…) name the layer they follow.
        self.layers = nn.ModuleList(
            MemoryLayer(spec.hidden_size, spec.num_parents, spec.num_children, spec.top_k, spec.temperature)
            if index >= spec.first_memory_layer
            else NoMemory()
            for index in range(spec.num_layers)
        )
        self.head = TaskHead(spec.hidden_size, spec.num_outputs, spec.dropout)
        self.layernorms = nn.ModuleDict()
        self.version = ""

    def init_layernorms(self, backbone_layernorms: dict[str, nn.LayerNorm]) -> None:
        """Start the task's LayerNorm copies from the backbone's own values (training only)."""
        for name in self.spec.layernorm_names:
            base = backbone_layernorms[name]
            self.layernorms[layernorm_key(name)] = LayerNormOverride(base.weight, base.bias)

    def memory_layers(self) -> list[MemoryLayer]:
        return [layer for _, layer in self.indexed_memory_layers()]

    def indexed_memory_layers(self) -> list[tuple[int, MemoryLayer]]:
        """(Transformer layer, its memory) for every layer that has one, bottom to top."""
        return [(index, layer) for index, layer in enumerate(self.layers) if isinstance(layer, MemoryLayer)]

    def memory_at(self, index: int) -> MemoryLayer | None:
        """The memory after Transformer layer `index`, or None where this task has none."""
        layer = self.layers[index]
        return layer if isinstance(layer, MemoryLayer) else None

    def layernorm(self, module_name: str) -> LayerNormOverride | None:
        override = self.layernorms[key] if (key := layernorm_key(module_name)) in self.layernorms else None
        return override if isinstance(override, LayerNormOverride) else None

    def resident_bytes(self) -> int:
        """Bytes this memory keeps while it serves: parameters plus each layer's inference cache."""
        parameters = sum(p.numel() * p.element_size() for p in self.parameters())
        return parameters + sum(layer.inference_cache_bytes() for layer in self.memory_layers())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

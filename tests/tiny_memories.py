"""A tiny valid task memory (2 layers, hidden size 8) for tests of the memory file and its parser."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from app.spartan.memfile import BackboneIdentity
from app.spartan.memory import LayerNormOverride, MemorySpec, TaskMemory, layernorm_key

LN_NAMES = ("embeddings.LayerNorm", "encoder.layer.0.output.LayerNorm")
BACKBONE = BackboneIdentity(
    fingerprint="f" * 64,
    num_layers=2,
    hidden_size=8,
    name="tiny",
    layernorm_names=(*LN_NAMES, "other.LayerNorm"),
)


def make_memory(**changes: Any) -> TaskMemory:
    """A random memory for BACKBONE; `changes` replace fields of its spec."""
    spec = MemorySpec(
        num_layers=2,
        hidden_size=8,
        num_parents=4,
        num_children=2,
        top_k=2,
        labels=("neg", "pos", "neutral"),
        backbone_id="tiny",
        backbone_fingerprint="f" * 64,
        layernorm_names=LN_NAMES,
        training={"dataset": "unit"},
    )
    memory = TaskMemory(replace(spec, **changes))
    for name in memory.spec.layernorm_names:
        memory.layernorms[layernorm_key(name)] = LayerNormOverride(torch.randn(8), torch.randn(8))
    return memory

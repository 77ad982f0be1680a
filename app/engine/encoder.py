"""The frozen backbone with SPARTAN memories inserted after every layer, per row of a batch.

Nothing of transformers' model code is copied or edited: a forward hook on each Transformer layer adds
the memory update to the layer's output, and each backbone LayerNorm is wrapped so a task can bring its
own affine parameters. Which memory a row uses is given per call as `RowGroup`s, so one backbone pass
serves rows of several tasks (the service's mixed batches) and rows without a memory (bare backbone).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import BatchEncoding

from app.engine.backbone import Backbone, pool
from app.spartan.layer import load_balancing_loss
from app.spartan.memfile import BackboneIdentity
from app.spartan.memory import LayerNormOverride, TaskMemory


@dataclass(frozen=True)
class RowGroup:
    """Rows of the batch (indices into dim 0) served by one task memory; None = the bare backbone."""

    memory: TaskMemory | None
    rows: torch.Tensor


@dataclass
class EncoderOutput:
    pooled: torch.Tensor  # [B, H] final pooled state (after the last memory)
    outputs: list[torch.Tensor | None]  # per group: head outputs [n, num_outputs]; None for bare rows
    routing: list[list[torch.Tensor]] | None  # per group, per layer: chosen parents [n, S, k]
    balance_loss: torch.Tensor | None  # mean over layers and groups, padding excluded


@dataclass
class _Pass:
    """State of the forward pass in progress, read by the hooks."""

    groups: Sequence[RowGroup]
    attention_mask: torch.Tensor
    batch_size: int
    record_routing: bool
    balance: bool
    routing: list[list[torch.Tensor]] = field(default_factory=list)
    balance_terms: list[torch.Tensor] = field(default_factory=list)
    # Per group, its rows as one contiguous slice of the batch when they are (the served path sorts
    # rows by memory so they always are): a view then replaces a gather and a scatter per layer.
    slices: list[slice] | None = None

    def __post_init__(self) -> None:
        self.slices = _contiguous_slices(self.groups, self.batch_size)

    def covers_all(self, group: RowGroup) -> bool:
        return len(self.groups) == 1 and group.rows.numel() == self.batch_size


def _contiguous_slices(groups: Sequence[RowGroup], batch_size: int) -> list[slice] | None:
    """Each group's rows as a slice, when the groups tile the batch in order (rows 0..a, a..b, ...)."""
    slices, start = [], 0
    for group in groups:
        count = group.rows.numel()
        if count == 0 or not torch.equal(group.rows, torch.arange(start, start + count)):
            return None
        slices.append(slice(start, start + count))
        start += count
    return slices if start == batch_size else None


class _PassHolder:
    current: _Pass | None = None


class TaskAwareLayerNorm(nn.Module):
    """A backbone LayerNorm that uses, per row, the task's own weight and bias when it has them."""

    def __init__(self, base: nn.LayerNorm, name: str, holder: _PassHolder):
        super().__init__()
        self.base = base
        self.name = name
        self._holder = holder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self._holder.current
        overrides = [] if run is None else self._overrides(run)
        if not overrides:
            return self.base(x)
        assert run is not None
        shape, eps = self.base.normalized_shape, self.base.eps
        if len(overrides) == 1 and run.covers_all(overrides[0][0]):
            override = overrides[0][1]
            return F.layer_norm(x, shape, override.weight, override.bias, eps)
        if run.slices is not None:
            return self._per_slice(x, run, run.slices)
        # Mixed batch of scattered rows: normalise once, then apply each row's own affine.
        weight = self.base.weight.expand(x.shape[0], -1)
        bias = self.base.bias.expand(x.shape[0], -1)
        for group, override in overrides:
            count = group.rows.numel()
            weight = weight.index_copy(0, group.rows, override.weight.to(weight.dtype).expand(count, -1))
            bias = bias.index_copy(0, group.rows, override.bias.to(bias.dtype).expand(count, -1))
        view = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        normalised = F.layer_norm(x, shape, None, None, eps)
        return normalised * weight.view(view).to(x.dtype) + bias.view(view).to(x.dtype)

    def _per_slice(self, x: torch.Tensor, run: _Pass, slices: list[slice]) -> torch.Tensor:
        """Rows sorted by task: one fused layer_norm per task's slice, with that task's affine."""
        shape, eps = self.base.normalized_shape, self.base.eps
        parts = []
        for group, rows in zip(run.groups, slices, strict=True):
            override = group.memory.layernorm(self.name) if group.memory is not None else None
            affine = (override.weight, override.bias) if override else (self.base.weight, self.base.bias)
            parts.append(F.layer_norm(x[rows], shape, *affine, eps))
        return torch.cat(parts)

    def _overrides(self, run: _Pass) -> list[tuple[RowGroup, LayerNormOverride]]:
        found = []
        for group in run.groups:
            override = group.memory.layernorm(self.name) if group.memory is not None else None
            if override is not None:
                found.append((group, override))
        return found


def _add_update(hidden: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """h + m, summed in float32 and rounded once to the backbone's precision."""
    if update.dtype == hidden.dtype:
        return hidden + update
    return (hidden.float() + update).to(hidden.dtype)


class SpartanEncoder:
    """Runs the backbone once per batch, each row through its own task's memories and head."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self._holder = _PassHolder()
        self._lock = threading.Lock()  # the hooks read per-pass state: one pass at a time
        self.layernorm_names = self._wrap_layernorms()
        self._handles: list[RemovableHandle] = [
            layer.register_forward_hook(self._make_hook(index)) for index, layer in enumerate(backbone.layers)
        ]

    def _wrap_layernorms(self) -> list[str]:
        model = self.backbone.model
        names = [name for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, TaskAwareLayerNorm(getattr(parent, attr), name, self._holder))
        return names

    def base_layernorms(self) -> dict[str, nn.LayerNorm]:
        """The backbone's own LayerNorms by their original module names (to start a task's copies)."""
        model = self.backbone.model
        wrapped = {name: model.get_submodule(name) for name in self.layernorm_names}
        return {name: m.base for name, m in wrapped.items() if isinstance(m, TaskAwareLayerNorm)}

    def _make_hook(self, index: int) -> Callable[[nn.Module, object, object], object]:
        def hook(module: nn.Module, args: object, output: object) -> object:
            run = self._holder.current
            if run is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            assert isinstance(hidden, torch.Tensor)
            updated = self._apply_memories(index, hidden, run)
            return (updated, *output[1:]) if isinstance(output, tuple) else updated

        return hook

    def _apply_memories(self, index: int, hidden: torch.Tensor, run: _Pass) -> torch.Tensor:
        batch, seq, width = hidden.shape
        if run.groups and run.covers_all(run.groups[0]):
            group = run.groups[0]
            if group.memory is None:
                return hidden
            update = self._group_update(index, hidden.reshape(-1, width), run, 0, run.attention_mask)
            if not torch.is_grad_enabled():  # serving: add in place (summed in fp32, rounded once)
                return hidden.add_(update.view(batch, seq, width))
            return _add_update(hidden, update.view(batch, seq, width))
        if run.slices is not None:
            return self._apply_to_slices(index, hidden, run, run.slices)
        updates = torch.zeros_like(hidden)
        for number, group in enumerate(run.groups):
            if group.memory is None:
                continue
            states = hidden.index_select(0, group.rows).reshape(-1, width)
            mask = run.attention_mask.index_select(0, group.rows)
            update = self._group_update(index, states, run, number, mask).to(hidden.dtype)
            updates = updates.index_copy(0, group.rows, update.view(-1, seq, width))
        return hidden + updates

    def _apply_to_slices(
        self, index: int, hidden: torch.Tensor, run: _Pass, slices: list[slice]
    ) -> torch.Tensor:
        """Rows sorted by task: each task's memory reads and updates a view of its own rows."""
        _, seq, width = hidden.shape
        if not torch.is_grad_enabled():  # serving: add in place, no copy of the batch's states
            for number, (group, rows) in enumerate(zip(run.groups, slices, strict=True)):
                if group.memory is not None:
                    states = hidden[rows].reshape(-1, width)
                    update = self._group_update(index, states, run, number, run.attention_mask[rows])
                    hidden[rows].add_(update.view(-1, seq, width))  # a view: writes into the batch
            return hidden
        updated = hidden.clone()  # training: autograd needs the layer's own output untouched
        for number, (group, rows) in enumerate(zip(run.groups, slices, strict=True)):
            if group.memory is not None:
                states = hidden[rows].reshape(-1, width)
                update = self._group_update(index, states, run, number, run.attention_mask[rows])
                updated[rows] = _add_update(hidden[rows], update.view(-1, seq, width))
        return updated

    def _group_update(
        self, index: int, states: torch.Tensor, run: _Pass, number: int, mask: torch.Tensor
    ) -> torch.Tensor:
        memory = run.groups[number].memory
        assert memory is not None
        # The memory runs in float32 whatever the backbone's precision: its cost is ~1% of a layer,
        # and its top-k choice and child softmax are where reduced precision would change routing.
        result = memory.layers[index](states.float())
        if run.record_routing:
            run.routing[number].append(result.parents.view(mask.shape[0], mask.shape[1], -1))
        if run.balance:
            run.balance_terms.append(
                load_balancing_loss(result.parent_logits, result.parents, mask.reshape(-1))
            )
        return result.update

    def forward(
        self,
        encoding: BatchEncoding | dict[str, torch.Tensor],
        groups: Sequence[RowGroup],
        *,
        record_routing: bool = False,
        balance: bool = False,
    ) -> EncoderOutput:
        """One backbone pass; gradients flow to the memories if autograd is on (training)."""
        mask = encoding["attention_mask"]
        run = _Pass(groups, mask, int(mask.shape[0]), record_routing, balance)
        run.routing = [[] for _ in groups]
        with self._lock:
            self._holder.current = run
            try:
                hidden = self.backbone.model(**encoding).last_hidden_state
            finally:
                self._holder.current = None
        pooled = pool(hidden.float(), mask, self.backbone.pooling)  # heads run in float32
        outputs = [
            group.memory.head(pooled.index_select(0, group.rows)) if group.memory is not None else None
            for group in groups
        ]
        balance_loss = torch.stack(run.balance_terms).mean() if run.balance_terms else None
        return EncoderOutput(pooled, outputs, run.routing if record_routing else None, balance_loss)

    def identity(self) -> BackboneIdentity:
        """What a memory file must match to run here."""
        return BackboneIdentity(
            fingerprint=self.backbone.fingerprint,
            num_layers=self.backbone.num_layers,
            hidden_size=self.backbone.hidden_size,
            name=self.backbone.name,
            layernorm_names=tuple(self.layernorm_names),
            pooling=self.backbone.pooling,
        )

    def encode(self, texts: list[str], pairs: list[str] | None, max_length: int) -> BatchEncoding:
        return self.backbone.tokenize(texts, pairs, max_length)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

"""The frozen backbone with SPARTAN memories inserted after its layers, per row of a batch.

Nothing of transformers' model code is copied or edited: a forward hook on each Transformer layer adds
the memory update to the layer's output, and each backbone LayerNorm is wrapped so a task can bring its
own affine parameters. Which memory a row uses is given per call as `RowGroup`s, so one backbone pass
serves rows of several tasks (the service's mixed batches) and rows without a memory (bare backbone).
A task whose memories start above layer 0 (`MemorySpec.first_memory_layer`) runs the layers below as
the bare backbone.

Training such a task can start the pass above its first memory (`resume_layer`; `layer_input` once
per example, then `forward_from` per step): the layers below are frozen and untouched by the task, so
their output is the same every epoch.
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
from app.engine.graph import MemoryGraph
from app.spartan.layer import load_balancing_loss
from app.spartan.memfile import BackboneIdentity
from app.spartan.memory import LayerNormOverride, MemorySpec, TaskMemory


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


def _serves_layer(group: RowGroup, index: int) -> bool:
    return group.memory is not None and group.memory.memory_at(index) is not None


@dataclass(frozen=True)
class LayerCall:
    """What the backbone's encoder passes each Transformer layer besides its hidden states, as it
    called one layer: the attention mask in the form that transformers version and attention
    implementation use, MPNet's relative position bias, flags. The same for every layer of a
    family in `RESUMABLE_FAMILIES`."""

    args: tuple[object, ...]
    kwargs: dict[str, object]


# Families whose encoder calls every layer with the same arguments but the hidden states, and whose
# last_hidden_state is the last layer's output (BERT, MiniLM: attention mask; MPNet: attention mask
# and relative position bias, computed once in MPNetEncoder.forward; tests/unit/test_encoder.py checks
# both against the full forward). Other families train through the full forward.
RESUMABLE_FAMILIES = ("bert", "mpnet")


class _Captured(Exception):
    """Raised by the capture hook to end a forward pass at the layer it captured."""


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

    def __init__(self, backbone: Backbone, graph: MemoryGraph | None = None):
        """`graph`: the compiled serving pass (app/engine/graph.py) for inference passes whose memories
        it accepts; every other pass (training, other memory shapes) runs the eager backbone."""
        self.backbone = backbone
        self.graph = graph
        self._holder = _PassHolder()
        self._lock = threading.Lock()  # the hooks read per-pass state: one pass at a time
        self.layernorm_layers = self._layers_of_layernorms()
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

    def _layers_of_layernorms(self) -> dict[str, int]:
        """Each backbone LayerNorm's Transformer layer (-1: in none, e.g. the embeddings')."""
        model = self.backbone.model
        names = {id(module): name for name, module in model.named_modules()}
        prefixes = [names[id(layer)] + "." for layer in self.backbone.layers]
        found = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.LayerNorm):
                found[name] = next((i for i, p in enumerate(prefixes) if name.startswith(p)), -1)
        return found

    def layernorms_from(self, first_layer: int) -> tuple[str, ...]:
        """The LayerNorms a task whose memories start at `first_layer` may carry its own copy of:
        every one for 0; else only those inside its memory layers, so that nothing below its first
        memory layer differs from the bare backbone."""
        return tuple(
            name
            for name in self.layernorm_names
            if first_layer == 0 or self.layernorm_layers[name] >= first_layer
        )

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
        if not any(_serves_layer(group, index) for group in run.groups):
            return hidden  # bare rows, and tasks whose memories start higher up
        if run.groups and run.covers_all(run.groups[0]):
            group = run.groups[0]
            update = self._group_update(index, hidden.reshape(-1, width), run, 0, run.attention_mask)
            if not torch.is_grad_enabled():  # serving: add in place (summed in fp32, rounded once)
                return hidden.add_(update.view(batch, seq, width))
            return _add_update(hidden, update.view(batch, seq, width))
        if run.slices is not None:
            return self._apply_to_slices(index, hidden, run, run.slices)
        updates = torch.zeros_like(hidden)
        for number, group in enumerate(run.groups):
            if not _serves_layer(group, index):
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
                if _serves_layer(group, index):
                    states = hidden[rows].reshape(-1, width)
                    update = self._group_update(index, states, run, number, run.attention_mask[rows])
                    hidden[rows].add_(update.view(-1, seq, width))  # a view: writes into the batch
            return hidden
        updated = hidden.clone()  # training: autograd needs the layer's own output untouched
        for number, (group, rows) in enumerate(zip(run.groups, slices, strict=True)):
            if _serves_layer(group, index):
                states = hidden[rows].reshape(-1, width)
                update = self._group_update(index, states, run, number, run.attention_mask[rows])
                updated[rows] = _add_update(hidden[rows], update.view(-1, seq, width))
        return updated

    def _group_update(
        self, index: int, states: torch.Tensor, run: _Pass, number: int, mask: torch.Tensor
    ) -> torch.Tensor:
        memory = run.groups[number].memory
        layer = memory.memory_at(index) if memory is not None else None
        assert layer is not None
        # On the eager path the memory runs in float32 whatever the backbone's precision (torch bf16
        # moved a few routing choices; the compiled graph runs it at its own precision, measured to keep
        # the labels: docs/ENGINE.md).
        result = layer(states.float())
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
        if self._graph_serves(groups, balance):
            return self._forward_graph(encoding, run)
        with self._lock:
            self._holder.current = run
            try:
                hidden = self.backbone.model(**encoding).last_hidden_state
            finally:
                self._holder.current = None
        return self._heads(hidden, run)

    @property
    def concurrent_passes(self) -> int:
        """Passes that can run at once: the graph's streams; the eager path runs one at a time."""
        return self.graph.streams if self.graph is not None else 1

    @property
    def runtime(self) -> str:
        """What runs its inference passes, e.g. `openvino-bf16` (the graph) or `torch-fp32`."""
        if self.graph is not None:
            return f"openvino-{self.graph.precision}"
        return f"torch-{self.backbone.precision}"

    def _graph_serves(self, groups: Sequence[RowGroup], balance: bool) -> bool:
        return (
            self.graph is not None
            and not balance
            and not torch.is_grad_enabled()
            and self.graph.accepts([group.memory for group in groups])
        )

    def _forward_graph(self, encoding: BatchEncoding | dict[str, torch.Tensor], run: _Pass) -> EncoderOutput:
        """The pass on the compiled graph: row i uses its group's memory; heads as on the eager path."""
        assert self.graph is not None
        row_task = torch.empty(run.batch_size, dtype=torch.long)
        for number, group in enumerate(run.groups):
            row_task[group.rows] = number
        hidden, parents = self.graph.run(encoding, [group.memory for group in run.groups], row_task)
        if run.record_routing:
            for number, group in enumerate(run.groups):
                if group.memory is not None:
                    chosen = parents.index_select(0, group.rows)
                    run.routing[number] = [chosen[:, i] for i in group.memory.spec.memory_layer_indices]
        return self._heads(hidden, run)

    def _heads(self, hidden: torch.Tensor, run: _Pass) -> EncoderOutput:
        pooled = pool(hidden.float(), run.attention_mask, self.backbone.pooling)  # heads run in float32
        outputs = [
            group.memory.head(pooled.index_select(0, group.rows)) if group.memory is not None else None
            for group in run.groups
        ]
        balance_loss = torch.stack(run.balance_terms).mean() if run.balance_terms else None
        return EncoderOutput(pooled, outputs, run.routing if run.record_routing else None, balance_loss)

    def resume_layer(self, spec: MemorySpec) -> int:
        """The lowest Transformer layer whose computation this task changes: below it every layer
        gives the bare backbone's output, so a pass may start there (`forward_from`). That is the layer
        above its first memory (whose memory reads the bare output of the layer below), or lower if it
        carries a LayerNorm copy lower down (0 for one outside every layer, like the embeddings')."""
        lowest = spec.first_memory_layer + 1
        for name in spec.layernorm_names:
            layer = self.layernorm_layers.get(name, -1)
            lowest = min(lowest, max(layer, 0))
        return min(lowest, self.backbone.num_layers - 1)  # a pass runs at least the last layer

    def resumable(self) -> bool:
        """Whether `layer_input` and `forward_from` support this backbone's family."""
        return str(self.backbone.model.config.model_type) in RESUMABLE_FAMILIES

    def layer_input(
        self, encoding: BatchEncoding | dict[str, torch.Tensor], layer: int
    ) -> tuple[torch.Tensor, LayerCall]:
        """The bare backbone run up to Transformer layer `layer` (no memory, no gradient) and stopped
        there: that layer's input hidden states [B, S, H], and the rest of what the encoder passes it.

        The pass ends by an exception from a pre-hook on that layer, so nothing above it runs (layer 0:
        only the embeddings, the attention mask and, for MPNet, the position bias are computed).
        """
        captured: list[tuple[tuple[object, ...], dict[str, object]]] = []

        def capture(module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            captured.append((args, dict(kwargs)))
            raise _Captured

        handle = self.backbone.layers[layer].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with self._lock, torch.no_grad():
                self.backbone.model(**encoding)
        except _Captured:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"the backbone's forward pass never reached layer {layer}")
        args, kwargs = captured[0]
        hidden = args[0] if args else kwargs.pop("hidden_states")
        assert isinstance(hidden, torch.Tensor)
        return hidden, LayerCall(tuple(args[1:]), kwargs)

    def forward_from(
        self,
        first: int,
        hidden: torch.Tensor,
        call: LayerCall,
        attention_mask: torch.Tensor,
        groups: Sequence[RowGroup],
        *,
        record_routing: bool = False,
        balance: bool = False,
    ) -> EncoderOutput:
        """`forward` from Transformer layer `first` on: `hidden` is the bare backbone's input to that
        layer (`layer_input`'s, possibly cached from another batch and re-padded; not modified), `call`
        the rest of its arguments for this batch. The memories after layer `first - 1` are applied to
        `hidden` first. Equal to `forward` for tasks with `resume_layer` >= `first` (checked)."""
        if not self.resumable():
            raise ValueError(f"forward_from does not support {self.backbone.model.config.model_type!r}")
        for group in groups:
            if group.memory is not None and self.resume_layer(group.memory.spec) < first:
                raise ValueError(f"a task of this batch changes layer {first - 1} or one below it")
        run = _Pass(groups, attention_mask, int(attention_mask.shape[0]), record_routing, balance)
        run.routing = [[] for _ in groups]
        with self._lock:
            self._holder.current = run
            try:
                if first > 0:  # on a copy: serving's in-place update must not write into the cache
                    hidden = self._apply_memories(first - 1, hidden.clone(), run)
                for layer in self.backbone.layers[first:]:
                    out = layer(hidden, *call.args, **call.kwargs)
                    hidden = out[0] if isinstance(out, tuple) else out
            finally:
                self._holder.current = None
        return self._heads(hidden, run)

    def identity(self) -> BackboneIdentity:
        """What a memory file must match to run here."""
        return BackboneIdentity(
            fingerprint=self.backbone.fingerprint,
            num_layers=self.backbone.num_layers,
            hidden_size=self.backbone.hidden_size,
            name=self.backbone.name,
            layernorm_names=tuple(self.layernorm_names),
            pooling=self.backbone.pooling,
            layernorm_layers=tuple(self.layernorm_layers.items()),
        )

    def encode(self, texts: list[str], pairs: list[str] | None, max_length: int) -> BatchEncoding:
        return self.backbone.tokenize(texts, pairs, max_length)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

"""The serving pass as one compiled OpenVINO graph: the frozen backbone with every layer's memory and
every LayerNorm's per-row affine inside it, and the memories' tensors as *inputs*.

Why a graph: on torch eager each memory is ~10 small operations per layer, each paying dispatch and
a thread-pool fork/join; they cost 5-25% of a bf16 pass (docs/ENGINE.md). Compiled, they run as a
few fused kernels beside the layer's own, and OpenVINO's bf16 kernels are 1.2-2x faster than torch's
for the backbone itself on this CPU.

Why inputs, not constants: one compiled graph serves every task and every mix of tasks in a batch.
Each pass gets the memories of the tasks in it stacked along a task axis ([T, ...]), and each row's
task index; the graph gathers each row's memory and LayerNorm affine (`row_task`). Rows without a
memory (embeddings) and layers below a task's first memory get zero memories: their update is
exactly 0. A hot swap never changes a pass in flight, since a pass reads the tensors of the memory
objects it was given.

One graph serves memories of one shape (parents, children, top-k); a batch with any other memory
runs on the eager path (`accepts`). The graph is traced from an fp32 copy of the backbone, so memory
files and fingerprints are unchanged, and compiled at the serving precision (bf16 or f32).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import shutil
import tempfile
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.engine.backbone import Backbone, Precision
from app.errors import BackboneError
from app.spartan.memory import MemorySpec, TaskMemory

log = logging.getLogger(__name__)

_OV_PRECISION: dict[Precision, str] = {"bf16": "bf16", "fp32": "f32"}
# Part of the graph cache's key: bump when the traced computation changes.
GRAPH_FORMAT = "spartan-graph-3"


@dataclass(frozen=True)
class GraphShape:
    """What every memory one graph serves must share (besides the backbone)."""

    num_parents: int
    num_children: int
    top_k: int

    @classmethod
    def of(cls, spec: MemorySpec) -> GraphShape:
        return cls(spec.num_parents, spec.num_children, spec.top_k)

    @property
    def num_cells(self) -> int:
        return self.num_parents * self.num_children


class _RowInputs:
    """The per-pass tensors the traced modules read (set by `_Traced.forward` while tracing)."""

    ln_weight: torch.Tensor  # [B, N, H]: each row's affine for each of the N LayerNorms
    ln_bias: torch.Tensor
    keys: list[torch.Tensor]  # per layer [B, H, E + C*E]
    values: list[torch.Tensor]  # per layer [B, C*E, H]
    parents: list[torch.Tensor]


class _RowLayerNorm(nn.Module):
    """LayerNorm with each row's own weight and bias (the task's copy, or the backbone's)."""

    def __init__(self, base: nn.LayerNorm, index: int, rows: _RowInputs):
        super().__init__()
        self.shape, self.eps, self.index, self.rows = base.normalized_shape, base.eps, index, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalised = F.layer_norm(x, self.shape, None, None, self.eps)
        weight, bias = self.rows.ln_weight[:, self.index], self.rows.ln_bias[:, self.index]  # [B, H]
        for _ in range(x.dim() - 2):  # broadcast over the sequence (and any other middle) dimensions
            weight, bias = weight.unsqueeze(1), bias.unsqueeze(1)
        return normalised * weight + bias


def _memory_hook(index: int, shape: GraphShape, rows: _RowInputs) -> Any:
    """After layer `index`: each row's memory, as `dense_memory_fused` computes it, batched over rows.
    (A masked-softmax form without the scatter, and symbolic reshapes, measured no faster: 0.98-1.04x.)"""

    def hook(module: nn.Module, args: object, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        batch, seq, _ = hidden.shape
        scores = torch.bmm(hidden, rows.keys[index])
        logits = scores[..., : shape.num_parents]
        top_logits, top_idx = logits.topk(shape.top_k, dim=-1)
        parent_w = torch.zeros_like(logits).scatter(-1, top_idx, torch.softmax(top_logits, dim=-1))
        cells = scores[..., shape.num_parents :].reshape(batch, seq, shape.num_children, shape.num_parents)
        weights = (parent_w.unsqueeze(2) * torch.softmax(cells, dim=2)).reshape(batch, seq, shape.num_cells)
        rows.parents.append(top_idx)
        updated = hidden + torch.bmm(weights, rows.values[index])
        return (updated, *output[1:]) if isinstance(output, tuple) else updated

    return hook


class _Traced(nn.Module):
    """The module OpenVINO converts: model inputs, row_task, LayerNorm affines, keys and values per
    layer -> (last hidden state [B, S, H], chosen parents [B, L, S, k])."""

    def __init__(
        self, backbone: Backbone, layernorm_names: Sequence[str], shape: GraphShape, names: list[str]
    ):
        super().__init__()
        self.model, self.names, self.rows = backbone.model, names, _RowInputs()
        self.num_layers = backbone.num_layers
        for index, name in enumerate(layernorm_names):
            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, attr, _RowLayerNorm(getattr(parent, attr), index, self.rows))
        for index, layer in enumerate(backbone.layers):
            layer.register_forward_hook(_memory_hook(index, shape, self.rows))

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count, layers = len(self.names), self.num_layers
        model_inputs = dict(zip(self.names, inputs[:count], strict=True))
        row_task, ln_weight, ln_bias = inputs[count : count + 3]
        per_layer = inputs[count + 3 :]
        rows = self.rows
        rows.ln_weight, rows.ln_bias = ln_weight[row_task], ln_bias[row_task]
        rows.keys = [keys[row_task] for keys in per_layer[:layers]]
        rows.values = [values[row_task] for values in per_layer[layers:]]
        rows.parents = []
        hidden = self.model(**model_inputs).last_hidden_state
        return hidden, torch.stack(rows.parents, dim=1)


def _example_encoding(backbone: Backbone) -> dict[str, torch.Tensor]:
    """Two rows of different lengths (so the trace sees padding), as the runner pads them."""
    if backbone.tokenizer is not None:
        return dict(backbone.tokenize(["a short example", "and another one, a little longer"], None, 16))
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


class MemoryGraph:
    """The compiled graph, and how to feed it a pass's rows and memories."""

    def __init__(
        self,
        backbone: Backbone,
        layernorm_names: Sequence[str],
        shape: GraphShape,
        *,
        precision: Precision,
        threads: int,
        streams: int = 1,
        cache_dir: Path | None = None,
        fp32_source: Callable[[], Backbone] | None = None,
    ):
        """`threads`: each pass's threads; `streams`: passes that may run at once (from as many callers'
        threads), each on its own `threads`. `backbone`: the backbone served (sizes, tokenizer,
        fingerprint). The graph is converted from an fp32 copy, `fp32_source()` (default: `backbone`
        itself, which the conversion then consumes: its modules are rewritten for tracing), made only
        when `cache_dir` does not hold the graph already; a start with the cache warm skips both the copy
        and the ~4 s conversion."""
        import openvino as ov

        self.shape, self.precision = shape, precision
        self.hidden, self.num_layers = backbone.hidden_size, backbone.num_layers
        self.layernorm_names = tuple(layernorm_names)
        example = _example_encoding(backbone)
        self.input_names = list(example)
        folder = cache_dir / self._cache_key(backbone, ov.__version__) if cache_dir is not None else None
        cached = self._read_cache(folder) if folder is not None else None
        if cached is not None:
            model, self._base_affine = cached
        else:
            source = fp32_source() if fp32_source is not None else backbone
            self._base_affine = self._backbone_affine(source)
            model = self._convert(source)
            if folder is not None:
                self._save(model, self._base_affine, folder)
        # Streams share the compiled weights; each has its own threads, and each infer request its own
        # buffers, so `streams` callers run at once with no lock between them.
        config = {
            "INFERENCE_PRECISION_HINT": _OV_PRECISION[precision],
            "INFERENCE_NUM_THREADS": threads * streams,
            **({"NUM_STREAMS": streams} if streams > 1 else {"PERFORMANCE_HINT": "LATENCY"}),
        }
        compiled = ov.Core().compile_model(model, "CPU", config)
        self.streams = streams
        self._packs_lock = threading.Lock()
        cells = shape.num_cells
        # Rows and layers without a memory: zero keys and values make the update exactly 0.
        zero_keys, zero_values = (
            torch.zeros(self.hidden, shape.num_parents + cells),
            torch.zeros(cells, self.hidden),
        )
        self._zero_layout = (zero_keys, zero_values)
        layers = self.num_layers
        self._bare = [*self._base_affine, *[zero_keys.numpy()] * layers, *[zero_values.numpy()] * layers]
        self._packs: weakref.WeakKeyDictionary[TaskMemory, tuple[tuple[int, ...], list[np.ndarray]]]
        self._packs = weakref.WeakKeyDictionary()
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for request in self._warmed_requests(compiled, example):
            self._requests.put(request)

    def _warmed_requests(self, compiled: Any, example: Mapping[str, torch.Tensor]) -> list[Any]:
        """One infer request per stream, each having run one bare pass in this thread.

        Why before any caller may use them: OpenVINO's Python bindings (2026.4) fill function-local
        statics on first use, with the GIL held (the input dispatch's `Type.to_dtype`). Two threads
        doing it at once deadlock the process: the batch workers' first passes side by side froze a
        server for good, event loop and /healthz included (tests/unit/test_graph.py). The pass also
        takes each stream's one-off kernel setup off the first request.
        """
        requests = [compiled.create_infer_request() for _ in range(self.streams)]
        rows = example["input_ids"].shape[0]
        inputs = self._inputs(example, [None], torch.zeros(rows, dtype=torch.long))
        for request in requests:
            self._infer(request, inputs)
        return requests

    def _cache_key(self, backbone: Backbone, ov_version: str) -> str:
        facts = [GRAPH_FORMAT, ov_version, torch.__version__, backbone.fingerprint, str(self.shape)]
        facts += [*self.layernorm_names, *self.input_names]
        return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:24]

    def _convert(self, backbone: Backbone) -> Any:
        import openvino as ov

        example = self._example(backbone)
        traced = _Traced(backbone, self.layernorm_names, self.shape, self.input_names).eval()
        dynamic = [([-1] * t.dim(), ov.Type.i64 if t.dtype == torch.long else ov.Type.f32) for t in example]
        with torch.no_grad(), warnings.catch_warnings():
            # transformers' shape checks are constants of the trace by design (they hold for any shape).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return ov.convert_model(traced, example_input=tuple(example), input=dynamic)

    @staticmethod
    def _read_cache(folder: Path) -> tuple[Any, tuple[np.ndarray, np.ndarray]] | None:
        """The cached graph and affines; None (convert again) for a missing, partial or unreadable
        entry, which the next `_save` replaces."""
        import openvino as ov

        try:
            with np.load(folder / "layernorms.npz") as saved:
                affine = (saved["weight"], saved["bias"])
            return ov.Core().read_model(folder / "graph.xml"), affine
        except FileNotFoundError:
            return None
        except Exception as err:  # a damaged entry costs one conversion, never a start
            log.warning("graph cache entry %s unreadable (%s); converting again", folder, err)
            return None

    @staticmethod
    def _save(model: Any, affine: tuple[np.ndarray, np.ndarray], folder: Path) -> None:
        """The graph and the backbone's LayerNorm affines (the bare rows' inputs), written beside and
        then renamed into place: a reader never sees half of them."""
        import openvino as ov

        partial: Path | None = None
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
            ov.save_model(model, partial / "graph.xml", compress_to_fp16=False)  # keep the fp32 weights
            np.savez(partial / "layernorms.npz", weight=affine[0], bias=affine[1])
            shutil.rmtree(folder, ignore_errors=True)  # a damaged entry (a reader of it converts too)
            partial.rename(folder)
        except (OSError, RuntimeError) as err:  # a concurrent start won the rename; a read-only cache
            log.info("graph cache not written (%s); the next start converts again", err)
            if partial is not None:
                shutil.rmtree(partial, ignore_errors=True)

    def _backbone_affine(self, backbone: Backbone) -> tuple[np.ndarray, np.ndarray]:
        norms: list[nn.LayerNorm] = []
        for name in self.layernorm_names:
            module = backbone.model.get_submodule(name)
            if not isinstance(module, nn.LayerNorm):
                raise TypeError(f"{name} is a {type(module).__name__}, not the backbone's own LayerNorm")
            norms.append(module)
        weight = torch.stack([n.weight.detach().float() for n in norms])
        bias = torch.stack([n.bias.detach().float() for n in norms])
        return weight.numpy().copy(), bias.numpy().copy()

    def _example(self, backbone: Backbone) -> list[torch.Tensor]:
        encoding = _example_encoding(backbone)
        batch, tasks, cells = encoding["input_ids"].shape[0], 2, self.shape.num_cells
        inputs = [encoding[name] for name in self.input_names]
        inputs.append(torch.tensor([1, 0]))
        weight, bias = (torch.from_numpy(a).expand(tasks, -1, -1).contiguous() for a in self._base_affine)
        keys = [torch.randn(tasks, self.hidden, self.shape.num_parents + cells) * 0.02] * self.num_layers
        values = [torch.randn(tasks, cells, self.hidden) * 0.02] * self.num_layers
        assert batch == tasks
        return [*inputs, weight, bias, *keys, *values]

    def accepts(self, memories: Sequence[TaskMemory | None]) -> bool:
        """Whether every memory of a pass has this graph's shape (None: a bare row, always)."""
        return all(
            m is None or (GraphShape.of(m.spec) == self.shape and m.spec.hidden_size == self.hidden)
            for m in memories
        )

    def run(
        self,
        encoding: Mapping[str, torch.Tensor],
        memories: Sequence[TaskMemory | None],
        row_task: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: rows use memories[row_task[i]] (None = none). Returns the last hidden state
        [B, S, H] (float32) and the chosen parents [B, L, S, k] (meaningless where a row has no memory
        at that layer)."""
        inputs = self._inputs(encoding, memories, row_task)
        request = self._requests.get()  # a free stream's request; waits while all of them run
        try:
            return self._infer(request, inputs)
        finally:
            self._requests.put(request)

    def _inputs(
        self,
        encoding: Mapping[str, torch.Tensor],
        memories: Sequence[TaskMemory | None],
        row_task: torch.Tensor,
    ) -> list[np.ndarray]:
        packs = [self._pack(memory) for memory in memories]
        inputs = [encoding[name].numpy() for name in self.input_names]
        inputs.append(row_task.numpy())
        return inputs + [_stack([pack[part] for pack in packs]) for part in range(len(packs[0]))]

    @staticmethod
    def _infer(request: Any, inputs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        result = request.infer(inputs, share_inputs=True)
        hidden, parents = (torch.from_numpy(result[i].copy()) for i in range(2))
        return hidden, parents.long()

    def _pack(self, memory: TaskMemory | None) -> list[np.ndarray]:
        """One memory's inputs: LayerNorm weights and biases [N, H], keys per layer, values per layer;
        numpy views of the tensors the memory keeps for serving anyway, and kept while it is unchanged."""
        if memory is None:
            return self._bare
        key = _version_key(memory)
        with self._packs_lock:
            cached = self._packs.get(memory)
        if cached is not None and cached[0] == key:
            return cached[1]
        weight, bias = (a.copy() for a in self._base_affine)
        for index, name in enumerate(self.layernorm_names):
            override = memory.layernorm(name)
            if override is not None:
                weight[index] = override.weight.detach().float().numpy()
                bias[index] = override.bias.detach().float().numpy()
        keys, values = [], []
        for index in range(self.num_layers):
            layer = memory.memory_at(index)
            scores_t, cell_values = layer.serving_layout() if layer is not None else self._zero_layout
            keys.append(scores_t.numpy())
            values.append(cell_values.numpy())
        pack = [weight, bias, *keys, *values]
        with self._packs_lock:  # two streams may pack one memory at once: the same arrays, either wins
            self._packs[memory] = (key, pack)
        return pack


def _version_key(memory: TaskMemory) -> tuple[int, ...]:
    """Changes when a parameter is updated in place (inference tensors cannot be: they have none)."""
    return tuple(p._version for p in memory.parameters() if not p.is_inference())


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    """The task axis: a view for a single-task pass (most of them), a copy otherwise."""
    return parts[0][None] if len(parts) == 1 else np.stack(parts)


def try_memory_graph(
    backbone: Backbone,
    layernorm_names: Sequence[str],
    *,
    precision: Precision,
    threads: int,
    streams: int = 1,
    required: bool,
    cache_dir: Path | None = None,
    fp32_source: Callable[[], Backbone] | None = None,
) -> MemoryGraph | None:
    """The graph for the default memory shape, or None (with the reason logged) where OpenVINO is not
    installed or cannot convert this encoder family; `required` raises instead."""
    shape = GraphShape.of(MemorySpec(num_layers=backbone.num_layers, hidden_size=backbone.hidden_size))
    try:
        return MemoryGraph(
            backbone, layernorm_names, shape, precision=precision, threads=threads, streams=streams,
            cache_dir=cache_dir, fp32_source=fp32_source,
        )  # fmt: skip
    except Exception as err:  # ImportError, or any conversion failure of an unusual family
        if required:
            raise BackboneError(f"the OpenVINO graph cannot be built ({type(err).__name__}: {err})") from err
        log.warning("OpenVINO graph unavailable (%s: %s); serving on torch eager", type(err).__name__, err)
        return None

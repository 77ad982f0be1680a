"""Rows of many tasks -> one backbone forward pass: tokenise per task, pad per pass, route per row.

The batcher decides which rows run together; this module makes a pass over any set of rows give each
row what it would get served alone:
* each row is tokenised with its own task's settings (its max_length, text pairs or not), and padded
  only to the longest row of its pass; padding is masked, so it does not change a row's result;
* each row runs through its own task's memories and head (one RowGroup per memory object: two
  versions of one task during a hot swap are two groups).

* rows are ordered by memory before the pass, so each task's rows are one contiguous slice of the
  batch (views, not gathers, in every layer); results go back in the callers' order;
* head outputs become plain numbers here, per group, in the worker (softmax for classification): the
  event loop only reads them. A row whose output is not finite is marked, and fails alone;
* a row the tokenizer refuses fails alone (InvalidInput), never its neighbours.

Tokenisation runs under the runner's lock (the batcher may have several workers): a Hugging Face fast
tokenizer changes its truncation settings per call and must not be called concurrently with different
settings.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from app.engine.encoder import EncoderOutput, RowGroup, SpartanEncoder
from app.engine.routing_tally import RoutingTally
from app.errors import InvalidInput, SpartanError
from app.spartan.memory import TaskMemory

log = logging.getLogger(__name__)

# One layer's parents for one row: (parent index, real tokens that chose it), most used first.
ParentCounts = list[tuple[int, int]]


@dataclass(frozen=True, eq=False)
class Row:
    """One input of one request, bound to the memory its request resolved when it was submitted;
    no memory = the bare backbone's sentence embedding (the embeddings API)."""

    memory: TaskMemory | None
    text: str
    pair: str | None = None
    record_routing: bool = False
    task: str = ""  # the task the memory serves (routing statistics are kept per task)


@dataclass(frozen=True, eq=False)
class PreparedRow:
    """A tokenised row: `length` is its token count after its own task's truncation. A row that could
    not be tokenised carries the error instead (and never reaches a forward pass)."""

    row: Row
    length: int
    features: dict[str, list[int]] = field(default_factory=dict)
    error: SpartanError | None = None


@dataclass(frozen=True)
class RowOutput:
    """One row's result as numbers: class probabilities (classification), [value] (regression), or
    the sentence embedding (a row without a memory)."""

    outputs: list[float]
    routing: list[ParentCounts] | None = None
    finite: bool = True  # False: the memory overflowed on this row; its request must fail
    tokens: int = 0  # the row's token count, after truncation


class Runner(Protocol):
    """What the batcher needs from the model side (tests plug in fakes)."""

    def prepare(self, rows: Sequence[Row]) -> list[PreparedRow]: ...

    def run(self, rows: Sequence[PreparedRow]) -> list[RowOutput]: ...


class EncoderRunner:
    """The real runner: the shared SpartanEncoder with every row's own memory; with a `routing_tally`,
    every pass's parent choices are also counted per task."""

    def __init__(self, encoder: SpartanEncoder, routing_tally: RoutingTally | None = None) -> None:
        self.encoder = encoder
        self.tokenizer = encoder.backbone.tokenizer
        self.pooling = encoder.backbone.pooling
        self.routing_tally = routing_tally
        self._tokenizer_lock = threading.Lock()

    def prepare(self, rows: Sequence[Row]) -> list[PreparedRow]:
        """Tokenise without padding, one tokenizer call per (max_length, pairs) setting; if a call
        fails, its rows are tokenised one by one so only the rows the tokenizer refuses fail."""
        prepared: list[PreparedRow | None] = [None] * len(rows)
        settings: dict[tuple[int, bool], list[int]] = {}
        embedding_length = self.encoder.backbone.sentence_embedding.max_length
        for index, row in enumerate(rows):
            setting = (
                (row.memory.spec.max_length, row.memory.spec.text_pairs)
                if row.memory is not None
                else (embedding_length, False)
            )
            settings.setdefault(setting, []).append(index)
        for (max_length, pairs), indices in settings.items():
            try:
                tokenized = self._tokenize(rows, indices, max_length, pairs)
            except Exception:  # one bad text must not fail the rows of other clients
                for index in indices:
                    prepared[index] = self._prepare_alone(rows, index, max_length, pairs)
                continue
            for index, features in zip(indices, tokenized, strict=True):
                prepared[index] = PreparedRow(rows[index], len(features["input_ids"]), features)
        return [p for p in prepared if p is not None]

    def _prepare_alone(self, rows: Sequence[Row], index: int, max_length: int, pairs: bool) -> PreparedRow:
        try:
            features = self._tokenize(rows, [index], max_length, pairs)[0]
        except Exception as err:
            log.warning("an input could not be tokenised (%s); only its request fails", type(err).__name__)
            return PreparedRow(rows[index], 0, error=InvalidInput(f"an input could not be tokenised: {err}"))
        return PreparedRow(rows[index], len(features["input_ids"]), features)

    def _tokenize(
        self, rows: Sequence[Row], indices: list[int], max_length: int, pairs: bool
    ) -> list[dict[str, list[int]]]:
        # The same arguments as Backbone.tokenize (the training and `spartan eval` path), minus padding;
        # a pair task given a single text gets "" as its pair, as in training.
        texts = [rows[i].text for i in indices]
        second = [rows[i].pair or "" for i in indices] if pairs else None
        with self._tokenizer_lock:
            encoded = self.tokenizer(
                texts,
                second,
                padding=False,
                truncation="longest_first" if second else True,
                max_length=min(max_length, self.encoder.backbone.max_positions),
                return_attention_mask=False,
            )
        names = [name for name in encoded if name != "attention_mask"]
        return [{name: list(encoded[name][i]) for name in names} for i in range(len(indices))]

    def run(self, rows: Sequence[PreparedRow]) -> list[RowOutput]:
        order = _order_by_memory(rows)
        ordered = [rows[i] for i in order]
        encoding = self.pad(ordered)
        groups, positions = _row_groups(ordered)
        # Recording keeps a view of the parent indices each layer computes anyway.
        record_routing = self.routing_tally is not None or any(p.row.record_routing for p in ordered)
        with torch.inference_mode():
            out = self.encoder.forward(encoding, groups, record_routing=record_routing)
            if self.routing_tally is not None:
                self._tally_routing(ordered, groups, positions, out, encoding["attention_mask"])
            results: list[RowOutput | None] = [None] * len(rows)
            for number, group in enumerate(groups):
                if group.memory is None:
                    values, finite = self._embeddings(out.pooled.index_select(0, group.rows))
                else:
                    values, finite = _interpret_group(group.memory, out.outputs[number])
                for local, position in enumerate(positions[number]):
                    wants = ordered[position].row.record_routing and group.memory is not None
                    routing = (
                        self._routing(out, number, local, encoding["attention_mask"][position])
                        if wants
                        else None
                    )
                    tokens = ordered[position].length
                    results[order[position]] = RowOutput(values[local], routing, finite[local], tokens)
        return [r for r in results if r is not None]

    def _embeddings(self, pooled: torch.Tensor) -> tuple[list[list[float]], list[bool]]:
        """Bare rows' pooled states as the model defines its sentence embedding (normalised or not)."""
        if self.encoder.backbone.sentence_embedding.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
        return pooled.tolist(), torch.isfinite(pooled).all(dim=-1).tolist()

    def _tally_routing(
        self,
        rows: Sequence[PreparedRow],
        groups: Sequence[RowGroup],
        positions: Sequence[list[int]],
        out: EncoderOutput,
        attention_mask: torch.Tensor,
    ) -> None:
        """Add this pass's parent choices to each task's statistics. Statistics are an observer: a
        failure here is logged and never costs a row its prediction."""
        assert self.routing_tally is not None
        try:
            assert out.routing is not None
            for number, group in enumerate(groups):
                outputs = out.outputs[number]
                if group.memory is None:  # embedding rows: no memory, nothing to count
                    continue
                assert outputs is not None
                # A memory object serves one task (the registry loads one per task).
                task = rows[positions[number][0]].row.task
                real_tokens = attention_mask.index_select(0, group.rows)
                self.routing_tally.add_pass(task, group.memory, out.routing[number], real_tokens, outputs)
        except Exception:
            log.exception("routing statistics: counting a forward pass failed (predictions are unaffected)")

    def pad(self, rows: Sequence[PreparedRow]) -> dict[str, torch.Tensor]:
        """Pad to the longest row of this pass, on the tokenizer's own padding side (the trainer pads
        its batches here too, so training sees exactly the served inputs)."""
        width = max(p.length for p in rows)
        pad_values = {
            "input_ids": self.tokenizer.pad_token_id or 0,
            "token_type_ids": self.tokenizer.pad_token_type_id,
        }
        left = self.tokenizer.padding_side == "left"
        batch: dict[str, list[list[int]]] = {name: [] for name in rows[0].features}
        batch["attention_mask"] = []
        for p in rows:
            gap = width - p.length
            for name, values in p.features.items():
                filler = [pad_values.get(name, 0)] * gap
                batch[name].append(filler + values if left else values + filler)
            mask = [1] * p.length
            batch["attention_mask"].append([0] * gap + mask if left else mask + [0] * gap)
        return {name: torch.tensor(values, dtype=torch.long) for name, values in batch.items()}

    def _routing(
        self, out: EncoderOutput, group: int, local: int, attention_mask: torch.Tensor
    ) -> list[ParentCounts]:
        """Per layer, the parents used for the pooled token (first-token pooling), or the parents most
        used over the row's real tokens, with counts (mean pooling)."""
        assert out.routing is not None
        summary: list[ParentCounts] = []
        for layer_parents in out.routing[group]:
            parents = layer_parents[local]  # [S, k]
            if self.pooling == "first":
                summary.append([(int(p), 1) for p in parents[0]])
                continue
            real = parents[attention_mask.bool()].reshape(-1)
            counts = torch.bincount(real, minlength=1)
            top_k = parents.shape[-1]
            ranked = sorted(
                ((int(c), int(p)) for p, c in enumerate(counts.tolist()) if c > 0),
                key=lambda x: (-x[0], x[1]),
            )
            summary.append([(p, c) for c, p in ranked[:top_k]])
        return summary


def _order_by_memory(rows: Sequence[PreparedRow]) -> list[int]:
    """Row positions ordered by memory (first appearance), stable within a memory: each memory's
    rows become one contiguous slice of the pass."""
    first_seen: dict[int, int] = {}
    for position, prepared in enumerate(rows):
        first_seen.setdefault(id(prepared.row.memory), position)
    return sorted(range(len(rows)), key=lambda i: (first_seen[id(rows[i].row.memory)], i))


def _interpret_group(
    memory: TaskMemory, outputs: torch.Tensor | None
) -> tuple[list[list[float]], list[bool]]:
    """A group's head outputs [n, outputs] -> per row, probabilities (or [value]) and finiteness."""
    assert outputs is not None
    outputs = outputs.float()
    if memory.spec.task_type == "classification":
        outputs = torch.softmax(outputs, dim=-1)
    finite = torch.isfinite(outputs).all(dim=-1)
    return outputs.tolist(), finite.tolist()


def _row_groups(rows: Sequence[PreparedRow]) -> tuple[list[RowGroup], list[list[int]]]:
    """One RowGroup per memory object (identity, not task name; None = the bare rows), and each
    group's row positions."""
    by_memory: dict[int, list[int]] = {}
    memories: dict[int, TaskMemory | None] = {}
    for position, prepared in enumerate(rows):
        key = id(prepared.row.memory)
        memories[key] = prepared.row.memory
        by_memory.setdefault(key, []).append(position)
    groups = [RowGroup(memories[key], torch.tensor(positions)) for key, positions in by_memory.items()]
    return groups, list(by_memory.values())

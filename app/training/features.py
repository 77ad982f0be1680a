"""Training inputs prepared once per example: tokenised once, and the frozen layers below the memories
run once.

Below its first memory layer a task changes nothing (no memory, no LayerNorm copy, and the backbone's
dropout is off in training), so those layers give an example the same output in every epoch. Computing
it once, and starting each step's pass at the first memory layer (SpartanEncoder.forward_from), makes
the forward and the backward of every step cover the memory layers only. Families the encoder cannot
start mid-way (SpartanEncoder.resumable), and sets whose states would exceed the cache budget, take the
full forward instead: the same numbers, and their backward still stops at the first memory layer, as
nothing below it needs a gradient.

Tokenising and padding are the service's own (EncoderRunner), so training sees exactly the served inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.engine.encoder import RowGroup, SpartanEncoder
from app.engine.runner import EncoderRunner, PreparedRow, Row
from app.errors import InvalidInput
from app.spartan.memory import TaskMemory
from app.training.datasets import Example


class PreparedExamples:
    """Examples ready for a memory's training passes (positions index `examples`)."""

    def __init__(
        self,
        encoder: SpartanEncoder,
        memory: TaskMemory,
        examples: Sequence[Example],
        *,
        cache_bytes: int,
        batch_size: int = 64,
    ) -> None:
        self.encoder = encoder
        self.runner = EncoderRunner(encoder)
        self.start = encoder.resume_layer(memory.spec)  # the layers below it run once, here
        rows = [Row(memory, ex.text, ex.text_pair) for ex in examples]
        self.rows = self.runner.prepare(rows)
        for number, prepared in enumerate(self.rows):
            if prepared.error is not None:
                raise InvalidInput(f"example {number} cannot be tokenised: {prepared.error}")
        width = encoder.backbone.hidden_size * 4  # float32 states per token
        self.cached = (
            self.start > 0 and encoder.resumable() and sum(p.length for p in self.rows) * width <= cache_bytes
        )
        self.states: list[torch.Tensor] = self._lower_states(batch_size) if self.cached else []

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def cache_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states)

    def _lower_states(self, batch_size: int) -> list[torch.Tensor]:
        """Each example's input to layer `start` [tokens, H]: the bare backbone's layers below it,
        computed once (in length-sorted batches, so little goes to padding)."""
        states: list[torch.Tensor | None] = [None] * len(self.rows)
        for positions in _length_sorted(self.rows, batch_size):
            encoding = self.runner.pad([self.rows[i] for i in positions])
            hidden, _ = self.encoder.layer_input(encoding, self.start)
            real = encoding["attention_mask"].bool()
            for local, position in enumerate(positions):
                states[position] = hidden[local][real[local]].clone()  # a copy: the batch can go
        return [s for s in states if s is not None]

    def outputs(
        self, memory: TaskMemory, positions: Sequence[int], *, balance: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head outputs [len(positions), num_outputs] (and the load-balancing loss if asked for) of
        these examples, with gradients to the memory when autograd is on."""
        encoding = self.runner.pad([self.rows[i] for i in positions])
        mask = encoding["attention_mask"]
        groups = [RowGroup(memory, torch.arange(len(positions)))]
        if not self.cached:
            out = self.encoder.forward(encoding, groups, balance=balance)
        else:
            # This batch's own attention mask (and MPNet's position bias), as the encoder passes them
            # to every layer: the pass stops before layer 0, so only the embeddings run.
            _, call = self.encoder.layer_input(encoding, 0)
            first = self.states[positions[0]]
            hidden = first.new_zeros((*mask.shape, first.shape[-1]))
            hidden[mask.bool()] = torch.cat([self.states[i] for i in positions])
            out = self.encoder.forward_from(self.start, hidden, call, mask, groups, balance=balance)
        assert out.outputs[0] is not None
        return out.outputs[0], out.balance_loss

    def predict(self, memory: TaskMemory, batch_size: int = 64) -> torch.Tensor:
        """Head outputs of every example, in order, with the memory in eval mode."""
        was_training = memory.training
        memory.eval()
        result = torch.empty(len(self.rows), memory.spec.num_outputs)
        with torch.inference_mode():
            for positions in _length_sorted(self.rows, batch_size):
                result[positions] = self.outputs(memory, positions)[0].float()
        memory.train(was_training)
        return result


def _length_sorted(rows: Sequence[PreparedRow], size: int) -> list[list[int]]:
    order = sorted(range(len(rows)), key=lambda i: rows[i].length)
    return [order[start : start + size] for start in range(0, len(order), size)]

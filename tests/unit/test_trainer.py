"""Trainer helpers on the real backbone."""

from __future__ import annotations

import pytest
import torch
from parity import assert_f32_close

from app.engine.encoder import RowGroup
from app.spartan.memory import MemorySpec, TaskMemory
from app.training.datasets import Example
from app.training.trainer import predict_outputs


@pytest.mark.model
def test_predict_outputs_keeps_input_order_even_for_repeated_objects(minilm_encoder):
    backbone = minilm_encoder.backbone
    memory = TaskMemory(MemorySpec(num_layers=backbone.num_layers, hidden_size=backbone.hidden_size)).eval()
    short, long = Example("fine", "positive"), Example("a long and winding sentence about a film", "negative")
    examples = [long, short, long, short, short]  # the same objects twice; batches of 2 reorder by length
    outputs = predict_outputs(minilm_encoder, memory, examples, batch_size=2)
    with torch.inference_mode():
        alone = [
            minilm_encoder.forward(
                minilm_encoder.encode([ex.text], None, 128), [RowGroup(memory, torch.arange(1))]
            ).outputs[0][0]
            for ex in (long, short)
        ]
    for row, ex in enumerate(examples):
        assert_f32_close(outputs[row], alone[0 if ex is long else 1])

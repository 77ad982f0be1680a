"""Trainer helpers on the real backbone; training top-layer memories on cached lower layers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from parity import assert_f32_close

from app.engine.encoder import RowGroup
from app.spartan.memfile import load_memory, memory_to_bytes
from app.spartan.memory import MemorySpec, TaskMemory
from app.training.datasets import Example, TaskData
from app.training.features import PreparedExamples
from app.training.trainer import (
    TrainConfig,
    accumulate_step,
    few_shot_config,
    new_memory,
    predict_outputs,
    step_parts,
    train_memory,
)


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


# ------------------------------------------------ top-layer memories: cached lower layers, schedule

TEXTS = [
    "how do I reset my card pin?",
    "my transfer has not arrived yet, it has been three days",
    "why was I charged twice",
    "card declined",
    "can I change the currency of my account to euros before I travel next week",
    "what is the exchange rate",
    "lost card",
]


def toy_data() -> TaskData:
    labels = ("card", "transfer", "fees")
    train = [Example(text, labels[i % 3]) for i, text in enumerate(TEXTS * 3)]
    return TaskData("toy", "classification", labels, train, train[:5], train[:4])


@pytest.mark.model
@pytest.mark.parametrize("layernorm_layers", [None, 2])
def test_cached_lower_layers_give_the_full_forward_outputs_and_gradients(minilm_encoder, layernorm_layers):
    """Training's cached path (lower layers once per example, batches re-padded, the pass started at
    the resume layer) against the full forward on the same batch: logits and every gradient."""
    data = toy_data()
    config = TrainConfig(memory_layers=3, layernorm_layers=layernorm_layers)
    memory = new_memory(minilm_encoder, data, config).eval()  # eval: no dropout, same numbers twice
    assert memory.spec.first_memory_layer == 3
    prepared = PreparedExamples(minilm_encoder, memory, data.train, cache_bytes=1 << 30, batch_size=4)
    assert prepared.cached
    assert prepared.start == (3 if layernorm_layers is None else 4)
    assert prepared.cache_bytes > 0
    positions = [6, 0, 4, 9, 2]  # another composition and padding than the cached batches
    cached, _ = prepared.outputs(memory, positions)
    cached_grads = torch.autograd.grad(cached.sum(), list(memory.parameters()))
    batch = [data.train[i] for i in positions]
    encoding = minilm_encoder.encode([ex.text for ex in batch], None, memory.spec.max_length)
    full = minilm_encoder.forward(encoding, [RowGroup(memory, torch.arange(5))]).outputs[0]
    assert full is not None
    assert_f32_close(cached, full)
    for got, expected in zip(
        cached_grads, torch.autograd.grad(full.sum(), list(memory.parameters())), strict=True
    ):
        assert_f32_close(got, expected)
    assert_f32_close(
        prepared.predict(memory, batch_size=3), predict_outputs(minilm_encoder, memory, data.train)
    )
    # Over the cache budget: the full forward, the same numbers.
    uncached = PreparedExamples(minilm_encoder, memory, data.train, cache_bytes=0)
    assert not uncached.cached
    assert_f32_close(uncached.outputs(memory, positions)[0], full)


@pytest.mark.model
def test_training_top_layer_memories_touches_nothing_below_and_writes_a_valid_file(minilm_encoder):
    data = toy_data()
    config = TrainConfig(epochs=4, memory_layers=2, eval_every=2, batch_size=8, max_length=32)
    memory, report = train_memory(minilm_encoder, data, config, show_progress=False)
    assert memory.spec.first_memory_layer == 4
    assert [index for index, _ in memory.indexed_memory_layers()] == [4, 5]
    assert memory.spec.layernorm_names == minilm_encoder.layernorms_from(4)
    assert all(
        name.startswith(("encoder.layer.4.", "encoder.layer.5.")) for name in memory.spec.layernorm_names
    )
    assert [bool(r.dev) for r in report.epochs] == [False, True, False, True]  # dev after epochs 2 and 4
    assert report.best_epoch in (2, 4)
    assert report.cached_bytes > 0
    assert 0 < report.prepare_seconds <= report.seconds_to_best <= report.seconds_total
    assert report.seconds_to_best == report.epochs[report.best_epoch - 1].elapsed
    assert report.trainable_parameters == memory.num_parameters()
    loaded = load_memory(memory_to_bytes(memory), minilm_encoder.identity())
    assert loaded.spec.first_memory_layer == 4
    assert_f32_close(
        predict_outputs(minilm_encoder, loaded, data.test), predict_outputs(minilm_encoder, memory, data.test)
    )


@pytest.mark.model
def test_patience_stops_after_that_many_dev_scorings_without_a_new_best(minilm_encoder):
    data = toy_data()
    # lr 0: nothing changes, so no scoring after the first is a new best
    config = TrainConfig(epochs=6, lr=0.0, memory_layers=1, patience=2, batch_size=8, max_length=32)
    _, report = train_memory(minilm_encoder, replace(data, test=[]), config, show_progress=False)
    assert report.best_epoch == 1
    assert [r.epoch for r in report.epochs] == [1, 2, 3]


# ------------------------------------------------ a step in length-sorted micro-batches, bf16 autocast


def step_gradients(encoder, memory, data, config, positions) -> list[torch.Tensor]:
    prepared = PreparedExamples(encoder, memory, data.train, cache_bytes=1 << 30)
    for param in memory.parameters():
        param.grad = None
    loss = accumulate_step(prepared, memory, data, config, positions)
    assert loss > 0
    return [p.grad.clone() for p in memory.parameters() if p.requires_grad and p.grad is not None]


@pytest.mark.model
@pytest.mark.parametrize("memory_layers", [None, 3])  # the full forward, and cached lower layers
def test_a_step_cut_into_micro_batches_has_the_whole_batchs_gradient(minilm_encoder, memory_layers):
    """Rows of very different lengths: the planner cuts the step, and the gradients summed over the
    parts (each part's mean loss weighted by its rows) are the one padded pass's."""
    data = toy_data()
    one_pass = TrainConfig(memory_layers=memory_layers, step_overhead_tokens=None)
    cut = replace(one_pass, step_overhead_tokens=0)
    memory = new_memory(minilm_encoder, data, one_pass).eval()  # eval: no dropout, same numbers twice
    positions = [4, 3, 1, 0, 6, 2]  # 3-16 tokens
    prepared = PreparedExamples(minilm_encoder, memory, data.train, cache_bytes=1 << 30)
    parts = step_parts(prepared, positions, cut)
    assert len(parts) > 1
    assert sorted(i for part in parts for i in part) == sorted(positions)
    assert step_parts(prepared, positions, one_pass) == [positions]
    whole = step_gradients(minilm_encoder, memory, data, one_pass, positions)
    summed = step_gradients(minilm_encoder, memory, data, cut, positions)
    assert len(whole) == len(summed) == sum(p.requires_grad for p in memory.parameters())
    for got, expected in zip(summed, whole, strict=True):
        assert_f32_close(got, expected)


@pytest.mark.model
def test_bf16_steps_run_the_pass_in_bf16_with_gradients_close_to_float32(minilm_encoder):
    data = toy_data()
    fp32 = TrainConfig(memory_layers=3)
    memory = new_memory(minilm_encoder, data, fp32).eval()
    positions = [0, 1, 2, 3, 4, 5, 6, 7]
    exact = torch.cat([g.flatten() for g in step_gradients(minilm_encoder, memory, data, fp32, positions)])
    bf16 = replace(fp32, bf16_steps=True)
    rounded = torch.cat([g.flatten() for g in step_gradients(minilm_encoder, memory, data, bf16, positions)])
    assert not torch.equal(rounded, exact)  # autocast did run the matmuls in bf16 ...
    assert F.cosine_similarity(rounded, exact, dim=0) > 0.99  # ... and the step is the same step
    assert all(p.dtype == torch.float32 for p in memory.parameters())


def test_the_few_shot_recipe_cuts_its_steps_and_keeps_them_in_float32():
    recipe = few_shot_config(6)
    assert recipe.step_overhead_tokens is not None
    assert not recipe.bf16_steps  # 4x the memory for ~7% of the time (docs/RESULTS.md section 3c)

"""SpartanEncoder: memories after every layer of any encoder family, per-row tasks, per-row LayerNorms."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from parity import assert_f32_close
from transformers import (
    AutoModel,
    BertConfig,
    DistilBertConfig,
    MPNetConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

from app.engine.backbone import Backbone, find_layers, fingerprint, pool
from app.engine.encoder import LayerCall, RowGroup, SpartanEncoder
from app.spartan.memory import MemorySpec, TaskMemory

TEXTS = [
    "a gorgeous, witty and moving film",
    "dull",
    "the plot never quite comes together, though the cast tries hard",
    "how do I reset my card pin?",
    "stocks fell sharply after the bank raised interest rates",
]


def perturbed_memory(
    encoder: SpartanEncoder,
    seed: int,
    *,
    layernorm: bool = True,
    first: int = 0,
    layernorms_from: int | None = None,
    **spec_changes,
) -> TaskMemory:
    """A memory with weights large enough to change predictions (random init is near the identity);
    `first`: its first memory layer; LayerNorm copies in the layers from `layernorms_from` (default
    `first`) up."""
    backbone = encoder.backbone
    spec = MemorySpec(
        num_layers=backbone.num_layers,
        hidden_size=backbone.hidden_size,
        pooling=backbone.pooling,
        layernorm_names=encoder.layernorms_from(max(first, layernorms_from or 0)) if layernorm else (),
        labels=("a", "b", "c"),
        first_memory_layer=first,
    )
    memory = TaskMemory(replace(spec, **spec_changes))
    memory.init_layernorms(encoder.base_layernorms())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in memory.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    return memory.eval()


def run(encoder: SpartanEncoder, texts: list[str], groups: list[RowGroup], **kw) -> list[torch.Tensor]:
    with torch.inference_mode():
        out = encoder.forward(encoder.encode(texts, None, 128), groups, **kw)
    return [o for o in out.outputs if o is not None]


def alone(encoder: SpartanEncoder, memory: TaskMemory, text: str) -> torch.Tensor:
    return run(encoder, [text], [RowGroup(memory, torch.tensor([0]))])[0][0]


@pytest.mark.model
def test_mixed_batch_rows_equal_each_row_served_alone(minilm_encoder):
    first = perturbed_memory(minilm_encoder, 1)
    second = perturbed_memory(minilm_encoder, 2, layernorm=False, num_parents=8, num_children=2, top_k=3)
    third = perturbed_memory(minilm_encoder, 3, temperature=0.7)
    groups = [
        RowGroup(first, torch.tensor([0, 3])),
        RowGroup(second, torch.tensor([1])),
        RowGroup(third, torch.tensor([2, 4])),
    ]
    mixed = run(minilm_encoder, TEXTS, groups)
    for group, outputs in zip(groups, mixed, strict=True):
        for row, output in zip(group.rows.tolist(), outputs, strict=True):
            assert_f32_close(output, alone(minilm_encoder, group.memory, TEXTS[row]))
    # Single-task batch of the same rows: same numbers again.
    single = run(minilm_encoder, TEXTS, [RowGroup(first, torch.arange(5))])[0]
    assert_f32_close(single[[0, 3]], mixed[0])


@pytest.mark.model
def test_a_top_layers_task_in_a_mixed_batch_equals_it_served_alone(minilm_encoder):
    """A task with memories in layers 3-5 only, beside a task with memories in every layer: in one
    pass, sorted (slices) or scattered rows, each row gets what it gets alone."""
    full = perturbed_memory(minilm_encoder, 1)
    top = perturbed_memory(minilm_encoder, 2, first=3)
    for groups in (
        [RowGroup(full, torch.tensor([0, 1])), RowGroup(top, torch.tensor([2, 3, 4]))],
        [RowGroup(top, torch.tensor([0, 3])), RowGroup(full, torch.tensor([1, 2, 4]))],
    ):
        mixed = run(minilm_encoder, TEXTS, groups)
        for group, outputs in zip(groups, mixed, strict=True):
            for row, output in zip(group.rows.tolist(), outputs, strict=True):
                assert_f32_close(output, alone(minilm_encoder, group.memory, TEXTS[row]))
    with torch.inference_mode():
        encoding = minilm_encoder.encode(TEXTS, None, 128)
        out = minilm_encoder.forward(encoding, groups, record_routing=True)
    assert out.routing is not None
    assert [len(layers) for layers in out.routing] == [3, 6]  # top: layers 3, 4, 5 only


@pytest.mark.model
def test_a_top_layers_task_leaves_the_layers_below_its_first_memory_bare(minilm_encoder):
    top = perturbed_memory(minilm_encoder, 3, first=3)
    assert set(top.spec.layernorm_names) == {
        f"encoder.layer.{i}.{part}.LayerNorm" for i in (3, 4, 5) for part in ("attention.output", "output")
    }
    outputs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(
            lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out)
        )
        for layer in minilm_encoder.backbone.layers
    ]
    try:
        run(minilm_encoder, TEXTS, [RowGroup(None, torch.arange(5))])
        bare, outputs[:] = [o.clone() for o in outputs], []
        run(minilm_encoder, TEXTS, [RowGroup(top, torch.arange(5))])
    finally:
        for handle in handles:
            handle.remove()
    for index in range(3):
        assert torch.equal(outputs[index], bare[index]), index
    assert (outputs[3] - bare[3]).abs().max() > 1e-3


@pytest.mark.model
def test_memory_changes_the_backbone_and_zero_memory_is_the_identity(minilm_encoder):
    texts = TEXTS[:3]
    encoding = minilm_encoder.encode(texts, None, 128)
    with torch.inference_mode():
        bare = minilm_encoder.forward(encoding, [RowGroup(None, torch.arange(3))]).pooled
        raw = minilm_encoder.backbone.model(**encoding).last_hidden_state
    assert_f32_close(bare, pool(raw, encoding["attention_mask"], "mean"))
    memory = perturbed_memory(minilm_encoder, 4, layernorm=False)
    with torch.no_grad():
        for layer in memory.memory_layers():
            layer.child_values.zero_()
    with torch.inference_mode():
        zero = minilm_encoder.forward(encoding, [RowGroup(memory, torch.arange(3))]).pooled
        active = minilm_encoder.forward(
            encoding, [RowGroup(perturbed_memory(minilm_encoder, 5), torch.arange(3))]
        )
    assert_f32_close(zero, bare)
    assert (active.pooled - bare).abs().max() > 1e-2


@pytest.mark.model
def test_task_layernorm_is_applied_per_row(minilm_encoder):
    plain = perturbed_memory(minilm_encoder, 6, layernorm=False)
    with_ln = copy.deepcopy(plain)
    with_ln.spec = replace(plain.spec, layernorm_names=tuple(minilm_encoder.layernorm_names))
    with_ln.init_layernorms(minilm_encoder.base_layernorms())
    with torch.no_grad():
        for param in with_ln.layernorms.parameters():
            param.mul_(1.3)
    mixed = run(
        minilm_encoder, TEXTS[:2], [RowGroup(plain, torch.tensor([0])), RowGroup(with_ln, torch.tensor([1]))]
    )
    assert_f32_close(mixed[0][0], alone(minilm_encoder, plain, TEXTS[0]))
    assert_f32_close(mixed[1][0], alone(minilm_encoder, with_ln, TEXTS[1]))
    assert (
        alone(minilm_encoder, with_ln, TEXTS[1]) - alone(minilm_encoder, plain, TEXTS[1])
    ).abs().max() > 1e-3


@pytest.mark.model
def test_routing_is_recorded_for_every_layer(minilm_encoder):
    memory = perturbed_memory(minilm_encoder, 7)
    encoding = minilm_encoder.encode(TEXTS[:2], None, 128)
    with torch.inference_mode():
        out = minilm_encoder.forward(encoding, [RowGroup(memory, torch.arange(2))], record_routing=True)
    assert out.routing is not None
    routing = out.routing[0]
    assert len(routing) == minilm_encoder.backbone.num_layers
    seq = encoding["input_ids"].shape[1]
    assert all(r.shape == (2, seq, memory.spec.top_k) for r in routing)
    assert all(int(r.max()) < memory.spec.num_parents for r in routing)


@pytest.mark.model
def test_training_reaches_only_the_memory(minilm_encoder):
    memory = perturbed_memory(minilm_encoder, 8).train()
    out = minilm_encoder.forward(
        minilm_encoder.encode(TEXTS, None, 64), [RowGroup(memory, torch.arange(5))], balance=True
    )
    assert out.outputs[0] is not None
    assert out.balance_loss is not None
    (out.outputs[0].sum() + out.balance_loss).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in memory.parameters())
    assert all(p.grad is None for p in minilm_encoder.backbone.model.parameters())


@pytest.mark.model
def test_text_pairs_are_tokenised_as_pairs(minilm_encoder):
    encoding = minilm_encoder.encode(["what is my balance"], ["show account balance"], 128)
    ids = encoding["input_ids"][0].tolist()
    sep = minilm_encoder.backbone.tokenizer.sep_token_id
    assert ids.count(sep) == 2
    assert set(encoding["token_type_ids"][0].tolist()) == {0, 1}


@pytest.mark.model
def test_fingerprint_is_stable_and_sensitive(minilm_encoder):
    model = minilm_encoder.backbone.model
    assert minilm_encoder.backbone.fingerprint == minilm_encoder.identity().fingerprint
    clone = copy.deepcopy(model)
    before = fingerprint(clone)
    with torch.no_grad():
        next(clone.parameters()).view(-1)[0] += 1e-3
    assert fingerprint(clone) != before


# ------------------------------------------------------------------ every encoder family (tiny random)

SMALL = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64}
FAMILIES = {
    "bert": BertConfig(vocab_size=120, **SMALL),
    "roberta": RobertaConfig(vocab_size=120, pad_token_id=1, **SMALL),
    "xlm-roberta": XLMRobertaConfig(vocab_size=120, pad_token_id=1, **SMALL),
    "mpnet": MPNetConfig(vocab_size=120, pad_token_id=1, **SMALL),
    "distilbert": DistilBertConfig(vocab_size=120, dim=32, n_layers=3, n_heads=4, hidden_dim=64),
}


def tiny_backbone(family: str) -> Backbone:
    torch.manual_seed(0)
    model = AutoModel.from_config(FAMILIES[family]).eval().requires_grad_(False)
    layers = find_layers(model, 3)
    # Plumbing only: these tests feed token ids directly, so no tokenizer is needed.
    return Backbone(family, model, None, layers, "first", fingerprint(model))  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["bert", "mpnet"])
@pytest.mark.parametrize("layernorms_from", [1, 2])
def test_a_pass_started_at_a_layer_equals_the_full_forward(family, layernorms_from):
    """What training does (features.py): each row's input to the task's resume layer computed alone,
    re-padded into a batch, the batch's own mask (MPNet: and position bias) from a pass stopped at
    layer 0, then the layers from there on: the full forward's outputs and gradients, to float32
    rounding. Memories from layer 1; LayerNorm copies from layer 1 (the pass starts at layer 1) or
    from layer 2 (it starts at layer 2, layer 1's memory applied to the cached states)."""
    encoder = SpartanEncoder(tiny_backbone(family))
    assert encoder.resumable()
    memory = perturbed_memory(encoder, 11, first=1, layernorms_from=layernorms_from, labels=("x", "y"))
    start = encoder.resume_layer(memory.spec)
    assert start == layernorms_from
    ids = torch.randint(5, 100, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 6 + [0]])
    ids[mask == 0] = 1  # the pad token
    encoding = {"input_ids": ids, "attention_mask": mask}
    groups = [RowGroup(memory, torch.arange(3))]
    full = encoder.forward(encoding, groups)
    assert full.outputs[0] is not None
    full_grads = torch.autograd.grad(full.outputs[0].sum(), list(memory.parameters()))
    hidden = torch.zeros(3, 7, encoder.backbone.hidden_size)
    for row in range(3):
        length = int(mask[row].sum())
        alone = {"input_ids": ids[row : row + 1, :length], "attention_mask": mask[row : row + 1, :length]}
        states, _ = encoder.layer_input(alone, start)
        hidden[row, :length] = states[0]
    cached = hidden.clone()
    _, call = encoder.layer_input(encoding, 0)
    started = encoder.forward_from(start, hidden, call, mask, groups)
    assert started.outputs[0] is not None
    assert_f32_close(started.outputs[0], full.outputs[0])
    grads = torch.autograd.grad(started.outputs[0].sum(), list(memory.parameters()))
    for got, expected in zip(grads, full_grads, strict=True):
        assert_f32_close(got, expected)
    with torch.inference_mode():  # serving's in-place updates leave the cached states alone
        encoder.forward_from(start, hidden, call, mask, groups)
    assert torch.equal(hidden, cached)
    with pytest.raises(ValueError, match=f"changes layer {start - 1} or one below it"):
        encoder.forward_from(
            start, hidden, call, mask, [RowGroup(perturbed_memory(encoder, 12), torch.arange(3))]
        )


def test_families_that_cannot_start_mid_way_say_so():
    encoder = SpartanEncoder(tiny_backbone("distilbert"))
    assert not encoder.resumable()
    with pytest.raises(ValueError, match="does not support"):
        encoder.forward_from(1, torch.zeros(1, 2, 32), LayerCall((), {}), torch.ones(1, 2), [])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_memories_go_after_every_layer_of_every_family(family):
    backbone = tiny_backbone(family)
    reference = copy.deepcopy(backbone.model)
    encoder = SpartanEncoder(backbone)
    assert len(encoder._handles) == 3
    ids = torch.randint(5, 100, (2, 7))
    encoding = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        expected = reference(**encoding).last_hidden_state[:, 0]
        bare = encoder.forward(encoding, [RowGroup(None, torch.arange(2))]).pooled
    # Wrapping the LayerNorms and hooking the layers changes nothing by itself.
    assert_f32_close(bare, expected)
    memory = perturbed_memory(encoder, 9, labels=("x", "y"))
    with torch.inference_mode():
        out = encoder.forward(encoding, [RowGroup(memory, torch.arange(2))], record_routing=True)
    assert out.routing is not None
    assert len(out.routing[0]) == 3
    assert (out.pooled - bare).abs().max() > 1e-3
    assert out.outputs[0] is not None
    assert out.outputs[0].shape == (2, 2)
    assert len(encoder.layernorm_names) >= 2 * 3

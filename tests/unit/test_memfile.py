"""Memory files: round trip, and a precise error for every way a file can be wrong."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import struct

import pytest
import torch
from safetensors.torch import save as save_safetensors
from tiny_memories import BACKBONE, make_memory

from app.errors import BackboneMismatch, MemoryInvalid, PoolingMismatch
from app.spartan.memfile import (
    BackboneIdentity,
    load_memory,
    load_memory_file,
    memory_tensors,
    memory_to_bytes,
    save_memory,
    spec_metadata,
)
from app.spartan.memory import TaskMemory


def rebuild(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    return save_safetensors(tensors, metadata=metadata)


def parts(memory: TaskMemory | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    memory = memory or make_memory()
    return memory_tensors(memory), spec_metadata(memory.spec)


def test_round_trip_keeps_every_tensor_and_the_spec(tmp_path):
    memory = make_memory()
    version = save_memory(memory, tmp_path / "task.safetensors")
    loaded = load_memory_file(tmp_path / "task.safetensors", BACKBONE)
    assert loaded.version == version
    assert loaded.spec == memory.spec
    assert loaded.spec.training == {"dataset": "unit"}
    for name, tensor in memory_tensors(memory).items():
        assert torch.equal(memory_tensors(loaded)[name], tensor), name
    assert not any(p.requires_grad for p in loaded.parameters())
    assert list(tmp_path.iterdir()) == [tmp_path / "task.safetensors"]  # no temp file left behind


def test_loading_builds_no_random_memory_first():
    """A load assigns the file's tensors to modules made on the meta device: no random init runs (it
    would draw from the global generator), and the parameters are real tensors on the CPU."""
    data = memory_to_bytes(make_memory())
    before = torch.random.get_rng_state()
    loaded = load_memory(data, BACKBONE)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_regression_memory_has_one_output():
    memory = make_memory(task_type="regression", labels=())
    loaded = load_memory(memory_to_bytes(memory), BACKBONE)
    assert loaded.head.out.out_features == 1


def expect_invalid(
    data: bytes,
    *fragments: str,
    error: type[Exception] = MemoryInvalid,
    backbone: BackboneIdentity = BACKBONE,
) -> None:
    with pytest.raises(error) as caught:
        load_memory(data, backbone)
    for fragment in fragments:
        assert fragment in str(caught.value), f"{fragment!r} not in {caught.value!s}"


def test_empty_file():
    expect_invalid(b"", "empty file")


def test_random_bytes_are_not_safetensors():
    expect_invalid(bytes(range(256)) * 4, "not a safetensors")


def test_pickle_is_refused_without_unpickling():
    expect_invalid(pickle.dumps({"layers": [1, 2, 3]}), "pickle")


def test_torch_save_zip_is_refused(tmp_path):
    torch.save({"x": torch.zeros(2)}, tmp_path / "m.pt")
    expect_invalid((tmp_path / "m.pt").read_bytes(), "pickle")


def test_header_shorter_than_declared():
    expect_invalid(struct.pack("<Q", 500) + b"{}", "truncated", "500")


def test_huge_declared_header():
    expect_invalid(struct.pack("<Q", 1 << 40) + b"{}", "header declares")


def test_header_not_json():
    expect_invalid(struct.pack("<Q", 4) + b"nope", "not valid JSON")


def test_truncated_data():
    data = memory_to_bytes(make_memory())
    expect_invalid(data[:-100], "truncated")


def test_header_offsets_that_lie():
    tensors, metadata = parts()
    data = rebuild(tensors, metadata)
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    header["head.out.bias"]["data_offsets"][1] += 4
    blob = json.dumps(header).encode()
    expect_invalid(struct.pack("<Q", len(blob)) + blob + data[8 + size :], "head.out.bias", "data_offsets")


def test_not_a_spartan_file():
    expect_invalid(rebuild({"x": torch.zeros(2)}, {"format": "pt"}), "format")
    expect_invalid(rebuild({"x": torch.zeros(2)}, {}), "format=None")


def test_unsupported_format_version():
    tensors, metadata = parts()
    expect_invalid(rebuild(tensors, {**metadata, "format_version": "99"}), "unsupported format version '99'")


def test_missing_metadata_field():
    tensors, metadata = parts()
    del metadata["top_k"]
    expect_invalid(rebuild(tensors, metadata), "metadata lacks top_k")


def test_bad_metadata_values():
    tensors, metadata = parts()
    expect_invalid(rebuild(tensors, {**metadata, "top_k": "9"}), "top_k=9 is out of range")
    expect_invalid(rebuild(tensors, {**metadata, "num_layers": "two"}), "num_layers='two' is not an integer")
    expect_invalid(rebuild(tensors, {**metadata, "temperature": "nan"}), "temperature")
    expect_invalid(rebuild(tensors, {**metadata, "labels": "[1, 2]"}), "labels")
    expect_invalid(rebuild(tensors, {**metadata, "pooling": "max"}), "pooling='max'")


def test_missing_tensor():
    tensors, metadata = parts()
    del tensors["layers.1.child_values"]
    expect_invalid(rebuild(tensors, metadata), "missing tensors: layers.1.child_values")


def test_extra_tensor():
    tensors, metadata = parts()
    tensors["layers.2.parent_keys"] = torch.zeros(4, 8)
    expect_invalid(rebuild(tensors, metadata), "unexpected tensors: layers.2.parent_keys")


def test_wrong_shape_says_expected_and_found():
    tensors, metadata = parts()
    tensors["layers.0.child_keys"] = torch.zeros(4, 2, 7)
    expect_invalid(
        rebuild(tensors, metadata), "layers.0.child_keys", "expected shape [4, 2, 8]", "found [4, 2, 7]"
    )


def test_head_size_must_match_labels():
    tensors, metadata = parts()
    expect_invalid(rebuild(tensors, {**metadata, "labels": '["a", "b"]'}), "head.out", "expected shape [2")


def test_wrong_dtype():
    tensors, metadata = parts()
    tensors["head.dense.bias"] = tensors["head.dense.bias"].double()
    expect_invalid(rebuild(tensors, metadata), "head.dense.bias", "expected dtype F32, found F64")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(bad):
    tensors, metadata = parts()
    tensors["layers.1.parent_keys"][0, 0] = bad
    expect_invalid(rebuild(tensors, metadata), "layers.1.parent_keys has 1 non-finite")


def test_wrong_backbone_fingerprint():
    memory = make_memory(backbone_fingerprint="0" * 64, backbone_id="other-model")
    expect_invalid(memory_to_bytes(memory), "other-model", "tiny", error=BackboneMismatch)


def test_wrong_backbone_shape():
    expect_invalid(memory_to_bytes(make_memory(num_layers=3)), "3 layers", error=BackboneMismatch)


def test_unknown_layernorm_name():
    memory = make_memory(layernorm_names=("no.such.LayerNorm",))
    expect_invalid(memory_to_bytes(memory), "no.such.LayerNorm", error=BackboneMismatch)


def test_validation_without_backbone_still_checks_structure():
    memory = make_memory(backbone_fingerprint="0" * 64)
    assert load_memory(memory_to_bytes(memory)).spec.backbone_fingerprint == "0" * 64


@pytest.mark.parametrize(
    ("label", "code"),
    [
        ("positive\u202e", "U+202E"),  # right-to-left override: reorders what follows when printed
        ("pos\u200bitive", "U+200B"),  # zero-width space: looks like "positive", compares unequal
        ("\u2066negative", "U+2066"),  # left-to-right isolate
        ("\ufeffneutral", "U+FEFF"),  # byte order mark
        ("line\u2028break", "U+2028"),  # line separator
        ("para\u2029break", "U+2029"),  # paragraph separator
        ("private\ue000", "U+E000"),  # private use
        ("unassigned\U000e0080", "U+E0080"),
    ],
)
def test_labels_with_invisible_or_format_characters_are_refused(label: str, code: str) -> None:
    tensors, metadata = parts()
    metadata["labels"] = json.dumps(["neg", label, "neutral"])
    with pytest.raises(MemoryInvalid, match=f"label 1 .*invisible character .*{re.escape(code)}"):
        load_memory(rebuild(tensors, metadata), BACKBONE)


def test_labels_in_any_script_are_still_accepted() -> None:
    labels = ("négatif", "正面", "нейтральный")  # letters of any script, accents, CJK: fine
    memory = load_memory(memory_to_bytes(make_memory(labels=labels)), BACKBONE)
    assert memory.spec.labels == labels


F32_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize(
    ("tensor", "value"),
    [
        ("head.out.weight", F32_MAX / 4),  # the logits overflow: the task would answer "score": null
        ("head.out.weight", F32_MAX / 6),  # finite on the probe, overflows on some other input
        ("head.dense.weight", F32_MAX / 2),
        ("layers.1.child_values", F32_MAX / 8),  # the layer's update overflows the hidden state
        ("layers.0.parent_keys", F32_MAX / 2),  # routing logits overflow: softmax NaN
        ("layernorm.embeddings.LayerNorm.weight", F32_MAX / 2),
        ("layernorm.encoder.layer.0.output.LayerNorm.bias", 1e25),  # finite, but the next norm overflows
    ],
)
def test_finite_but_huge_values_are_refused_by_the_probe(tensor: str, value: float) -> None:
    tensors, metadata = parts()
    tensors[tensor] = torch.full_like(tensors[tensor], value)
    with pytest.raises(MemoryInvalid, match=rf"non-finite outputs.*in tensor {re.escape(tensor)}"):
        load_memory(rebuild(tensors, metadata), BACKBONE)


def test_large_but_sane_values_pass_the_probe() -> None:
    tensors, metadata = parts()
    tensors["head.out.weight"] = tensors["head.out.weight"] * 1e4  # confident, not broken
    tensors["layers.0.child_values"] = tensors["layers.0.child_values"] * 1e3
    assert load_memory(rebuild(tensors, metadata), BACKBONE).spec.num_layers == 2


def test_a_memory_trained_with_another_pooling_is_refused() -> None:
    first = memory_to_bytes(make_memory(pooling="first"))
    mean_backbone = dataclasses.replace(BACKBONE, pooling="mean")
    with pytest.raises(
        PoolingMismatch, match="trained with 'first' pooling, this backbone pools with 'mean'"
    ):
        load_memory(first, mean_backbone)
    assert load_memory(first, dataclasses.replace(BACKBONE, pooling="first")).spec.pooling == "first"
    assert load_memory(first, BACKBONE).spec.pooling == "first"  # pooling unknown: not checked


# ---------------------------------------------------------------- memories in the top layers only

TOP_LN = ("encoder.layer.1.output.LayerNorm",)
LAYERED = dataclasses.replace(
    BACKBONE,
    layernorm_names=(*BACKBONE.layernorm_names, *TOP_LN),
    layernorm_layers=(("embeddings.LayerNorm", -1), ("encoder.layer.0.output.LayerNorm", 0), (TOP_LN[0], 1)),
)


def test_a_top_layers_memory_round_trips_with_only_its_layers_tensors():
    memory = make_memory(first_memory_layer=1, layernorm_names=TOP_LN)
    data = memory_to_bytes(memory)
    loaded = load_memory(data, LAYERED)
    assert loaded.spec == memory.spec
    assert loaded.spec.first_memory_layer == 1
    assert [index for index, _ in loaded.indexed_memory_layers()] == [1]
    assert loaded.memory_at(0) is None
    names = set(memory_tensors(loaded))
    assert {"layers.1.parent_keys", "layers.1.child_keys", "layers.1.child_values"} <= names
    assert not any(name.startswith("layers.0.") for name in names)
    for name, tensor in memory_tensors(memory).items():
        assert torch.equal(memory_tensors(loaded)[name], tensor), name
    assert spec_metadata(memory.spec)["first_memory_layer"] == "1"
    # Resident bytes count the one memory layer, not a placeholder for the other.
    assert loaded.resident_bytes() < make_memory(layernorm_names=TOP_LN).resident_bytes()


def test_a_memory_in_every_layer_is_written_as_before_and_old_files_mean_every_layer():
    memory = make_memory()
    assert "first_memory_layer" not in spec_metadata(memory.spec)  # the file is what it always was
    loaded = load_memory(memory_to_bytes(memory), BACKBONE)
    assert loaded.spec.first_memory_layer == 0
    assert [index for index, _ in loaded.indexed_memory_layers()] == [0, 1]


def test_first_memory_layer_out_of_range_or_not_an_integer_is_refused():
    tensors, metadata = parts(make_memory(first_memory_layer=1, layernorm_names=TOP_LN))
    for bad, message in (("2", "first_memory_layer=2 is out of range [0, 1]"),
                         ("-1", "first_memory_layer=-1 is out of range"),
                         ("one", "first_memory_layer='one' is not an integer")):  # fmt: skip
        expect_invalid(rebuild(tensors, {**metadata, "first_memory_layer": bad}), message, backbone=LAYERED)


def test_a_top_layers_file_must_hold_exactly_its_layers_tensors():
    tensors, metadata = parts(make_memory(first_memory_layer=1, layernorm_names=TOP_LN))
    expect_invalid(
        rebuild({**tensors, "layers.0.parent_keys": torch.zeros(4, 8)}, metadata),
        "unexpected tensors: layers.0.parent_keys",
        backbone=LAYERED,
    )
    full_tensors, _ = parts(make_memory(layernorm_names=TOP_LN))
    old_reader = {k: v for k, v in metadata.items() if k != "first_memory_layer"}
    expect_invalid(rebuild(tensors, old_reader), "missing tensors: layers.0.", backbone=LAYERED)
    expect_invalid(rebuild(full_tensors, metadata), "unexpected tensors: layers.0.", backbone=LAYERED)


def test_a_top_layers_memory_may_not_carry_layernorms_below_its_first_memory_layer():
    memory = make_memory(first_memory_layer=1)  # carries the embeddings' and layer 0's LayerNorms
    expect_invalid(
        memory_to_bytes(memory),
        "from layer 1 up",
        "embeddings.LayerNorm",
        "encoder.layer.0.output.LayerNorm",
        backbone=LAYERED,
    )
    # Without the backbone's layer map (an older identity) the placement is not checked.
    assert load_memory(memory_to_bytes(memory), BACKBONE).spec.first_memory_layer == 1

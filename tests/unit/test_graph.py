"""The compiled serving graph (app/engine/graph.py) against the eager path it replaces: the same numbers
at fp32 for every mix of rows the service builds, bf16 close to fp32, and a fallback that is taken."""

from __future__ import annotations

import concurrent.futures
import copy
import os
import threading
from pathlib import Path

import pytest
import torch
from parity import assert_f32_close
from test_encoder import FAMILIES, TEXTS, perturbed_memory, tiny_backbone

from app.engine.backbone import Backbone, load_backbone
from app.engine.encoder import EncoderOutput, RowGroup, SpartanEncoder
from app.engine.graph import GraphShape, MemoryGraph, try_memory_graph
from app.engine.serving import available_cpus, engine_streams, pass_threads, serving_encoder
from app.errors import BackboneError
from app.spartan.memory import MemorySpec, TaskMemory

pytest.importorskip("openvino")

DEFAULT_SHAPE = GraphShape.of(MemorySpec(num_layers=6, hidden_size=384))


def graph_encoder(
    backbone: Backbone, copy_for_graph: Backbone, precision: str = "fp32", **kw
) -> SpartanEncoder:
    encoder = SpartanEncoder(backbone)
    encoder.graph = try_memory_graph(
        copy_for_graph,
        encoder.layernorm_names,
        precision=precision,
        threads=1,
        required=True,
        **kw,  # type: ignore[arg-type]
    )
    return encoder


@pytest.fixture(scope="module")
def minilm_graph_fp32(cache_dir: Path) -> SpartanEncoder:
    fp32 = load_backbone("all-MiniLM-L6-v2", cache_dir)
    return graph_encoder(fp32, load_backbone("all-MiniLM-L6-v2", cache_dir))


def forward(encoder: SpartanEncoder, texts: list[str], groups: list[RowGroup]) -> EncoderOutput:
    with torch.inference_mode():
        return encoder.forward(encoder.encode(texts, None, 128), groups, record_routing=True)


def mixed_groups(eager: SpartanEncoder) -> list[list[RowGroup]]:
    """The rows the service builds: tasks sorted into slices, scattered rows, a task with memories in
    the top layers only and LayerNorm copies there, one without LayerNorm copies, and bare rows."""
    full = perturbed_memory(eager, 1)
    top = perturbed_memory(eager, 2, first=3)
    plain = perturbed_memory(eager, 3, layernorm=False, temperature=0.7)
    return [
        [RowGroup(full, torch.arange(5))],
        [
            RowGroup(full, torch.tensor([0, 1])),
            RowGroup(top, torch.tensor([2, 3])),
            RowGroup(None, torch.tensor([4])),
        ],
        [
            RowGroup(plain, torch.tensor([0, 3])),
            RowGroup(full, torch.tensor([1])),
            RowGroup(top, torch.tensor([2, 4])),
        ],
    ]


def same_parents(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of (token, layer) whose chosen parent *sets* agree (top-k order within a set is free)."""
    return float((a.sort(-1).values == b.sort(-1).values).all(-1).float().mean())


@pytest.mark.model
def test_fp32_graph_equals_the_eager_pass_for_every_mix_of_rows(minilm_encoder, minilm_graph_fp32):
    assert minilm_graph_fp32.graph is not None
    for groups in mixed_groups(minilm_encoder):
        expected = forward(minilm_encoder, TEXTS, groups)
        actual = forward(minilm_graph_fp32, TEXTS, groups)
        assert_f32_close(actual.pooled, expected.pooled)
        for number, group in enumerate(groups):
            if group.memory is None:
                continue
            assert_f32_close(actual.outputs[number], expected.outputs[number])
            assert actual.routing is not None
            assert expected.routing is not None
            layers = list(group.memory.spec.memory_layer_indices)
            assert len(actual.routing[number]) == len(layers)
            for got, want in zip(actual.routing[number], expected.routing[number], strict=True):
                assert got.shape == want.shape
                # Equal unless two parents' logits tie within rounding (none should at these weights).
                assert same_parents(got, want) > 0.99


@pytest.mark.model
def test_graph_shapes_are_dynamic_one_row_to_a_padded_batch(minilm_encoder, minilm_graph_fp32):
    memory = perturbed_memory(minilm_encoder, 4)
    for texts in ([TEXTS[1]], TEXTS * 3, [" ".join(TEXTS * 4)]):
        groups = [RowGroup(memory, torch.arange(len(texts)))]
        expected = forward(minilm_encoder, texts, groups).outputs[0]
        assert_f32_close(forward(minilm_graph_fp32, texts, groups).outputs[0], expected)


@pytest.mark.model
def test_a_memory_of_another_shape_runs_the_whole_pass_eagerly(minilm_encoder, minilm_graph_fp32):
    other = perturbed_memory(minilm_encoder, 5, num_parents=8, num_children=2, top_k=3)
    usual = perturbed_memory(minilm_encoder, 6)
    assert minilm_graph_fp32.graph is not None
    assert not minilm_graph_fp32.graph.accepts([usual, other])
    groups = [RowGroup(usual, torch.tensor([0, 1])), RowGroup(other, torch.tensor([2, 3, 4]))]
    expected = forward(minilm_encoder, TEXTS, groups)
    actual = forward(minilm_graph_fp32, TEXTS, groups)
    for number in range(2):  # the same eager computation: equal to the bit
        assert torch.equal(actual.outputs[number], expected.outputs[number])


@pytest.mark.model
def test_training_never_runs_on_the_graph(minilm_graph_fp32):
    memory = perturbed_memory(minilm_graph_fp32, 7)
    memory.train()
    encoding = minilm_graph_fp32.encode(TEXTS[:2], None, 32)
    out = minilm_graph_fp32.forward(encoding, [RowGroup(memory, torch.arange(2))], balance=True)
    assert out.balance_loss is not None  # the eager path: the graph computes no balance loss
    out.outputs[0].sum().backward()
    assert memory.memory_at(0).parent_keys.grad is not None


@pytest.mark.model
def test_bf16_graph_stays_close_to_fp32(cache_dir, minilm_encoder):
    bf16 = graph_encoder(
        load_backbone("all-MiniLM-L6-v2", cache_dir, precision="bf16"),
        load_backbone("all-MiniLM-L6-v2", cache_dir),
        precision="bf16",
    )
    memory = perturbed_memory(minilm_encoder, 8)
    groups = [RowGroup(memory, torch.tensor([0, 1, 2])), RowGroup(None, torch.tensor([3, 4]))]
    expected = forward(minilm_encoder, TEXTS, groups)
    actual = forward(bf16, TEXTS, groups)
    cosine = torch.nn.functional.cosine_similarity(actual.pooled, expected.pooled)
    assert float(cosine.min()) > 0.999
    assert actual.outputs[0] is not None
    assert expected.outputs[0] is not None
    assert torch.equal(actual.outputs[0].argmax(-1), expected.outputs[0].argmax(-1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_the_graph_builds_for_gives_the_eager_numbers(family):
    """Tiny random encoders of each family: where OpenVINO converts it, the graph's pass equals the
    eager one; where it cannot, `try_memory_graph` says so with None and the eager path serves."""
    eager = SpartanEncoder(tiny_backbone(family))
    encoder = SpartanEncoder(tiny_backbone(family))
    encoder.graph = try_memory_graph(
        tiny_backbone(family), encoder.layernorm_names, precision="fp32", threads=1, required=False
    )
    if family in ("bert", "roberta", "xlm-roberta", "mpnet", "distilbert"):
        assert encoder.graph is not None, f"{family} should convert"
    memory = perturbed_memory(eager, 9, labels=("x", "y"))
    ids = torch.randint(5, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    encoding = {"input_ids": ids, "attention_mask": mask}
    groups = [RowGroup(memory, torch.tensor([0, 2])), RowGroup(None, torch.tensor([1]))]
    with torch.inference_mode():
        expected = eager.forward(encoding, groups)
        actual = encoder.forward(encoding, groups)
    assert_f32_close(actual.outputs[0], expected.outputs[0])
    assert_f32_close(actual.pooled, expected.pooled)


def tiny_graph(cache_dir: Path, **kw: object) -> MemoryGraph:
    """A graph of the tiny random BERT, cached in `cache_dir`."""
    names = SpartanEncoder(tiny_backbone("bert")).layernorm_names
    return MemoryGraph(
        tiny_backbone("bert"),
        names,
        DEFAULT_SHAPE,
        precision="fp32",
        threads=1,
        cache_dir=cache_dir,
        **kw,  # type: ignore[arg-type]
    )


def test_the_converted_graph_is_cached_and_reused(tmp_path, monkeypatch):
    first = tiny_graph(tmp_path)
    assert len(list(tmp_path.glob("*/graph.xml"))) == 1

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again although the cache holds the graph")

    def no_copy() -> Backbone:
        raise AssertionError("loaded an fp32 copy although the cache holds the graph")

    monkeypatch.setattr(MemoryGraph, "_convert", no_conversion)
    second = tiny_graph(tmp_path, fp32_source=no_copy)
    ids = torch.randint(5, 100, (2, 6))
    encoding = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    row_task = torch.zeros(2, dtype=torch.long)
    assert torch.equal(first.run(encoding, [None], row_task)[0], second.run(encoding, [None], row_task)[0])
    assert not list(tmp_path.glob(".partial-*"))


def test_a_damaged_cache_entry_is_converted_again_and_replaced(tmp_path):
    tiny_graph(tmp_path)
    (entry,) = tmp_path.glob("*/graph.xml")
    (entry.parent / "layernorms.npz").unlink()  # e.g. a start killed mid-way by an older build
    graph = tiny_graph(tmp_path)
    assert (entry.parent / "layernorms.npz").exists()
    ids = torch.randint(5, 100, (1, 4))
    hidden, _ = graph.run(
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [None], torch.zeros(1).long()
    )
    assert torch.isfinite(hidden).all()


def test_a_graph_that_cannot_be_built_falls_back_unless_required(
    monkeypatch, caplog, settings_for, tiny_backbone_dir, tmp_path
):
    def broken(*args: object) -> None:
        raise RuntimeError("this family does not convert")

    monkeypatch.setattr(MemoryGraph, "_convert", broken)
    settings = settings_for(cache_dir=tmp_path, backbone=str(tiny_backbone_dir), runtime="auto")
    assert serving_encoder(settings).graph is None
    assert "serving on torch eager" in caplog.text
    with pytest.raises(BackboneError, match="does not convert"):
        serving_encoder(settings_for(cache_dir=tmp_path, backbone=str(tiny_backbone_dir), runtime="openvino"))
    assert (
        serving_encoder(
            settings_for(cache_dir=tmp_path, backbone=str(tiny_backbone_dir), runtime="torch")
        ).graph
        is None
    )


def test_the_serving_encoder_serves_on_the_graph_by_default(settings_for, tiny_backbone_dir, tmp_path):
    settings = settings_for(cache_dir=tmp_path, backbone=str(tiny_backbone_dir), precision="fp32")
    assert settings.runtime == "auto"
    encoder = serving_encoder(settings)
    assert encoder.graph is not None
    memory = TaskMemory(
        MemorySpec(num_layers=encoder.backbone.num_layers, hidden_size=encoder.backbone.hidden_size)
    )
    assert encoder.graph.accepts([memory, None])
    eager = copy.copy(encoder)
    eager.graph = None
    encoding = encoder.encode(["a b c", "d"], None, 16)
    groups = [RowGroup(memory.eval(), torch.tensor([0])), RowGroup(None, torch.tensor([1]))]
    with torch.inference_mode():
        assert_f32_close(encoder.forward(encoding, groups).pooled, eager.forward(encoding, groups).pooled)


def test_streams_run_passes_side_by_side_each_with_its_own_result():
    """Two streams: passes from four threads at once (two in flight, two waiting for a free stream)
    each get the result of the same pass run alone. A stream whose buffers another pass shared would
    hand rows of one caller another caller's states."""
    eager = SpartanEncoder(tiny_backbone("bert"))
    encoder = graph_encoder(tiny_backbone("bert"), tiny_backbone("bert"), streams=2)
    assert encoder.graph is not None
    assert encoder.concurrent_passes == 2
    memories = [perturbed_memory(eager, seed) for seed in range(4)]
    generator = torch.Generator().manual_seed(3)
    passes = []
    for number, memory in enumerate(memories):
        ids = torch.randint(5, 100, (3, 5 + 2 * number), generator=generator)
        encoding = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        passes.append((encoding, [RowGroup(memory, torch.tensor([0, 2])), RowGroup(None, torch.tensor([1]))]))

    def run(number: int) -> EncoderOutput:
        with torch.inference_mode():
            return encoder.forward(*passes[number])

    alone = [run(number) for number in range(len(passes))]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            together = list(pool.map(run, range(len(passes))))
            for single, shared in zip(alone, together, strict=True):
                assert_f32_close(shared.pooled, single.pooled)
                assert_f32_close(shared.outputs[0], single.outputs[0])


def test_a_new_graph_has_run_one_pass_on_every_stream(tmp_path):
    """Before any caller can reach them, each stream's infer request has run a pass, in the building
    thread. OpenVINO's bindings fill first-use statics with the GIL held: two batch workers making the
    process's first passes at once deadlocked it (a fresh server froze for good, 4 starts in 49 under a
    load of single-row requests). Read from the cache, as a restart does, where no conversion has
    called the bindings before."""
    graph_encoder(tiny_backbone("bert"), tiny_backbone("bert"), streams=2, cache_dir=tmp_path)
    encoder = graph_encoder(tiny_backbone("bert"), tiny_backbone("bert"), streams=2, cache_dir=tmp_path)
    assert encoder.graph is not None
    requests = [encoder.graph._requests.get_nowait() for _ in range(encoder.graph.streams)]
    try:
        assert all(request.latency > 0 for request in requests)  # ms of its last pass; 0 before any
    finally:
        for request in requests:
            encoder.graph._requests.put(request)


def test_engine_streams_and_their_threads_share_the_cpus(settings_for, monkeypatch):
    monkeypatch.setattr("app.engine.serving.available_cpus", lambda: 4)
    shares = {
        (None, None): (4, 1),  # the default: one single-thread stream per CPU
        (1, None): (4, 1),
        (2, None): (2, 2),
        (8, None): (1, 8),
        (None, 1): (1, 4),  # one stream: every CPU on each pass
        (None, 3): (3, 1),
        (1, 3): (3, 1),
    }
    for (threads, streams), expected in shares.items():
        settings = settings_for(torch_threads=threads, engine_streams=streams)
        assert (engine_streams(settings), pass_threads(settings)) == expected, (threads, streams)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, None),  # no cgroup files: the affinity alone
        ({"cpu.max": "max 100000\n"}, None),  # v2, no limit
        ({"cpu.max": "200000 100000\n"}, 2),  # v2, a 2-CPU limit
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: a second stream still gets half a core
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, none
    ],
)
def test_available_cpus_follow_a_containers_cpu_limit(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == (affinity if expected is None else min(affinity, expected))


def test_the_service_runs_one_batch_worker_per_stream(settings_for):
    """The app wires the graph's streams into the batcher: one worker per pass it can run at once."""
    from app.main import build_services, shutdown
    from app.metrics import Metrics

    encoder = graph_encoder(tiny_backbone("bert"), tiny_backbone("bert"), streams=2)
    before = set(threading.enumerate())  # another module's live app may have workers of its own
    services = build_services(settings_for(), Metrics(), encoder)
    try:
        assert services.batcher.config.workers == 2
        workers = [t for t in set(threading.enumerate()) - before if t.name.startswith("spartan-batcher")]
        assert len(workers) == 2
        assert services.batcher.health() is None
    finally:
        shutdown(services, close_encoder=False)
    assert not any(worker.is_alive() for worker in workers)
    eager = build_services(settings_for(), Metrics(), SpartanEncoder(tiny_backbone("bert")))
    try:
        assert eager.batcher.config.workers == 1  # the eager path runs one pass at a time
    finally:
        shutdown(eager, close_encoder=False)

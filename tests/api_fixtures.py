"""Fixtures of the API tests: a tiny random backbone, memories built on the test's encoder, per-test
settings, apps served in-process (httpx's ASGI transport, lifespan entered: registry, batcher thread
and all), and a gate that holds the batch worker so that tests line up queues without timing.

Which encoder a test gets (`api_encoder`, and through it `make_memory`, `memory_file` and `serve`)
follows its `model` marker: the real MiniLM for tests marked `model` (their assertions depend on its
predictions), the tiny random BERT otherwise (plumbing: the fast loop `pytest -m "not model"` covers
the service without the model). Each is loaded once per session."""

from __future__ import annotations

import asyncio
import json
import string
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI

from app.engine.batcher import Batcher, QueuedRequest
from app.engine.runner import PreparedRow, RowOutput
from app.main import create_app
from app.settings import Settings
from app.spartan.memfile import memory_to_bytes
from app.spartan.memory import MemorySpec, TaskMemory, TaskType

MemoryMaker = Callable[..., TaskMemory]
Served = tuple[FastAPI, httpx.AsyncClient]


def build_memory(
    encoder: Any,
    *,
    seed: int = 0,
    labels: tuple[str, ...] = ("negative", "positive"),
    task_type: TaskType = "classification",
    max_length: int = 128,
    text_pairs: bool = False,
    layernorms: bool = True,
    first_memory_layer: int = 0,
) -> TaskMemory:
    """A random memory, perturbed so that it changes the backbone's states and its predictions are
    not degenerate (probabilities well inside (0, 1), different inputs -> different outputs); with
    `first_memory_layer`, memories (and LayerNorm copies) from that layer up only."""
    backbone = encoder.backbone
    spec = MemorySpec(
        num_layers=backbone.num_layers,
        hidden_size=backbone.hidden_size,
        task_type=task_type,
        labels=labels if task_type == "classification" else (),
        pooling=backbone.pooling,
        max_length=max_length,
        text_pairs=text_pairs,
        backbone_id=backbone.name,
        backbone_fingerprint=backbone.fingerprint,
        layernorm_names=encoder.layernorms_from(first_memory_layer) if layernorms else (),
        first_memory_layer=first_memory_layer,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the same seed gives the same memory, whatever ran before
        torch.manual_seed(seed)
        memory = TaskMemory(spec)
    memory.init_layernorms(encoder.base_layernorms())
    with torch.no_grad():
        for name, param in memory.named_parameters():
            scale = 0.05 if name.startswith(("head.out", "layernorms")) else 0.2
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    memory.eval()
    return memory


# ------------------------------------------------------------------ the tiny random backbone

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Every character alone and as a word piece, so any ASCII text tokenises without [UNK]; a few common
# words keep the test texts' token counts near MiniLM's.
CHARACTERS = string.ascii_lowercase + string.digits + string.punctuation
WORDS = ["the", "and", "of", "to", "in", "is", "it", "my", "was", "for", "on", "at", "how", "what", "why"]
WORDS += ["do", "this", "that", "film", "bank", "card", "an"]


def save_tiny_backbone(folder: Path) -> Path:
    """A 2-layer, hidden-32 random BERT with a real WordPiece fast tokenizer and mean pooling, saved
    as a Hugging Face folder (plus the sentence-transformers pooling config): it loads through
    app.engine.backbone.load_backbone exactly like MiniLM, with no network."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    pieces = dict.fromkeys([*SPECIAL_TOKENS, *CHARACTERS, *(f"##{c}" for c in CHARACTERS), *WORDS])
    vocab = {piece: index for index, piece in enumerate(pieces)}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=200))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",  # token type 1 for the pair, as BERT's own tokenizer
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    wordpiece.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng():  # the same weights every session, whatever ran before
        torch.manual_seed(0)
        BertModel(config).save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_encoder(tiny_backbone_dir: Path, cache_dir: Path) -> Any:
    """One SpartanEncoder on the tiny backbone for the whole session, loaded like the real one."""
    from app.engine.backbone import load_backbone
    from app.engine.encoder import SpartanEncoder

    return SpartanEncoder(load_backbone(str(tiny_backbone_dir), cache_dir))


@pytest.fixture
def api_encoder(request: pytest.FixtureRequest) -> Any:
    """The real MiniLM for a test marked `model`, the tiny backbone for any other."""
    marked = request.node.get_closest_marker("model") is not None
    return request.getfixturevalue("minilm_encoder" if marked else "tiny_encoder")


# ------------------------------------------------------------------ memories, settings, apps


@pytest.fixture
def make_memory(api_encoder: Any) -> MemoryMaker:
    def make(**kwargs: Any) -> TaskMemory:
        return build_memory(api_encoder, **kwargs)

    return make


@pytest.fixture
def memory_file(make_memory: MemoryMaker) -> Callable[..., bytes]:
    def make(**kwargs: Any) -> bytes:
        return memory_to_bytes(make_memory(**kwargs))

    return make


@pytest.fixture
def settings_for(tmp_path: Path) -> Callable[..., Settings]:
    """Settings of a test service: its own store folder, no polling, dev writes unless keys are given."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "memory_dir": tmp_path / "memories",
            "admin_api_key": None,  # explicit: a key in the environment must not change the tests
            "predict_api_key": None,
            "allow_unauthenticated_writes": True,
            "store_poll_interval_s": 0,
            **overrides,
        }
        return Settings(**values)

    return make


@pytest.fixture(scope="session")
def write_memory() -> Callable[[Settings, str, bytes], None]:
    """Put a memory file straight into a service's store folder (as a deploy or a sync job would)."""

    def write(settings: Settings, task: str, data: bytes) -> None:
        settings.memory_dir.mkdir(parents=True, exist_ok=True)
        (settings.memory_dir / f"{task}.safetensors").write_bytes(data)

    return write


@pytest.fixture
def serve(api_encoder: Any) -> Callable[[Settings], AbstractAsyncContextManager[Served]]:
    """`async with serve(settings) as (app, client)`: a started app and a client talking to it."""

    @asynccontextmanager
    async def served(settings: Settings) -> AsyncIterator[Served]:
        app = create_app(settings, encoder=api_encoder)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://spartan.test", timeout=120
            ) as client:
                yield app, client

    return served


# ------------------------------------------------------------------ holding the batch worker


class HeldRunner:
    """The app's runner, wrapped: every forward pass waits until `release()`, and every accepted
    enqueue is counted, so that a test builds an exact queue behind a batch in progress (no windows,
    no sleeps). Install it inside the app's event loop: `held = HeldRunner.install(app)`."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self.inner = batcher.runner
        self.running = threading.Event()  # the worker is inside a pass
        self.released = threading.Event()
        self.accepted: list[QueuedRequest] = []  # requests the queue took, in order
        self._enqueued = asyncio.Event()

    @classmethod
    def install(cls, app: FastAPI) -> HeldRunner:
        batcher: Batcher = app.state.services.batcher
        held = cls(batcher)
        enqueue = batcher.enqueue

        def counted(*args: Any, **kwargs: Any) -> QueuedRequest:
            request = enqueue(*args, **kwargs)  # Overloaded propagates: a refused request is not counted
            held.accepted.append(request)
            held._enqueued.set()  # enqueue runs on the event loop (Batcher.submit)
            return request

        batcher.runner = held
        batcher.enqueue = counted  # type: ignore[method-assign]
        return held

    def prepare(self, rows: Sequence[Any]) -> list[PreparedRow]:
        return self.inner.prepare(rows)

    def run(self, rows: Sequence[PreparedRow]) -> list[RowOutput]:
        self.running.set()
        if not self.released.wait(60):
            raise RuntimeError("the test never released the held runner")
        return self.inner.run(rows)

    def release(self) -> None:
        self.released.set()

    async def until_running(self) -> None:
        """Until the worker is inside a pass (holding the batch it took, the queue behind it)."""
        assert await asyncio.to_thread(self.running.wait, 60), "the batch worker never started a pass"

    async def until_accepted(self, count: int) -> None:
        """Until the queue has taken `count` requests since install."""

        async def wait() -> None:
            while len(self.accepted) < count:
                self._enqueued.clear()
                await self._enqueued.wait()

        await asyncio.wait_for(wait(), 60)

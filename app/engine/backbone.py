"""Loading the frozen, shared encoder: any Hugging Face encoder folder (or hub id where reachable)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase
from transformers import utils as hf_utils

from app.errors import AssetError, BackboneError
from app.spartan.memory import Pooling

log = logging.getLogger(__name__)

Precision = Literal["bf16", "fp32"]
_DTYPES: dict[Precision, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}

# Config fields that define the computation; the rest (paths, versions, dtype hints) varies harmlessly.
_FINGERPRINT_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "n_layers",
    "dim",
    "hidden_dim",
    "n_heads",
)


@dataclass(frozen=True)
class SentenceEmbedding:
    """How the model's own sentence embedding is made (sentence-transformers' modules.json, pooling
    config and sentence_bert_config.json): pooling, L2 normalisation, and the longest input it reads."""

    pooling: Pooling
    normalize: bool = False
    max_length: int = 512


@dataclass
class Backbone:
    """A frozen encoder with its tokenizer and the facts the memories depend on."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layers: list[nn.Module]  # the Transformer layers, in order; a memory goes after each
    pooling: Pooling
    fingerprint: str  # of the float32 weights as loaded: one backbone is one identity at any precision
    embedding: SentenceEmbedding | None = None  # None: pooling as `pooling`, no normalisation

    @property
    def sentence_embedding(self) -> SentenceEmbedding:
        return self.embedding or SentenceEmbedding(self.pooling, False, self.max_positions)

    @property
    def precision(self) -> Precision:
        return "bf16" if next(self.model.parameters()).dtype == torch.bfloat16 else "fp32"

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.dim)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def max_positions(self) -> int:
        limit = int(getattr(self.model.config, "max_position_embeddings", 512))
        # RoBERTa-style models reserve padding_idx + 1 positions.
        return min(
            limit - 2 if self.model.config.model_type in {"roberta", "xlm-roberta", "mpnet"} else limit, 512
        )

    def layernorms(self) -> dict[str, nn.LayerNorm]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, nn.LayerNorm)}

    def tokenize(self, texts: list[str], pairs: list[str] | None, max_length: int) -> BatchEncoding:
        """Tokenise single texts or text pairs, padded to the longest in the batch."""
        return self.tokenizer(
            texts,
            pairs,
            padding=True,
            truncation="longest_first" if pairs else True,
            max_length=min(max_length, self.max_positions),
            return_tensors="pt",
        )


def find_layers(model: nn.Module, num_layers: int) -> list[nn.Module]:
    """The ModuleList holding the Transformer layers: the shallowest list with one entry per layer.

    Works for BERT/RoBERTa/XLM-R/MPNet (encoder.layer) and DistilBERT (transformer.layer) without
    naming any of them.
    """
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                return list(module)
    raise BackboneError(f"cannot find {num_layers} Transformer layers in {type(model).__name__}")


def detect_pooling(folder: Path | None) -> Pooling:
    """Sentence-transformers models say how they pool; plain encoders use their first token."""
    if folder is not None:
        pooling_config = folder / "1_Pooling" / "config.json"
        if pooling_config.is_file():
            config = json.loads(pooling_config.read_text())
            if config.get("pooling_mode_mean_tokens"):
                return "mean"
            if config.get("pooling_mode_cls_token"):
                return "first"
    return "first"


def detect_sentence_embedding(folder: Path | None, pooling: Pooling, max_positions: int) -> SentenceEmbedding:
    """Read a sentence-transformers folder's own definition of its embedding; plain encoders get
    their pooling, no normalisation, and every position."""
    normalize, max_length = False, max_positions
    if folder is not None:
        modules = folder / "modules.json"
        if modules.is_file():
            kinds = {str(m.get("type", "")) for m in json.loads(modules.read_text())}
            normalize = "sentence_transformers.models.Normalize" in kinds
        config = folder / "sentence_bert_config.json"
        if config.is_file():
            max_length = min(
                max_positions, int(json.loads(config.read_text()).get("max_seq_length", max_length))
            )
    return SentenceEmbedding(pooling, normalize, max_length)


def fingerprint(model: PreTrainedModel) -> str:
    """A stable sha256 of the architecture-defining config fields and every weight (names, shapes, bytes)."""
    digest = hashlib.sha256()
    config = model.config.to_dict()
    arch = {key: config[key] for key in _FINGERPRINT_CONFIG_KEYS if key in config}
    digest.update(json.dumps(arch, sort_keys=True).encode())
    for name, param in sorted(model.named_parameters()):
        digest.update(f"{name}:{param.dtype}:{tuple(param.shape)}".encode())
        digest.update(param.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def resolve_backbone_path(name_or_path: str, cache_dir: Path) -> str:
    """A fetched asset name -> its folder; an existing folder as is; anything else is taken as a hub id."""
    from app.assets.fetch import BACKBONES, asset_dir  # local: the asset code is only needed here

    if name_or_path in BACKBONES:
        return str(asset_dir(name_or_path, cache_dir))
    return name_or_path


def bf16_is_native() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere torch emulates
    it, slower than float32."""
    cpu = torch.backends.cpu
    capability = cpu.get_cpu_capability() if hasattr(cpu, "get_cpu_capability") else ""
    supported = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return bool(supported) and capability.startswith("AVX512")


def resolve_precision(setting: str) -> Precision:
    """`auto` -> bf16 where the CPU has native bfloat16, else fp32; bf16 and fp32 are taken as given."""
    if setting == "auto":
        return "bf16" if bf16_is_native() else "fp32"
    if setting not in _DTYPES:
        raise BackboneError(f"unknown precision {setting!r}: auto, bf16 or fp32")
    return setting


def load_backbone(
    name_or_path: str, cache_dir: Path, *, pooling: Pooling | None = None, precision: Precision = "fp32"
) -> Backbone:
    """Load, freeze and fingerprint an encoder, its weights in `precision` (the fingerprint is always of
    the float32 weights, so memory files match the backbone at any precision). Raises BackboneError
    with a readable reason."""
    try:
        source = resolve_backbone_path(name_or_path, cache_dir)
    except AssetError as err:
        raise BackboneError(str(err)) from err
    folder = Path(source) if Path(source).is_dir() else None
    hf_utils.logging.disable_progress_bar()  # the weight-loading bar is noise in a server log
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModel.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise BackboneError(f"cannot load backbone {name_or_path!r}: {err}") from err
    model.eval()
    model.requires_grad_(False)
    config = model.config
    num_layers = int(getattr(config, "num_hidden_layers", None) or config.n_layers)
    backbone = Backbone(
        name=name_or_path,
        model=model,
        tokenizer=tokenizer,
        layers=find_layers(model, num_layers),
        pooling=pooling or detect_pooling(folder),
        fingerprint=fingerprint(model),
    )
    backbone.embedding = detect_sentence_embedding(folder, backbone.pooling, backbone.max_positions)
    if precision != "fp32":
        model.to(_DTYPES[precision])
    log.info(
        "backbone %s: %s, %d layers, hidden %d, pooling %s, %s, fingerprint %s",
        name_or_path,
        config.model_type,
        backbone.num_layers,
        backbone.hidden_size,
        backbone.pooling,
        precision,
        backbone.fingerprint[:12],
    )
    return backbone


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """[B, S, H] -> [B, H]: masked mean over real tokens, or the first token."""
    if pooling == "first":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)

"""Memory files: safetensors only (never pickle), with the metadata needed to use them safely.

Every way a file can be wrong gets a MemoryInvalid (or BackboneMismatch) whose message says what is
wrong, with expected vs found. Nothing is trusted before it is checked: the header is parsed and its
offsets checked by us before safetensors reads any tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from app.errors import BackboneMismatch, MemoryInvalid
from app.spartan.memory import LayerNormOverride, MemorySpec, TaskMemory, layernorm_key

FORMAT_NAME = "spartan-memory"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_HEADER_BYTES = 1 << 20  # a memory's header lists ~25 tensors; megabytes of header are an attack
_DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}

_REQUIRED_METADATA = (
    "format",
    "format_version",
    "backbone_id",
    "backbone_fingerprint",
    "num_layers",
    "hidden_size",
    "num_parents",
    "num_children",
    "top_k",
    "temperature",
    "pooling",
    "task_type",
    "labels",
    "max_length",
)


@dataclass(frozen=True)
class BackboneIdentity:
    """What a memory must match to run on the served backbone."""

    fingerprint: str
    num_layers: int
    hidden_size: int
    name: str = ""
    layernorm_names: tuple[str, ...] = ()


def spec_metadata(spec: MemorySpec) -> dict[str, str]:
    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "backbone_id": spec.backbone_id,
        "backbone_fingerprint": spec.backbone_fingerprint,
        "num_layers": str(spec.num_layers),
        "hidden_size": str(spec.hidden_size),
        "num_parents": str(spec.num_parents),
        "num_children": str(spec.num_children),
        "top_k": str(spec.top_k),
        "temperature": repr(spec.temperature),
        "pooling": spec.pooling,
        "task_type": spec.task_type,
        "labels": json.dumps(list(spec.labels)),
        "max_length": str(spec.max_length),
        "text_pairs": json.dumps(spec.text_pairs),
        "layernorms": json.dumps(list(spec.layernorm_names)),
        "dropout": repr(spec.dropout),
        "training": json.dumps(spec.training, sort_keys=True, default=str),
    }


def expected_shapes(spec: MemorySpec) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, for every tensor a memory file with this spec must hold (and no other)."""
    h, e, c = spec.hidden_size, spec.num_parents, spec.num_children
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(spec.num_layers):
        shapes[f"layers.{layer}.parent_keys"] = (e, h)
        shapes[f"layers.{layer}.child_keys"] = (e, c, h)
        shapes[f"layers.{layer}.child_values"] = (e, c, h)
    shapes["head.dense.weight"] = (h, h)
    shapes["head.dense.bias"] = (h,)
    shapes["head.out.weight"] = (spec.num_outputs, h)
    shapes["head.out.bias"] = (spec.num_outputs,)
    for name in spec.layernorm_names:
        shapes[f"layernorm.{name}.weight"] = (h,)
        shapes[f"layernorm.{name}.bias"] = (h,)
    return shapes


def memory_tensors(memory: TaskMemory) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(memory.memory_layers()):
        tensors[f"layers.{index}.parent_keys"] = layer.parent_keys
        tensors[f"layers.{index}.child_keys"] = layer.child_keys
        tensors[f"layers.{index}.child_values"] = layer.child_values
    for name, param in memory.head.named_parameters():
        tensors[f"head.{name}"] = param
    for name in memory.spec.layernorm_names:
        override = memory.layernorm(name)
        assert override is not None, f"memory lacks its LayerNorm copy for {name}"
        tensors[f"layernorm.{name}.weight"] = override.weight
        tensors[f"layernorm.{name}.bias"] = override.bias
    return {name: t.detach().float().contiguous().cpu() for name, t in tensors.items()}


def memory_to_bytes(memory: TaskMemory) -> bytes:
    return save_safetensors(memory_tensors(memory), metadata=spec_metadata(memory.spec))


def save_memory(memory: TaskMemory, path: Path) -> str:
    """Write atomically (temp file in the same folder, fsync, rename); returns the version (sha256)."""
    data = memory_to_bytes(memory)
    write_atomically(path, data)
    return hashlib.sha256(data).hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename or unlink in `folder` durable: without it a power cut can undo the rename."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- reading


def load_memory_file(path: Path, backbone: BackboneIdentity | None = None) -> TaskMemory:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise MemoryInvalid(f"cannot read memory file {path.name}: {err.strerror}") from err
    return load_memory(data, backbone)


def load_memory(data: bytes, backbone: BackboneIdentity | None = None) -> TaskMemory:
    """Parse and fully validate a memory file; with `backbone`, also check it belongs to that backbone."""
    header = read_header(data)
    spec = parse_spec(header.get("__metadata__"))
    if backbone is not None:
        check_backbone(spec, backbone)
    check_tensor_entries(header, spec)
    try:
        tensors = load_safetensors(data)
    except SafetensorError as err:  # our own checks should have caught it; never leak a raw trace
        raise MemoryInvalid(f"not a valid safetensors file: {err}") from err
    check_finite(tensors)
    memory = build_memory(spec, tensors)
    memory.version = hashlib.sha256(data).hexdigest()
    return memory


def read_header(data: bytes) -> dict[str, Any]:
    """The safetensors JSON header, after checking its length and that the data offsets fit the file."""
    if len(data) == 0:
        raise MemoryInvalid("empty file: a memory file is a safetensors file with a JSON header")
    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data[:2] == b"PK":
        raise MemoryInvalid(
            "this is a pickle / torch.save file; only safetensors memory files are accepted "
            "(pickle can execute code when loaded)"
        )
    if len(data) < 8:
        raise MemoryInvalid(f"not a safetensors file: {len(data)} bytes, shorter than the 8-byte header size")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > MAX_HEADER_BYTES:
        raise MemoryInvalid(
            f"not a safetensors memory file: header declares {header_size} bytes (limit {MAX_HEADER_BYTES})"
        )
    if 8 + header_size > len(data):
        raise MemoryInvalid(
            f"truncated file: header declares {header_size} bytes but only {len(data) - 8} follow"
        )
    try:
        header = json.loads(data[8 : 8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MemoryInvalid(
            f"not a safetensors file: header is not valid JSON ({err.__class__.__name__})"
        ) from err
    if not isinstance(header, dict):
        raise MemoryInvalid("not a safetensors file: header is not a JSON object")
    check_offsets(header, len(data) - 8 - header_size)
    return header


def check_offsets(header: dict[str, Any], data_size: int) -> None:
    """Every tensor's byte range must lie inside the file and match its dtype and shape; no gaps."""
    end_max = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise MemoryInvalid(f"tensor {name!r}: header entry lacks dtype, shape or data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPE_SIZES:
            raise MemoryInvalid(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise MemoryInvalid(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise MemoryInvalid(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        expected = math.prod(shape) * _DTYPE_SIZES[dtype]
        if not 0 <= begin <= end or end - begin != expected:
            raise MemoryInvalid(
                f"tensor {name!r}: data_offsets {offsets} hold {end - begin} bytes, "
                f"its dtype and shape need {expected}"
            )
        if end > data_size:
            raise MemoryInvalid(
                f"truncated file: tensor {name!r} ends at byte {end} of the data section, "
                f"which has only {data_size} bytes"
            )
        end_max = max(end_max, end)
    if end_max != data_size:
        raise MemoryInvalid(f"data section has {data_size} bytes but the tensors cover {end_max}")


def _meta_int(meta: dict[str, str], key: str, low: int, high: int) -> int:
    try:
        value = int(meta[key])
    except ValueError:
        raise MemoryInvalid(f"metadata {key}={meta[key]!r} is not an integer") from None
    if not low <= value <= high:
        raise MemoryInvalid(f"metadata {key}={value} is out of range [{low}, {high}]")
    return value


def _meta_json(meta: dict[str, str], key: str, default: Any) -> Any:
    if key not in meta:
        return default
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError:
        raise MemoryInvalid(f"metadata {key} is not valid JSON") from None


def _meta_choice(meta: dict[str, str], key: str, choices: tuple[str, ...]) -> str:
    if meta[key] not in choices:
        raise MemoryInvalid(f"metadata {key}={meta[key]!r}: expected one of {', '.join(choices)}")
    return meta[key]


def parse_spec(metadata: object) -> MemorySpec:
    """The MemorySpec of a file's metadata, with every field type- and range-checked."""
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MemoryInvalid("no spartan metadata: this safetensors file is not a spartan memory file")
    meta: dict[str, str] = metadata
    if meta.get("format") != FORMAT_NAME:
        raise MemoryInvalid(f"metadata format={meta.get('format')!r}: expected {FORMAT_NAME!r}")
    version = meta.get("format_version", "?")
    if version not in {str(v) for v in SUPPORTED_VERSIONS}:
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise MemoryInvalid(f"unsupported format version {version!r}: this service reads version {supported}")
    missing = [key for key in _REQUIRED_METADATA if key not in meta]
    if missing:
        raise MemoryInvalid(f"metadata lacks {', '.join(missing)}")
    num_parents = _meta_int(meta, "num_parents", 1, 1 << 20)
    try:
        temperature = float(meta["temperature"])
        dropout = float(meta.get("dropout", "0.1"))
    except ValueError:
        raise MemoryInvalid("metadata temperature or dropout is not a number") from None
    if not (math.isfinite(temperature) and temperature > 0):
        raise MemoryInvalid(f"metadata temperature={temperature} must be a positive finite number")
    task_type = _meta_choice(meta, "task_type", ("classification", "regression"))
    labels = _meta_json(meta, "labels", [])
    if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise MemoryInvalid("metadata labels must be a JSON list of strings")
    if task_type == "classification" and (len(labels) < 2 or len(set(labels)) != len(labels)):
        raise MemoryInvalid(f"a classification memory needs at least 2 distinct labels, found {labels}")
    layernorms = _meta_json(meta, "layernorms", [])
    if not (isinstance(layernorms, list) and all(isinstance(x, str) for x in layernorms)):
        raise MemoryInvalid("metadata layernorms must be a JSON list of module names")
    training = _meta_json(meta, "training", {})
    return MemorySpec(
        num_layers=_meta_int(meta, "num_layers", 1, 256),
        hidden_size=_meta_int(meta, "hidden_size", 1, 1 << 16),
        num_parents=num_parents,
        num_children=_meta_int(meta, "num_children", 1, 1 << 16),
        top_k=_meta_int(meta, "top_k", 1, num_parents),
        temperature=temperature,
        task_type=task_type,  # type: ignore[arg-type]
        labels=tuple(labels),
        pooling=_meta_choice(meta, "pooling", ("mean", "first")),  # type: ignore[arg-type]
        max_length=_meta_int(meta, "max_length", 1, 1 << 16),
        text_pairs=bool(_meta_json(meta, "text_pairs", False)),
        backbone_id=meta["backbone_id"],
        backbone_fingerprint=meta["backbone_fingerprint"],
        layernorm_names=tuple(layernorms),
        dropout=dropout,
        training=training if isinstance(training, dict) else {},
    )


def check_backbone(spec: MemorySpec, backbone: BackboneIdentity) -> None:
    if spec.backbone_fingerprint != backbone.fingerprint:
        raise BackboneMismatch(
            f"memory was trained for backbone {spec.backbone_id!r} "
            f"(fingerprint {spec.backbone_fingerprint[:16]}), this service runs {backbone.name!r} "
            f"(fingerprint {backbone.fingerprint[:16]})"
        )
    if (spec.num_layers, spec.hidden_size) != (backbone.num_layers, backbone.hidden_size):
        raise BackboneMismatch(
            f"memory has {spec.num_layers} layers of width {spec.hidden_size}, the backbone has "
            f"{backbone.num_layers} of width {backbone.hidden_size}"
        )
    unknown = sorted(set(spec.layernorm_names) - set(backbone.layernorm_names))
    if unknown:
        raise BackboneMismatch(
            f"memory carries LayerNorms the backbone does not have: {', '.join(unknown[:4])}"
        )


def check_tensor_entries(header: dict[str, Any], spec: MemorySpec) -> None:
    """The file holds exactly the tensors the spec implies, each float32 with the right shape."""
    expected = expected_shapes(spec)
    found = {name: entry for name, entry in header.items() if name != "__metadata__"}
    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    if missing:
        raise MemoryInvalid(
            f"missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else "")
        )
    if extra:
        raise MemoryInvalid(
            f"unexpected tensors: {', '.join(extra[:8])}" + (" ..." if len(extra) > 8 else "")
        )
    for name, shape in expected.items():
        entry = found[name]
        if entry["dtype"] != "F32":
            raise MemoryInvalid(f"tensor {name}: expected dtype F32, found {entry['dtype']}")
        if tuple(entry["shape"]) != shape:
            raise MemoryInvalid(f"tensor {name}: expected shape {list(shape)}, found {entry['shape']}")


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in sorted(tensors.items()):
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise MemoryInvalid(f"tensor {name} has {bad} non-finite values (NaN or Inf)")


def build_memory(spec: MemorySpec, tensors: dict[str, torch.Tensor]) -> TaskMemory:
    memory = TaskMemory(spec)
    for name in spec.layernorm_names:
        empty = torch.empty(spec.hidden_size)
        memory.layernorms[layernorm_key(name)] = LayerNormOverride(empty, empty)
    state = {}
    for name, tensor in tensors.items():
        if name.startswith("layernorm."):
            module, _, param = name[len("layernorm.") :].rpartition(".")
            state[f"layernorms.{layernorm_key(module)}.{param}"] = tensor
        else:
            state[name] = tensor
    memory.load_state_dict(state, strict=True)
    memory.eval()
    memory.requires_grad_(False)
    return memory

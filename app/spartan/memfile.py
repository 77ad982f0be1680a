"""Memory files: safetensors only (never pickle), with the metadata needed to use them safely.

Every way a file can be wrong gets a MemoryInvalid (or BackboneMismatch) whose message says what is
wrong, with expected vs found; no other exception escapes the parser, whatever the bytes. Nothing is
trusted before it is checked: the header is parsed (strict JSON) and its offsets checked by us before
safetensors reads any tensor, so no declared size is allocated unless the file holds those bytes.
Messages quote hostile values shortened and escaped (`shown`), so they are safe in JSON bodies and logs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import reprlib
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from app.errors import BackboneMismatch, MemoryInvalid, PoolingMismatch
from app.fsutil import write_atomically
from app.spartan.layer import memory_forward
from app.spartan.memory import LayerNormOverride, MemorySpec, Pooling, TaskMemory, layernorm_key

FORMAT_NAME = "spartan-memory"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_HEADER_BYTES = 1 << 20  # a memory's header lists ~25 tensors; megabytes of header are an attack
# A JSON value costs up to 25 times its bytes once parsed (an empty object: 70 bytes of heap for 3 of
# header), so their number is bounded too: parsing any header then takes at most ~7 MB. A memory needs
# about 9 per tensor and 1 per label: 48 layers with every LayerNorm and 20,000 labels fit.
MAX_HEADER_VALUES = 32_768
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
_OPTIONAL_METADATA = ("text_pairs", "layernorms", "dropout", "training", "first_memory_layer")
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_MAX_NDIM = 8  # memory tensors have at most 3
_MAX_META_DEPTH = 16  # of a metadata JSON value (training reports nest 3 levels)
_MAX_TEXT = 256  # characters of a label, a backbone id or fingerprint, a LayerNorm name
_TEMPERATURE_RANGE = (1e-3, 1e3)  # `spartan train` refuses T < 1e-3; beyond this range softmax overflows
_DECIMAL_INT = re.compile(r"-?[0-9]{1,18}")  # int() alone would take "1_6", " 16" or Arabic-Indic digits
_DECIMAL_FLOAT = re.compile(r"[+-]?([0-9]{1,20}(\.[0-9]{0,20})?|\.[0-9]{1,20})([eE][+-]?[0-9]{1,3})?")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+){0,7}")
_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


@dataclass(frozen=True)
class BackboneIdentity:
    """What a memory must match to run on the served backbone."""

    fingerprint: str
    num_layers: int
    hidden_size: int
    name: str = ""
    layernorm_names: tuple[str, ...] = ()
    # How the backbone pools its final states; None = not known, not checked. A memory's head was
    # trained on one pooling: on another its inputs mean something else, so a mismatch is refused.
    pooling: Pooling | None = None
    # (LayerNorm name, the Transformer layer it is in; -1: outside every layer, e.g. the embeddings'):
    # a memory that starts above layer 0 may carry only LayerNorms of its memory layers. Empty: not
    # known, not checked.
    layernorm_layers: tuple[tuple[str, int], ...] = ()


def spec_metadata(spec: MemorySpec) -> dict[str, str]:
    # first_memory_layer is written only when some layers have no memory: a file with a memory after
    # every layer stays byte-for-byte what it was (older services read it), and an older service
    # refuses a top-layers file by its unknown key instead of misreading it.
    top_layers = {"first_memory_layer": str(spec.first_memory_layer)} if spec.first_memory_layer else {}
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
        **top_layers,
    }


def expected_shapes(spec: MemorySpec) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, for every tensor a memory file with this spec must hold (and no other)."""
    h, e, c = spec.hidden_size, spec.num_parents, spec.num_children
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in spec.memory_layer_indices:
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
    for index, layer in memory.indexed_memory_layers():
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
    check_probe(memory, tensors)
    memory.version = hashlib.sha256(data).hexdigest()
    return memory


def read_header(data: bytes) -> dict[str, Any]:
    """The safetensors JSON header, after checking its length and that the data offsets fit the file."""
    if len(data) == 0:
        raise MemoryInvalid("empty file: a memory file is a safetensors file with a JSON header")
    # Another format is named only where the bytes cannot be a safetensors file: the first bytes of a
    # real header size can equal a magic number (a header of 1152 bytes starts like a pickle).
    foreign = foreign_format(data)
    if len(data) < 8:
        raise MemoryInvalid(
            foreign or f"not a safetensors file: {len(data)} bytes, shorter than the 8-byte header size"
        )
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > MAX_HEADER_BYTES:
        raise MemoryInvalid(
            foreign
            or f"not a safetensors memory file: header declares {header_size} bytes "
            f"(limit {MAX_HEADER_BYTES})"
        )
    if 8 + header_size > len(data):
        raise MemoryInvalid(
            foreign or f"truncated file: header declares {header_size} bytes but only {len(data) - 8} follow"
        )
    raw = data[8 : 8 + header_size]
    # Every JSON value but the first of its array or object follows a comma: this bounds their number
    # (from above: brackets and commas inside strings count too) before any is built.
    values = raw.count(b",") + raw.count(b"{") + raw.count(b"[")
    if values > MAX_HEADER_VALUES and not foreign:
        raise MemoryInvalid(
            f"not a safetensors memory file: header holds up to {values} JSON values "
            f"(limit {MAX_HEADER_VALUES}; a memory file needs about 9 per tensor)"
        )
    try:
        header = strict_json(raw, "not a safetensors file: header")
    except MemoryInvalid:
        if foreign:
            raise MemoryInvalid(foreign) from None
        raise
    if not isinstance(header, dict):
        raise MemoryInvalid(f"not a safetensors file: header is a JSON {json_type(header)}, not an object")
    check_offsets(header, len(data) - 8 - header_size)
    return header


def foreign_format(data: bytes) -> str | None:
    """What the file is if its first bytes are another format's magic number (None: no known magic)."""
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return (
            "this is a pickle file (pickle.dump, or torch.save's legacy format); only safetensors "
            "memory files are accepted (pickle can execute code when loaded)"
        )
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return (
            "this is a zip archive (torch.save writes a pickle inside one); only safetensors memory "
            "files are accepted (pickle can execute code when loaded)"
        )
    if data[:2] == b"\x1f\x8b":
        return "this is a gzip-compressed file: upload the uncompressed .safetensors memory file"
    if data[:6] == b"\x93NUMPY":
        return "this is a numpy .npy file; only safetensors memory files are accepted"
    return None


def check_offsets(header: dict[str, Any], data_size: int) -> None:
    """Every tensor's byte range must match its dtype and shape, and the ranges must tile the data
    section exactly: inside it, no overlap, no gap, nothing after the last tensor."""
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {shown(name)}"
        if not isinstance(entry, dict):
            raise MemoryInvalid(
                f"{where}: header entry is a JSON {json_type(entry)}, not an object with dtype, shape "
                "and data_offsets"
            )
        if entry.keys() != _ENTRY_KEYS:
            lacks, extra = sorted(_ENTRY_KEYS - entry.keys()), sorted(entry.keys() - _ENTRY_KEYS)
            raise MemoryInvalid(
                f"{where}: header entry "
                + (f"lacks {', '.join(lacks)}" if lacks else f"has unknown fields {shown(extra)}")
            )
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
            raise MemoryInvalid(f"{where}: unsupported dtype {shown(dtype)}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise MemoryInvalid(f"{where}: shape {shown(shape)} is not a list of non-negative integers")
        if len(shape) > _MAX_NDIM:
            raise MemoryInvalid(f"{where}: shape has {len(shape)} dimensions (at most {_MAX_NDIM})")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise MemoryInvalid(f"{where}: data_offsets {shown(offsets)} is not [begin, end]")
        begin, end = offsets
        # Shape dimensions have at most 20 digits (strict_json), so this product is cheap however big.
        expected = math.prod(shape) * _DTYPE_SIZES[dtype]
        if not 0 <= begin <= end:
            raise MemoryInvalid(f"{where}: data_offsets {offsets} are not 0 <= begin <= end")
        if end - begin != expected:
            raise MemoryInvalid(
                f"{where}: data_offsets {offsets} hold {end - begin} bytes, "
                f"its dtype and shape need {expected}"
            )
        if end > data_size:
            raise MemoryInvalid(
                f"truncated file: {where} ends at byte {end} of the data section, "
                f"which has only {data_size} bytes"
            )
        ranges.append((begin, end, name))
    position, previous = 0, ""
    for begin, end, name in sorted(ranges):
        if begin < position:
            raise MemoryInvalid(
                f"tensor {shown(name)}: data_offsets [{begin}, {end}] overlap tensor {shown(previous)}, "
                f"which ends at byte {position}"
            )
        if begin > position:
            raise MemoryInvalid(
                f"data section has a gap of {begin - position} bytes at byte {position}, "
                f"before tensor {shown(name)}"
            )
        position, previous = end, name
    if position != data_size:
        raise MemoryInvalid(
            f"data section has {data_size - position} bytes of trailing data after the last tensor "
            f"(the tensors cover {position} of its {data_size} bytes)"
        )


# ------------------------------------------------------------------------------ strict JSON, messages


class _JSONRefused(ValueError):
    """A JSON document that parses, but that no memory file may hold."""


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:  # two readers could disagree about which of the two values counts
            raise _JSONRefused(f"key {shown(key)} appears twice in one object")
        found[key] = value
    return found


def _json_int(text: str) -> int:
    if len(text) > 20:  # int() of a long digit string is slow, and 4,300 digits raise ValueError
        raise _JSONRefused(f"integer {text[:12]}... has {len(text)} digits (at most 20)")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JSONRefused(f"number {text[:20]} overflows to infinity")
    return value


def _json_constant(name: str) -> float:
    raise _JSONRefused(f"{name} is not a JSON number")


def strict_json(raw: bytes | str, what: str) -> Any:
    """Parse JSON as the safetensors reader does, stricter: UTF-8 only, no duplicate keys, no NaN or
    Infinity, integers of at most 20 digits. Every failure is a MemoryInvalid naming `what`."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(
            text,
            object_pairs_hook=_json_object,
            parse_int=_json_int,
            parse_float=_json_float,
            parse_constant=_json_constant,
        )
    except UnicodeDecodeError as err:
        raise MemoryInvalid(f"{what} is not UTF-8: invalid byte at offset {err.start}") from None
    except RecursionError:
        raise MemoryInvalid(f"{what} is JSON nested too deeply") from None
    except _JSONRefused as err:
        raise MemoryInvalid(f"{what} is not acceptable JSON: {err}") from None
    except ValueError as err:  # json.JSONDecodeError: the message says where
        raise MemoryInvalid(f"{what} is not valid JSON: {err}") from None


def json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def json_depth(value: object) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 64
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict = 3, 8, 4


def shown(value: object) -> str:
    """A hostile value as a message may quote it: repr (control characters and lone surrogates escaped),
    shortened, never nested deeper than 3 levels."""
    return _SHOWN.repr(value)


def tensor_name(name: str) -> str:
    """A tensor name as a message shows it: plain when it looks like one, else quoted and escaped."""
    return name if len(name) <= 128 and _PLAIN_NAME.fullmatch(name) else shown(name)


# Format characters (bidi overrides U+202E, zero-width U+200B..U+200D, BOM), line and paragraph
# separators, private-use and unassigned code points: invisible or reordering in a label. (This also
# refuses emoji joined by U+200D; a label is an identifier a client compares, not prose.)
_INVISIBLE = frozenset({"Cf", "Zl", "Zp", "Co", "Cn"})


def _bad_text(value: str, limit: int) -> str | None:
    """Why `value` cannot be a label or a name shown to users and logs (None: it can)."""
    if not value:
        return "is empty"
    if len(value) > limit:
        return f"has {len(value)} characters (at most {limit})"
    for index, char in enumerate(value):
        category = unicodedata.category(char)
        if category in ("Cc", "Cs"):  # control characters, lone surrogates
            return f"has a control or surrogate character {char!r} at position {index}"
        if category in _INVISIBLE:
            return (
                f"has an invisible character {char!r} (U+{ord(char):04X}, category {category}) at "
                f"position {index}: a prediction would return a label that prints wrongly or not at all"
            )
    return None


# ------------------------------------------------------------------------------------------ metadata


def _meta_int(meta: dict[str, str], key: str, low: int, high: int) -> int:
    raw = meta[key]
    if not _DECIMAL_INT.fullmatch(raw):
        raise MemoryInvalid(f"metadata {key}={shown(raw)} is not an integer (decimal digits only)")
    value = int(raw)
    if not low <= value <= high:
        raise MemoryInvalid(f"metadata {key}={value} is out of range [{low}, {high}]")
    return value


def _meta_float(meta: dict[str, str], key: str, low: float, high: float, default: str = "") -> float:
    raw = meta.get(key, default)
    if not _DECIMAL_FLOAT.fullmatch(raw):
        raise MemoryInvalid(f"metadata {key}={shown(raw)} is not a decimal number")
    value = float(raw)
    if not low <= value <= high:  # also refuses overflow to inf
        raise MemoryInvalid(f"metadata {key}={shown(raw)} is out of range [{low:g}, {high:g}]")
    return value


def _meta_json(meta: dict[str, str], key: str, default: Any) -> Any:
    if key not in meta:
        return default
    value = strict_json(meta[key], f"metadata {key}")
    if json_depth(value) > _MAX_META_DEPTH:
        raise MemoryInvalid(f"metadata {key} nests JSON more than {_MAX_META_DEPTH} levels deep")
    return value


def _meta_choice(meta: dict[str, str], key: str, choices: tuple[str, ...]) -> str:
    if meta[key] not in choices:
        raise MemoryInvalid(f"metadata {key}={shown(meta[key])}: expected one of {', '.join(choices)}")
    return meta[key]


def _meta_text(meta: dict[str, str], key: str) -> str:
    problem = _bad_text(meta[key], _MAX_TEXT)
    if problem:
        raise MemoryInvalid(f"metadata {key} {problem}")
    return meta[key]


def _meta_labels(meta: dict[str, str], task_type: str) -> tuple[str, ...]:
    labels = _meta_json(meta, "labels", [])
    if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise MemoryInvalid(f"metadata labels must be a JSON list of strings, found {shown(labels)}")
    for index, label in enumerate(labels):
        problem = _bad_text(label, _MAX_TEXT)
        if problem:
            raise MemoryInvalid(f"metadata labels: label {index} {shown(label)} {problem}")
    if task_type == "classification" and (len(labels) < 2 or len(set(labels)) != len(labels)):
        raise MemoryInvalid(
            f"a classification memory needs at least 2 distinct labels, found {shown(labels)}"
        )
    return tuple(labels)


def _meta_layernorms(meta: dict[str, str]) -> tuple[str, ...]:
    names = _meta_json(meta, "layernorms", [])
    if not (isinstance(names, list) and all(isinstance(x, str) for x in names)):
        raise MemoryInvalid(f"metadata layernorms must be a JSON list of module names, found {shown(names)}")
    for name in names:
        if len(name) > _MAX_TEXT or not _MODULE_NAME.fullmatch(name):
            raise MemoryInvalid(
                f"metadata layernorms: {shown(name)} is not a module name (letters, digits, '_', "
                f"dot-separated, at most {_MAX_TEXT} characters)"
            )
    keys = [layernorm_key(name) for name in names]
    if len(set(keys)) != len(keys):
        raise MemoryInvalid("metadata layernorms names one LayerNorm twice")
    return tuple(names)


def parse_spec(metadata: object) -> MemorySpec:
    """The MemorySpec of a file's metadata, with every field type- and range-checked."""
    if metadata is None:
        raise MemoryInvalid(
            "no spartan metadata: this safetensors file has no __metadata__, "
            "so it is not a spartan memory file"
        )
    if not isinstance(metadata, dict):
        raise MemoryInvalid(f"header __metadata__ is a JSON {json_type(metadata)}, not an object of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise MemoryInvalid(
                f"metadata {shown(key)} is a JSON {json_type(value)}, not a string "
                "(safetensors metadata values are strings)"
            )
    meta: dict[str, str] = metadata
    if meta.get("format") != FORMAT_NAME:
        raise MemoryInvalid(f"metadata format={shown(meta.get('format'))}: expected {FORMAT_NAME!r}")
    version = meta.get("format_version", "?")
    if version not in {str(v) for v in SUPPORTED_VERSIONS}:
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise MemoryInvalid(
            f"unsupported format version {shown(version)}: this service reads version {supported}"
        )
    missing = [key for key in _REQUIRED_METADATA if key not in meta]
    if missing:
        raise MemoryInvalid(f"metadata lacks {', '.join(missing)}")
    unknown = sorted(meta.keys() - {*_REQUIRED_METADATA, *_OPTIONAL_METADATA})
    if unknown:
        raise MemoryInvalid(f"unknown metadata keys: {shown(unknown)}")
    num_parents = _meta_int(meta, "num_parents", 1, 1 << 20)
    task_type = _meta_choice(meta, "task_type", ("classification", "regression"))
    text_pairs = _meta_json(meta, "text_pairs", False)
    if not isinstance(text_pairs, bool):
        raise MemoryInvalid(f"metadata text_pairs must be true or false, found {shown(text_pairs)}")
    training = _meta_json(meta, "training", {})
    if not isinstance(training, dict):
        raise MemoryInvalid(f"metadata training must be a JSON object, found a JSON {json_type(training)}")
    num_layers = _meta_int(meta, "num_layers", 1, 256)
    # Absent (every file written before it existed): a memory after every layer.
    first_memory_layer = (
        _meta_int(meta, "first_memory_layer", 0, num_layers - 1) if "first_memory_layer" in meta else 0
    )
    return MemorySpec(
        num_layers=num_layers,
        hidden_size=_meta_int(meta, "hidden_size", 1, 1 << 16),
        num_parents=num_parents,
        num_children=_meta_int(meta, "num_children", 1, 1 << 16),
        top_k=_meta_int(meta, "top_k", 1, num_parents),
        temperature=_meta_float(meta, "temperature", *_TEMPERATURE_RANGE),
        task_type=task_type,  # type: ignore[arg-type]
        labels=_meta_labels(meta, task_type),
        pooling=_meta_choice(meta, "pooling", ("mean", "first")),  # type: ignore[arg-type]
        max_length=_meta_int(meta, "max_length", 1, 1 << 16),
        text_pairs=text_pairs,
        backbone_id=_meta_text(meta, "backbone_id"),
        backbone_fingerprint=_meta_text(meta, "backbone_fingerprint"),
        layernorm_names=_meta_layernorms(meta),
        dropout=_meta_float(meta, "dropout", 0.0, 1.0, default="0.1"),
        training=training,
        first_memory_layer=first_memory_layer,
    )


def check_backbone(spec: MemorySpec, backbone: BackboneIdentity) -> None:
    if spec.backbone_fingerprint != backbone.fingerprint:
        raise BackboneMismatch(
            f"memory was trained for backbone {shown(spec.backbone_id)} "
            f"(fingerprint {shown(spec.backbone_fingerprint[:16])}), this service runs {backbone.name!r} "
            f"(fingerprint {backbone.fingerprint[:16]})"
        )
    if (spec.num_layers, spec.hidden_size) != (backbone.num_layers, backbone.hidden_size):
        raise BackboneMismatch(
            f"memory has {spec.num_layers} layers of width {spec.hidden_size}, the backbone has "
            f"{backbone.num_layers} of width {backbone.hidden_size}"
        )
    if backbone.pooling is not None and spec.pooling != backbone.pooling:
        raise PoolingMismatch(
            f"memory was trained with {spec.pooling!r} pooling, this backbone pools with "
            f"{backbone.pooling!r}: its head would read states it was never trained on"
        )
    unknown = sorted(set(spec.layernorm_names) - set(backbone.layernorm_names))
    if unknown:
        raise BackboneMismatch(
            f"memory carries LayerNorms the backbone does not have: {', '.join(unknown[:4])}"
        )
    if spec.first_memory_layer and backbone.layernorm_layers:
        layer_of = dict(backbone.layernorm_layers)
        below = [name for name in spec.layernorm_names if layer_of.get(name, -1) < spec.first_memory_layer]
        if below:
            raise MemoryInvalid(
                f"memory has memories from layer {spec.first_memory_layer} up but carries LayerNorms "
                f"below it: {', '.join(below[:4])} (a task changes nothing below its first memory layer)"
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
            f"unexpected tensors: {', '.join(tensor_name(name) for name in extra[:8])}"
            + (f" ... ({len(extra)} in all)" if len(extra) > 8 else "")
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


PROBE_ROWS = 16
PROBE_SEED = 20261201


def check_probe(memory: TaskMemory, tensors: dict[str, torch.Tensor]) -> None:
    """Run the memory once on fixed hidden states (seeded, unit scale like a backbone's after its
    LayerNorms): every LayerNorm copy, each memory layer in turn and the head must give finite
    results, and so must the next normalisation of each (finite values near the float32 maximum
    pass `check_finite` but overflow there, and the task would answer NaN scores)."""
    spec, width = memory.spec, (memory.spec.hidden_size,)
    probe = torch.randn(PROBE_ROWS, spec.hidden_size, generator=torch.Generator().manual_seed(PROBE_SEED))
    with torch.no_grad():
        for name in spec.layernorm_names:
            override = memory.layernorm(name)
            assert override is not None, f"memory lacks its LayerNorm copy for {name}"
            normed = F.layer_norm(probe, width, override.weight, override.bias)
            _probe_finite(F.layer_norm(normed, width), f"LayerNorm {name}", tensors)
        hidden = probe
        for index, layer in memory.indexed_memory_layers():
            # memory_forward, not layer(): no inference cache is built for a memory that may be refused.
            update = memory_forward(
                hidden,
                layer.parent_keys,
                layer.child_keys,
                layer.child_values,
                layer.top_k,
                layer.temperature,
            ).update
            hidden = F.layer_norm(_probe_finite(hidden + update, f"memory layer {index}", tensors), width)
            _probe_finite(hidden, f"memory layer {index}", tensors)
        _probe_finite(memory.head(hidden), "the head", tensors)
        # The output layer reads tanh values in [-1, 1]: this bound holds for every input, not just
        # the probe's (logits of 1e38 pass the probe, and overflow on another input).
        out = memory.head.out
        bound = float((out.weight.double().abs().sum(dim=1) + out.bias.double().abs()).max())
        if bound > torch.finfo(torch.float32).max:
            raise MemoryInvalid(
                f"memory's head can give non-finite outputs: its outputs reach {bound:.3g} for some "
                "input, beyond float32 (in tensor head.out.weight or head.out.bias)"
            )


def _probe_finite(values: torch.Tensor, where: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if bool(torch.isfinite(values).all()):
        return values
    name, tensor = max(
        tensors.items(), key=lambda item: float(item[1].abs().max()) if item[1].numel() else 0.0
    )
    raise MemoryInvalid(
        f"memory gives non-finite outputs on a fixed probe input (at {where}): its values are finite "
        f"but too large (largest |value| {float(tensor.abs().max()):.3g}, in tensor {name})"
    )


def build_memory(spec: MemorySpec, tensors: dict[str, torch.Tensor]) -> TaskMemory:
    """The memory of a file's tensors: its modules are made on the meta device (no random init, no
    allocation) and the file's tensors are assigned as their parameters (no copy)."""
    with torch.device("meta"):
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
    memory.load_state_dict(state, strict=True, assign=True)
    memory.eval()
    memory.requires_grad_(False)
    return memory

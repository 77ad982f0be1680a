"""A corpus of hostile memory files, built from one valid memory file: every way an upload can lie.

`hostile_corpus(valid, limit)` returns named variants, each with the status the service must answer
and a phrase its error message must contain. The variants are built by editing the valid file at
the byte, header-JSON, metadata and tensor levels, so each one differs from a good upload in exactly
one way (the size variants excepted, which are about the upload limit itself).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import random
import struct
import zipfile
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

INVALID, MISMATCH, TOO_LARGE = 422, 409, 413
ERROR_TYPES = {INVALID: "memory_invalid", MISMATCH: "backbone_mismatch", TOO_LARGE: "payload_too_large"}


class Hostile(NamedTuple):
    """One hostile upload: what it is, its bytes, the status it must get, a phrase of its message."""

    name: str
    data: bytes
    status: int
    phrase: str
    multipart: bool = False  # sent as the `file` part of a multipart/form-data body, not a raw body

    @property
    def error_type(self) -> str:
        return ERROR_TYPES[self.status]


# ----------------------------------------------------------------------------------------- assembly


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A safetensors file -> (its header as a dict, its data section)."""
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def with_header_text(text: bytes, body: bytes = b"") -> bytes:
    """A file whose header is exactly `text` (any bytes), with its correct length prefix."""
    return struct.pack("<Q", len(text)) + text + body


def assemble(header: dict[str, Any], body: bytes) -> bytes:
    """A file with this header (as JSON, padded to 8 bytes as safetensors does) and data section."""
    text = json.dumps(header, separators=(",", ":")).encode()
    return with_header_text(text + b" " * (-len(text) % 8), body)


class Parts:
    """The valid file taken apart once; each method returns a new file with one thing changed."""

    def __init__(self, valid: bytes) -> None:
        self.valid = valid
        self.header, self.body = split(valid)
        self.metadata: dict[str, str] = dict(self.header["__metadata__"])
        self.tensors: dict[str, torch.Tensor] = load_safetensors(valid)
        self.names = sorted(self.tensors)
        self.by_offset = sorted(self.names, key=lambda n: self.header[n]["data_offsets"][0])

    def entries(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.header))  # a deep copy to edit

    def edit_header(self, edit: Callable[[dict[str, Any]], None], body: bytes | None = None) -> bytes:
        header = self.entries()
        edit(header)
        return assemble(header, self.body if body is None else body)

    def edit_offsets(self, name: str, begin: int, end: int) -> bytes:
        def edit(header: dict[str, Any]) -> None:
            header[name]["data_offsets"] = [begin, end]

        return self.edit_header(edit)

    def meta(self, **changes: str | None) -> bytes:
        """The same tensors, metadata keys set (or removed, with None); tensor bytes untouched."""

        def edit(header: dict[str, Any]) -> None:
            for key, value in changes.items():
                if value is None:
                    header["__metadata__"].pop(key, None)
                else:
                    header["__metadata__"][key] = value

        return self.edit_header(edit)

    def retensor(
        self, changes: dict[str, torch.Tensor | None] | None = None, **metadata: str | None
    ) -> bytes:
        """Tensors replaced, added or dropped (None), metadata edited; saved by safetensors itself."""
        tensors = dict(self.tensors)
        for name, tensor in (changes or {}).items():
            if tensor is None:
                tensors.pop(name)
            else:
                tensors[name] = tensor
        meta = {k: v for k, v in {**self.metadata, **metadata}.items() if v is not None}
        return save_safetensors(tensors, metadata=meta)


class _ExploitOnLoad:
    """Pickles to a call of os.getpid: harmless, but proof that loading it would run code."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.getpid, ())


def torch_saved(tensors: dict[str, torch.Tensor], *, zip_format: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensors, buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


def zipped(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


# ------------------------------------------------------------------------------------------ corpus


def hostile_corpus(valid: bytes, limit: int) -> list[Hostile]:
    """Hostile variants of `valid` (a memory file the service accepts), for a service whose upload
    limit is `limit` bytes (it must leave room for at least 8 bytes after the valid file)."""
    assert len(valid) + 8 <= limit, "the limit must leave room after the valid file"
    p = Parts(valid)
    meta = p.metadata
    parents, children = int(meta["num_parents"]), int(meta["num_children"])
    hidden, layers = int(meta["hidden_size"]), int(meta["num_layers"])
    labels = json.loads(meta["labels"])
    first, last = p.by_offset[0], p.by_offset[-1]
    last_begin, last_end = p.header[last]["data_offsets"]
    # Two tensors of one shape, `early` stored before `late`: `late` can claim `early`'s bytes.
    early, late = sorted(("layers.0.child_keys", "layers.0.child_values"), key=lambda n: p.by_offset.index(n))
    pk, bias, zeros = p.tensors["layers.0.parent_keys"].clone(), p.tensors["head.dense.bias"], torch.zeros
    nan, inf = p.tensors["layers.1.child_values"].clone(), p.tensors["head.dense.weight"].clone()
    nan[0, 0, 0], inf[3, 5] = float("nan"), float("inf")
    entries = p.entries()
    rng = random.Random(20240601)  # the corpus is the same on every run
    size = len(valid) - len(p.body) - 8
    header_text = valid[8 : 8 + size]  # a file that ends where its data section should begin

    def offsets_of(name: str) -> list[int]:
        return list(p.header[name]["data_offsets"])

    def duplicate_metadata() -> bytes:
        # A second __metadata__ after the first: a reader keeping the last one would see other values.
        text = json.dumps(entries, separators=(",", ":"))
        evil = json.dumps({**meta, "backbone_fingerprint": "0" * 64})
        return with_header_text(f'{text[:-1]},"__metadata__":{evil}}}'.encode(), p.body)

    def duplicate_label_key() -> bytes:
        inner = json.dumps(meta, separators=(",", ":"))
        text = json.dumps({k: v for k, v in entries.items() if k != "__metadata__"})
        injected = f'{inner[:-1]},"labels":"[\\"x\\", \\"y\\"]"}}'
        return with_header_text(f'{{"__metadata__":{injected},{text[1:]}'.encode(), p.body)

    def giant_shape(header: dict[str, Any]) -> None:
        begin, _ = header[first]["data_offsets"]
        header[first] = {
            "dtype": "F32",
            "shape": [1 << 40, 1 << 40, hidden],
            "data_offsets": [begin, begin + 4],
        }

    def shifted(header: dict[str, Any]) -> None:
        for name in p.names:
            begin, end = header[name]["data_offsets"]
            header[name]["data_offsets"] = [begin + 4, end + 4]

    fewer_layers = {
        f"layers.{layers - 1}.{part}": None for part in ("parent_keys", "child_keys", "child_values")
    }
    over_limit = valid + b"\0" * (limit + 1 - len(valid))

    corpus = [
        # --- not a safetensors file at all
        Hostile("empty (0-byte) file", b"", INVALID, "empty file"),
        Hostile("3 bytes: shorter than the length prefix", b"\x01\x02\x03", INVALID, "than the 8-byte"),
        Hostile("random bytes", rng.randbytes(4096), INVALID, "header declares"),
        Hostile("pickle with a code-running payload", pickle.dumps(_ExploitOnLoad(), protocol=4), INVALID,
                "pickle"),
        Hostile("torch.save (legacy pickle format)", torch_saved(p.tensors, zip_format=False), INVALID,
                "pickle"),
        Hostile("torch.save (zip format)", torch_saved(p.tensors, zip_format=True), INVALID, "zip archive"),
        Hostile("zip archive of a valid file", zipped("memory.safetensors", valid), INVALID, "zip archive"),
        Hostile("gzip of a valid file", gzip.compress(valid, mtime=0), INVALID, "gzip-compressed"),
        # --- the header: its length, its bytes, its JSON
        Hostile("header length prefix larger than the file", struct.pack("<Q", size + 100) + header_text,
                INVALID, f"truncated file: header declares {size + 100} bytes but only {size} follow"),
        Hostile("header length prefix of 2^62 bytes", struct.pack("<Q", 1 << 62) + valid[8:], INVALID,
                "header declares 4611686018427387904 bytes"),
        Hostile("header not JSON", with_header_text(b"this is not JSON at all!", p.body), INVALID,
                "header is not valid JSON"),
        Hostile("header JSON is an array, not an object", with_header_text(b"[1, 2, 3]"), INVALID,
                "header is a JSON array, not an object"),
        Hostile("header not UTF-8", with_header_text(b'{"\xff\xfe": 1}'), INVALID,
                "header is not UTF-8: invalid byte at offset 2"),
        Hostile("header nested 30,000 levels deep", with_header_text(b"[" * 30_000 + b"]" * 30_000),
                INVALID, "header is JSON nested too deeply"),
        Hostile("header with 50,000 empty objects", with_header_text(b'{"x":[' + b"{}," * 50_000 + b"{}]}"),
                INVALID, "header holds up to"),
        Hostile("header with a 5,000-digit integer", with_header_text(b'{"x":' + b"9" * 5000 + b"}"),
                INVALID, "has 5000 digits"),
        Hostile("header with NaN", p.edit_header(lambda h: h[first].update(shape=[float("nan")])), INVALID,
                "NaN is not a JSON number"),
        Hostile("metadata injection: a second __metadata__ key", duplicate_metadata(), INVALID,
                "key '__metadata__' appears twice"),
        Hostile("metadata injection: a metadata key given twice", duplicate_label_key(), INVALID,
                "key 'labels' appears twice"),
        # --- tensor entries and byte ranges
        Hostile("header entry not an object", p.edit_header(lambda h: h.update(x="hello")), INVALID,
                "tensor 'x': header entry is a JSON string"),
        Hostile("header entry with an unknown field", p.edit_header(lambda h: h[first].update(url="http://x")),
                INVALID, "has unknown fields ['url']"),
        Hostile("unsupported dtype", p.edit_header(lambda h: h[first].update(dtype="F8_E4M3")), INVALID,
                "unsupported dtype 'F8_E4M3'"),
        Hostile("negative dimension", p.edit_header(lambda h: h[first].update(shape=[-1, hidden])), INVALID,
                "is not a list of non-negative integers"),
        Hostile("boolean dimension", p.edit_header(lambda h: h[first].update(shape=[True, hidden])), INVALID,
                "is not a list of non-negative integers"),
        Hostile("nine dimensions", p.edit_header(lambda h: h[first].update(shape=[1] * 9)), INVALID,
                "shape has 9 dimensions (at most 8)"),
        Hostile("giant declared shape, tiny buffer", p.edit_header(giant_shape), INVALID,
                f"hold 4 bytes, its dtype and shape need {(1 << 80) * hidden * 4}"),
        Hostile("header lies: offsets hold 4 more bytes than the shape",
                p.edit_offsets(last, last_begin, last_end + 4), INVALID, "its dtype and shape need"),
        Hostile("data_offsets beyond the buffer", p.edit_offsets(last, last_end, 2 * last_end - last_begin),
                INVALID, f"truncated file: tensor {last!r} ends at byte"),
        Hostile("data_offsets out of order (end < begin)", p.edit_offsets(first, *offsets_of(first)[::-1]),
                INVALID, "are not 0 <= begin <= end"),
        Hostile("negative data_offsets", p.edit_offsets(first, -4, offsets_of(first)[1] - 4), INVALID,
                "are not 0 <= begin <= end"),
        Hostile("overlapping tensor byte ranges", p.edit_offsets(late, *offsets_of(early)), INVALID,
                "overlap tensor"),
        Hostile("gap before the first tensor", p.edit_header(shifted, body=b"\0" * 4 + p.body), INVALID,
                "gap of 4 bytes at byte 0"),
        Hostile("trailing garbage after the last tensor", valid + b"#!/bin/sh\n", INVALID,
                "10 bytes of trailing data after the last tensor"),
        Hostile("truncated to half", valid[: len(valid) // 2], INVALID, "truncated file"),
        Hostile("truncated by one byte", valid[:-1], INVALID, "truncated file"),
        # --- metadata: presence, types, format, values
        Hostile("no metadata (a plain safetensors file)", p.edit_header(lambda h: h.pop("__metadata__")),
                INVALID, "no spartan metadata"),
        Hostile("metadata is an array", p.edit_header(lambda h: h.update(__metadata__=["x"])), INVALID,
                "header __metadata__ is a JSON array"),
        Hostile("metadata value not a string", p.edit_header(lambda h: h["__metadata__"].update(top_k=2)),
                INVALID, "metadata 'top_k' is a JSON number, not a string"),
        Hostile("wrong format name", p.meta(format="safetensors"), INVALID, "metadata format='safetensors'"),
        Hostile("format version from the future", p.meta(format_version="2"), INVALID,
                "unsupported format version '2'"),
        Hostile("metadata lacks a key", p.meta(top_k=None), INVALID, "metadata lacks top_k"),
        Hostile("metadata injection: an unknown key", p.meta(__proto__='{"admin": true}'), INVALID,
                "unknown metadata keys: ['__proto__']"),
        Hostile("metadata injection: JSON smuggled after the labels", p.meta(labels='["a", "b"], "x": 1'),
                INVALID, "metadata labels is not valid JSON: Extra data"),
        Hostile("metadata injection: a label forging a log line", p.meta(labels=json.dumps(
                ["negative", "positive\n2024-06-01 ERROR admin logged in"])), INVALID,
                "has a control or surrogate character '\\n'"),
        Hostile("label with an unpaired surrogate", p.meta(labels='["\\ud800", "positive"]'), INVALID,
                "label 0 '\\ud800'"),
        Hostile("metadata JSON nested 5,000 levels deep", p.meta(training=nested(5000)), INVALID,
                "metadata training is JSON nested too deeply"),
        Hostile("metadata JSON nested 40 levels deep", p.meta(training=nested(40)), INVALID,
                "metadata training nests JSON more than 16 levels deep"),
        Hostile("metadata training not an object", p.meta(training="[1, 2]"), INVALID,
                "metadata training must be a JSON object"),
        Hostile("text_pairs not a boolean", p.meta(text_pairs='"yes"'), INVALID,
                "metadata text_pairs must be true or false"),
        Hostile("negative number of parents", p.meta(num_parents="-16"), INVALID,
                "metadata num_parents=-16 is out of range"),
        Hostile("absurd number of children", p.meta(num_children="99999999999"), INVALID,
                "metadata num_children=99999999999 is out of range"),
        Hostile("integer with an underscore", p.meta(num_parents="1_6"), INVALID,
                "metadata num_parents='1_6' is not an integer"),
        Hostile("top_k > number of parents", p.meta(top_k=str(parents + 1)), INVALID,
                f"metadata top_k={parents + 1} is out of range [1, {parents}]"),
        Hostile("max_length 0", p.meta(max_length="0"), INVALID, "metadata max_length=0 is out of range"),
        Hostile("temperature NaN", p.meta(temperature="nan"), INVALID,
                "metadata temperature='nan' is not a decimal number"),
        Hostile("temperature 1e-300 (softmax overflows)", p.meta(temperature="1e-300"), INVALID,
                "metadata temperature='1e-300' is out of range"),
        Hostile("dropout 7", p.meta(dropout="7"), INVALID, "metadata dropout='7' is out of range [0, 1]"),
        Hostile("one label for a classifier", p.meta(labels='["only"]'), INVALID,
                "at least 2 distinct labels"),
        Hostile("labels count mismatching the head", p.meta(labels=json.dumps([*labels, "extra"])), INVALID,
                f"tensor head.out.weight: expected shape [{len(labels) + 1}, {hidden}], "
                f"found [{len(labels)}, {hidden}]"),
        Hostile("layernorm name that is not a module name", p.meta(layernorms='["../../etc/passwd"]'),
                INVALID, "is not a module name"),
        # --- another backbone
        Hostile("wrong backbone fingerprint", p.meta(backbone_id="bert-base", backbone_fingerprint="0" * 64),
                MISMATCH, "memory was trained for backbone 'bert-base'"),
        Hostile("wrong hidden size", p.meta(hidden_size=str(hidden * 2)), MISMATCH,
                f"layers of width {hidden * 2}, the backbone has"),
        Hostile("wrong number of layers", p.retensor(fewer_layers, num_layers=str(layers - 1)), MISMATCH,
                f"memory has {layers - 1} layers"),
        Hostile("LayerNorm the backbone does not have", p.meta(layernorms='["pooler.LayerNorm"]'), MISMATCH,
                "LayerNorms the backbone does not have: pooler.LayerNorm"),
        # --- the tensors themselves
        Hostile("missing tensor", p.retensor({"head.out.bias": None}), INVALID,
                "missing tensors: head.out.bias"),
        Hostile("extra tensor", p.retensor({f"layers.{layers}.parent_keys": pk}), INVALID,
                f"unexpected tensors: layers.{layers}.parent_keys"),
        Hostile("tensor named like a path", p.retensor({"../x": torch.zeros(2)}), INVALID,
                "unexpected tensors: '../x'"),
        Hostile("float64 instead of float32", p.retensor({"head.dense.bias": bias.double()}),
                INVALID, "tensor head.dense.bias: expected dtype F32, found F64"),
        Hostile("int8 tensor", p.retensor({"layers.0.parent_keys": pk.to(torch.int8)}), INVALID,
                "tensor layers.0.parent_keys: expected dtype F32, found I8"),
        Hostile("shape off by one (parents)",
                p.retensor({"layers.0.parent_keys": zeros(parents + 1, hidden)}),
                INVALID, f"expected shape [{parents}, {hidden}], found [{parents + 1}, {hidden}]"),
        Hostile("shape off by one (width)",
                p.retensor({"layers.2.child_values": torch.zeros(parents, children, hidden - 1)}), INVALID,
                f"expected shape [{parents}, {children}, {hidden}], "
                f"found [{parents}, {children}, {hidden - 1}]"),
        Hostile("zero-size tensor", p.retensor({"head.out.bias": torch.zeros(0)}), INVALID,
                f"tensor head.out.bias: expected shape [{len(labels)}], found [0]"),
        Hostile("NaN in a tensor", p.retensor({"layers.1.child_values": nan}), INVALID,
                "tensor layers.1.child_values has 1 non-finite values"),
        Hostile("Inf in a tensor", p.retensor({"head.dense.weight": inf}), INVALID,
                "tensor head.dense.weight has 1 non-finite values"),
        # --- the upload limit
        Hostile("exactly at the limit, still invalid", valid + b"\0" * (limit - len(valid)), INVALID,
                f"{limit - len(valid)} bytes of trailing data"),
        Hostile("one byte over the limit", over_limit, TOO_LARGE,
                f"more than the limit of {limit} bytes"),
        Hostile("one byte over the limit, multipart", over_limit, TOO_LARGE,
                f"the memory file is {limit + 1} bytes, more than the limit of {limit}", multipart=True),
    ]  # fmt: skip
    names = [case.name for case in corpus]
    assert len(names) == len(set(names)), "corpus names must be unique"
    for case in corpus:  # the size variants aside, every variant must fit the limit to test the parser
        assert case.status == TOO_LARGE or len(case.data) <= limit, f"{case.name}: raise the limit"
    return corpus

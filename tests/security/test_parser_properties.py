"""Properties of the memory file parser (app/spartan/memfile.py), over inputs hypothesis generates:

* whatever the bytes, the parser answers a MemoryInvalid (or a memory), never another exception;
* every mutation of a valid file (bit flips, truncations, insertions, deletions, header JSON edits,
  tensor bytes) loads to a memory of the same shapes or is refused with a short, printable message;
* no input makes it allocate much more than its own size: tensors only for bytes the file holds,
  Python objects bounded by the header's caps.

Reproducible: derandomized (a fixed seed per test), no example database, bounded example counts.
"""

from __future__ import annotations

import json
import math
import re
import struct
import tracemalloc
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tiny_memories import BACKBONE, make_memory

import app.spartan.memfile as memfile
from app.errors import MemoryInvalid
from app.spartan.memfile import (
    MAX_HEADER_BYTES,
    MAX_HEADER_VALUES,
    BackboneIdentity,
    expected_shapes,
    load_memory,
    memory_to_bytes,
    parse_spec,
    read_header,
)
from app.spartan.memory import MemorySpec, TaskMemory

EXAMPLES = 300
PROPERTY = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # the same examples on every run and machine
    database=None,  # nothing written to .hypothesis/
    deadline=timedelta(seconds=2),  # a hang or a quadratic blow-up fails the example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
VALID = memory_to_bytes(make_memory(training={"dataset": "unit", "dev": {"accuracy": 0.5}}))
(VALID_HEADER_SIZE,) = struct.unpack("<Q", VALID[:8])
VALID_HEADER: dict[str, Any] = json.loads(VALID[8 : 8 + VALID_HEADER_SIZE])
VALID_BODY = VALID[8 + VALID_HEADER_SIZE :]
VALID_SHAPES = {name: tuple(t.shape) for name, t in load_memory(VALID, BACKBONE).state_dict().items()}
TENSOR_NAMES = sorted(name for name in VALID_HEADER if name != "__metadata__")
META_KEYS = sorted(VALID_HEADER["__metadata__"])


def with_header(text: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text + body


def check_refusal(err: MemoryInvalid) -> None:
    """A refusal's message is what a client and a log can take: non-empty, short, printable, UTF-8."""
    message = str(err)
    assert message, "empty message"
    assert len(message) <= 1000, f"{len(message)}-character message: {message[:200]}..."
    bad = [c for c in message if unicodedata.category(c) in ("Cc", "Cs")]
    assert not bad, f"control or surrogate characters {bad!r} in {message!r}"
    message.encode("utf-8")


def parse(data: bytes, backbone: BackboneIdentity | None = BACKBONE) -> TaskMemory | None:
    """load_memory, with a refusal checked and turned into None; any other exception propagates."""
    try:
        memory = load_memory(data, backbone)
    except MemoryInvalid as err:
        check_refusal(err)
        # Which check refused it, for --hypothesis-show-statistics: are the deep checks reached?
        event("refused: " + re.sub(r"'[^']*'|\[[^\]]*\]|\d+", "#", str(err))[:48])
        return None
    event("loaded")
    return memory


# ---------------------------------------------------------------------------------------- strategies

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
dims = st.one_of(
    st.integers(min_value=-2, max_value=16), st.integers(min_value=0, max_value=2**64), st.booleans()
)
tensor_entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(
            st.sampled_from(["F32", "F64", "F16", "I8", "BOOL", "U8", "F8_E4M3", ""]), json_values
        ),
        "shape": st.one_of(st.lists(dims, max_size=4), json_values),
        "data_offsets": st.one_of(
            st.lists(st.integers(min_value=-8, max_value=4096), max_size=3), json_values
        ),
    }
)
metadata_strings = st.one_of(
    st.text(max_size=16),
    st.integers(min_value=-(2**40), max_value=2**40).map(str),
    st.floats().map(repr),
    json_values.map(json.dumps),
    st.sampled_from(
        ["1", "2", "0", "-1", "1_6", " 4", "nan", "1e-300", "[]", "[1]", '["a","a"]', "true", "{}"]
    ),
)
metadata_dicts = st.dictionaries(
    st.one_of(st.sampled_from(META_KEYS), st.text(max_size=8)), metadata_strings, max_size=20
)


def _encode(value: Any, ascii_only: bool) -> bytes:
    # surrogatepass: hypothesis text may hold lone surrogates, which then become invalid UTF-8 bytes.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


headers = st.dictionaries(
    st.one_of(st.sampled_from(["__metadata__", *TENSOR_NAMES]), st.text(max_size=10)),
    st.one_of(tensor_entries, json_values, metadata_dicts),
    max_size=6,
)
header_files = st.builds(
    lambda header, ascii_only, body: with_header(_encode(header, ascii_only), body),
    st.one_of(headers, json_values),
    st.booleans(),
    st.binary(max_size=256),
)
prefixed_bytes = st.builds(
    lambda size, rest: struct.pack("<Q", size) + rest,
    st.one_of(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=0, max_value=600)),
    st.binary(max_size=600),
)
any_bytes = st.one_of(st.binary(max_size=4096), prefixed_bytes, header_files)


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    """A valid file changed in one of many ways, from one flipped bit to a rewritten header field."""
    kind = draw(
        st.sampled_from(["flip", "truncate", "insert", "delete", "body", "metadata", "entry", "keys"])
    )
    data = bytearray(VALID)
    if kind == "flip":
        for position, bit in draw(
            st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)), min_size=1, max_size=8)
        ):
            data[position] ^= 1 << bit
        return bytes(data)
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "insert":
        at = draw(st.integers(0, len(data)))
        return bytes(data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:])
    if kind == "delete":
        at = draw(st.integers(0, len(data) - 1))
        return bytes(data[:at] + data[at + draw(st.integers(1, 64)) :])
    if kind == "body":  # tensor bytes: NaN, Inf, or anything
        at = 8 + VALID_HEADER_SIZE + draw(st.integers(0, len(VALID_BODY) - 4))
        patch = draw(
            st.one_of(
                st.sampled_from([struct.pack("<f", math.nan), struct.pack("<f", math.inf)]),
                st.binary(min_size=4, max_size=4),
            )
        )
        data[at : at + 4] = patch
        return bytes(data)
    header = json.loads(json.dumps(VALID_HEADER))
    if kind == "metadata":
        key = draw(st.one_of(st.sampled_from(META_KEYS), st.text(max_size=8)))
        if draw(st.booleans()):
            header["__metadata__"][key] = draw(metadata_strings)
        else:
            header["__metadata__"].pop(key, None)
    elif kind == "entry":
        name = draw(st.sampled_from(TENSOR_NAMES))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        replacement = draw(st.one_of(st.just(None), json_values, st.lists(dims, max_size=4)))
        if replacement is None:
            del header[name][field]
        else:
            header[name][field] = replacement
    else:  # rename, drop or add a top-level key
        name = draw(st.sampled_from(["__metadata__", *TENSOR_NAMES]))
        entry = header.pop(name)
        action = draw(st.sampled_from(["rename", "drop", "add"]))
        if action != "drop":
            header[draw(st.text(max_size=12))] = entry
        if action == "add":
            header[name] = entry
    text = _encode(header, draw(st.booleans()))
    return with_header(text + b" " * (-len(text) % 8), VALID_BODY)


# ---------------------------------------------------------------------------------------- properties


@PROPERTY
@given(any_bytes)
def test_arbitrary_bytes_get_memory_invalid_or_a_memory(data: bytes) -> None:
    parse(data)
    parse(data, backbone=None)
    try:
        read_header(data)
    except MemoryInvalid as err:
        check_refusal(err)


@PROPERTY
@given(metadata_dicts)
def test_arbitrary_metadata_gets_memory_invalid_or_a_spec(metadata: dict[str, str]) -> None:
    for candidate in (metadata, {**VALID_HEADER["__metadata__"], **metadata}):
        try:
            spec = parse_spec(candidate)
        except MemoryInvalid as err:
            check_refusal(err)
        else:
            assert 1 <= spec.top_k <= spec.num_parents
            assert 1e-3 <= spec.temperature <= 1e3
            assert 0 <= spec.dropout <= 1


@PROPERTY
@given(mutations())
def test_mutations_of_a_valid_file_load_with_the_same_shapes_or_are_refused(data: bytes) -> None:
    memory = parse(data)
    if memory is not None:
        shapes = {name: tuple(t.shape) for name, t in memory.state_dict().items()}
        assert shapes == VALID_SHAPES
        assert all(bool(torch.isfinite(t).all()) for t in memory.state_dict().values())


# ---------------------------------------------------------------------------------------- allocation

HEAP_FACTOR, HEAP_SLACK = 32, 1 << 20


@contextmanager
def allocation_guard(data: bytes) -> Iterator[list[str]]:
    """Fail if the parser builds tensors for more bytes than `data` holds; yields the calls it saw."""
    calls: list[str] = []
    real_memory, real_load = memfile.TaskMemory, memfile.load_safetensors

    def task_memory(spec: MemorySpec) -> TaskMemory:
        declared = 4 * sum(math.prod(shape) for shape in expected_shapes(spec).values())
        assert declared <= len(data), f"TaskMemory of {declared} bytes built from a {len(data)}-byte file"
        calls.append("TaskMemory")
        return real_memory(spec)

    def load_tensors(raw: bytes) -> dict[str, torch.Tensor]:
        calls.append("load_safetensors")
        tensors = real_load(raw)
        allocated = sum(t.numel() * t.element_size() for t in tensors.values())
        assert allocated <= len(data), f"{allocated} bytes of tensors from a {len(data)}-byte file"
        return tensors

    with (
        mock.patch.object(memfile, "TaskMemory", task_memory),
        mock.patch.object(memfile, "load_safetensors", load_tensors),
    ):
        yield calls


def heap_peak(parse_call: Callable[[], object]) -> int:
    """Peak bytes of Python heap allocated while `parse_call` runs."""
    tracemalloc.start()
    try:
        parse_call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def refusal(data: bytes, backbone: BackboneIdentity | None) -> Callable[[], None]:
    def refuse() -> None:
        with pytest.raises(MemoryInvalid):
            load_memory(data, backbone)

    return refuse


@PROPERTY
@given(st.one_of(mutations(), any_bytes))
def test_no_input_allocates_much_more_than_its_size(data: bytes) -> None:
    with allocation_guard(data):
        peak = heap_peak(lambda: parse(data))
    assert peak <= HEAP_FACTOR * len(data) + HEAP_SLACK, f"{peak} bytes of heap for a {len(data)}-byte input"


def giant_declarations() -> dict[str, bytes]:
    meta = dict(VALID_HEADER["__metadata__"])
    entry = {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}
    tensor = with_header(_encode({"__metadata__": meta, "x": entry}, True), bytes(16))
    # A self-consistent spec of a 2^20-parent, 2^16-wide memory: every shape as declared, no bytes.
    huge = {**meta, "num_parents": str(1 << 20), "hidden_size": str(1 << 16), "num_layers": "2"}
    header: dict[str, Any] = {"__metadata__": huge}
    for name, shape in expected_shapes(parse_spec(huge)).items():
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [0, 4 * math.prod(shape)]}
    memory = with_header(_encode(header, True), bytes(64))
    return {"a 2^80-element tensor in 16 bytes": tensor, "a 1M-parent memory in 64 bytes": memory}


GIANT = giant_declarations()


@pytest.mark.parametrize("case", sorted(GIANT))
def test_giant_declared_shapes_are_refused_before_any_tensor_is_built(case: str) -> None:
    data = GIANT[case]
    with allocation_guard(data) as calls:
        peak = heap_peak(refusal(data, BACKBONE))
    assert calls == [], f"{case}: {calls} ran before the refusal"
    assert peak <= 4 * len(data) + (64 << 10), f"{case}: {peak} bytes of heap"


WORST_HEADERS = {
    "1 MB of empty objects": b'{"x":[' + b"{}," * (MAX_HEADER_BYTES // 3 - 4) + b"{}]}",
    "tensor names at the value cap": (
        b"{" + b",".join(b'"t%07d":0' % i for i in range(MAX_HEADER_VALUES - 1)) + b"}"
    ),
    "numbers at the value cap": b'{"x":[' + b",".join([b"1.5e300"] * (MAX_HEADER_VALUES - 2)) + b"]}",
}


@pytest.mark.parametrize("case", sorted(WORST_HEADERS))
def test_the_worst_headers_cost_a_few_megabytes_at_most(case: str) -> None:
    text = WORST_HEADERS[case]
    assert len(text) <= MAX_HEADER_BYTES
    data = with_header(text, b"")
    peak = heap_peak(refusal(data, None))
    assert peak <= 8 << 20, f"{case}: {peak} bytes of heap for a {len(data)}-byte file"


# A header size's first bytes can be another format's magic number: pickle protocols 2-5
# (b"\x80\x02".."\x80\x05"), zip (b"PK"), gzip (b"\x1f\x8b"). Such a valid file must still load.
MAGIC_HEADER_SIZES = [0x0280 + 65536, 0x0380 + 65536, 0x0480 + 65536, 0x0580 + 65536, 0x4B50, 0x8B1F]


@pytest.mark.parametrize("size", MAGIC_HEADER_SIZES, ids=hex)
def test_a_valid_file_is_never_mistaken_for_another_format(size: int) -> None:
    text = VALID[8 : 8 + VALID_HEADER_SIZE].rstrip(b" ")
    data = with_header(text + b" " * (size - len(text)), VALID_BODY)
    memory = load_memory(data, BACKBONE)
    assert {name: tuple(t.shape) for name, t in memory.state_dict().items()} == VALID_SHAPES

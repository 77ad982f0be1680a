"""A writer to be killed: uploads the given memory files to one task through a Registry, round and
round, until it is killed with -9. Run by test_crash_safety.py as a child process.

usage: crash_writer.py <task> <file> [<file> ...]
The store is the service's own, from the SPARTAN_* environment (SPARTAN_MEMORY_DIR, or SPARTAN_STORE=s3
with its S3 settings), built by the same factory the service uses.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from app.metrics import Metrics
from app.registry.factory import open_store
from app.registry.registry import Registry
from app.settings import Settings
from app.spartan.memfile import BackboneIdentity, parse_spec, read_header


def identity_of(data: bytes) -> BackboneIdentity:
    spec = parse_spec(read_header(data)["__metadata__"])
    return BackboneIdentity(spec.backbone_fingerprint, spec.num_layers, spec.hidden_size, spec.backbone_id)


def main() -> None:
    task, *paths = sys.argv[1:]
    files = [Path(p).read_bytes() for p in paths]
    store = open_store(Settings())
    write = store.write

    def announced_write(task: str, data: bytes, *, expected: str | None) -> object:
        print("write", flush=True)  # lets the test aim a kill into the store write itself
        return write(task, data, expected=expected)

    store.write = announced_write  # type: ignore[method-assign]
    registry = Registry(store, identity_of(files[0]), metrics=Metrics())
    print("ready", flush=True)
    for data in itertools.cycle(files):
        registry.put(task, data, replace=True)


if __name__ == "__main__":
    main()

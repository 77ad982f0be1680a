"""A writer to be killed: uploads the given memory files to one task through a Registry, round and
round, until it is killed with -9. Run by test_crash_safety.py as a child process.

usage: crash_writer.py <store: local|s3> <location> <task> <file> [<file> ...]
  local: location is the store folder; s3: location is JSON {"endpoint", "bucket", "prefix", "key",
  "secret"}.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from app.metrics import Metrics
from app.registry.registry import Registry
from app.registry.store import LocalFolderStore, MemoryStore
from app.spartan.memfile import BackboneIdentity, parse_spec, read_header


def open_store(kind: str, location: str) -> MemoryStore:
    if kind == "local":
        return LocalFolderStore(Path(location))
    import boto3
    from botocore.config import Config

    from app.registry.s3store import S3Store

    where = json.loads(location)
    client = boto3.client("s3", endpoint_url=where["endpoint"], region_name="us-east-1",
                          aws_access_key_id=where["key"], aws_secret_access_key=where["secret"],
                          config=Config(s3={"addressing_style": "path"}))  # fmt: skip
    return S3Store(client, where["bucket"], where["prefix"])


def identity_of(data: bytes) -> BackboneIdentity:
    spec = parse_spec(read_header(data)["__metadata__"])
    return BackboneIdentity(spec.backbone_fingerprint, spec.num_layers, spec.hidden_size, spec.backbone_id)


def main() -> None:
    kind, location, task, *paths = sys.argv[1:]
    files = [Path(p).read_bytes() for p in paths]
    store = open_store(kind, location)
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

"""Writers to be killed: each uploads the given memory files to one task through a Registry, round and
round, until it is killed with -9. Run by test_crash_safety.py as a child process.

usage: crash_writer.py <task> <file> [<file> ...]
The store is the service's own, from the SPARTAN_* environment (SPARTAN_MEMORY_DIR, or SPARTAN_STORE=s3
with its S3 settings), built by the same factory the service uses.

Protocol (stdin/stdout lines): each `fork` starts one writer, a forked child that prints `ready <pid>`,
then `write` before each store write, until it is killed; `reap <pid>` waits for that child and answers
`reaped`. Forking from this parent, which imported torch and the registry once, makes a writer start in
milliseconds instead of the two seconds of a fresh interpreter; the child is a separate process all the
same (its own store connection, its own file handles), so a kill -9 cuts it as it would cut a service.
"""

from __future__ import annotations

import itertools
import os
import sys
import traceback
from pathlib import Path

from app.metrics import Metrics
from app.registry.factory import open_store
from app.registry.registry import Registry
from app.settings import Settings
from app.spartan.memfile import BackboneIdentity, parse_spec, read_header


def identity_of(data: bytes) -> BackboneIdentity:
    spec = parse_spec(read_header(data)["__metadata__"])
    return BackboneIdentity(spec.backbone_fingerprint, spec.num_layers, spec.hidden_size, spec.backbone_id)


def upload_until_killed(task: str, files: list[bytes]) -> None:
    store = open_store(Settings())  # built after the fork: nothing is shared with the parent
    write = store.write

    def announced_write(task: str, data: bytes, *, expected: str | None) -> object:
        print("write", flush=True)  # lets the test aim a kill into the store write itself
        return write(task, data, expected=expected)

    store.write = announced_write  # type: ignore[method-assign]
    registry = Registry(store, identity_of(files[0]), metrics=Metrics())
    print(f"ready {os.getpid()}", flush=True)
    for data in itertools.cycle(files):
        registry.put(task, data, replace=True)


def main() -> None:
    task, *paths = sys.argv[1:]
    files = [Path(p).read_bytes() for p in paths]
    for line in sys.stdin:
        command, *argument = line.split()
        if command == "fork":
            if os.fork() == 0:
                try:
                    upload_until_killed(task, files)
                except BaseException:
                    traceback.print_exc()
                    print("failed", flush=True)  # the test reads this instead of waiting forever
                finally:
                    os._exit(1)  # only reached if the writer failed: never run the parent's loop
        elif command == "reap":
            os.waitpid(int(argument[0]), 0)
            print("reaped", flush=True)


if __name__ == "__main__":
    main()

"""Crash safety of uploads: a writer process is killed with -9 at random moments while it uploads
memories (at least 16 kills on the local folder, 16 on a real S3 server, more until the kills have
replaced the stored version at least once). After every kill the store must hold
a complete, valid version of the task (the old or the new one, never a mix, never nothing), and a
registry starting on it must serve exactly that version and leave no partial file behind.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from procs import ROOT

from app.metrics import Metrics
from app.registry.registry import Registry
from app.registry.s3store import S3Store
from app.registry.store import LocalFolderStore, MemoryStore
from app.spartan.memfile import BackboneIdentity, memory_to_bytes
from app.spartan.memory import MemorySpec, TaskMemory

pytestmark = pytest.mark.slow

# At least MIN_KILLS per store; more, up to MAX_KILLS, until two versions were stored: by timing alone,
# 16 kills sometimes never let a replace through (1 distinct version), and the run proved nothing.
MIN_KILLS, MAX_KILLS = 16, 64
IDENTITY = BackboneIdentity(fingerprint="crash-fp", num_layers=6, hidden_size=256, name="crash")


def big_memory(seed: int) -> bytes:
    """A 2.7 MB memory (not a toy file: its write takes long enough for kills to land inside it)."""
    torch.manual_seed(seed)
    spec = MemorySpec(num_layers=6, hidden_size=256, num_parents=64, num_children=3, top_k=8,
                      labels=("no", "yes"), backbone_id="crash", backbone_fingerprint="crash-fp")  # fmt: skip
    return memory_to_bytes(TaskMemory(spec))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("versions")
    paths = []
    for seed in range(3):
        path = folder / f"v{seed}.safetensors"
        path.write_bytes(big_memory(seed))
        paths.append(path)
    return paths


class Writers:
    """The parent of the writers (tests/reliability/crash_writer.py): it forks a fresh writer process per
    kill, so dozens of kills do not pay as many interpreter and torch start-ups."""

    def __init__(self, store_env: dict[str, str], versions: list[Path]) -> None:
        command = [sys.executable, str(ROOT / "tests" / "reliability" / "crash_writer.py"), "task"]
        env = {"PYTHONPATH": str(ROOT), **store_env}  # the writers' store comes from these SPARTAN_* settings
        self.parent = subprocess.Popen(
            [*command, *map(str, versions)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self.writer: int | None = None  # the live writer's pid, killed on close if a test failed mid-way

    def command(self, line: str) -> None:
        assert self.parent.stdin is not None
        self.parent.stdin.write(f"{line}\n".encode())
        self.parent.stdin.flush()

    def read(self) -> str:
        assert self.parent.stdout is not None
        return self.parent.stdout.readline().decode().strip()

    def kill_one_at_random(self, rng: random.Random) -> None:
        """Start a writer and kill -9 it at a random moment: half the time anywhere in its upload loop
        (20-600 ms after start), half the time 0-5 ms into one of its store writes (the critical window,
        too short to hit often by chance)."""
        self.command("fork")
        ready, _, pid = self.read().partition(" ")
        assert ready == "ready", f"the writer did not start: {ready!r} (its traceback is on stderr)"
        self.writer = int(pid)
        if rng.random() < 0.5:
            time.sleep(rng.uniform(0.02, 0.6))
        else:
            for _ in range(rng.randint(1, 3)):
                assert self.read() == "write"
            time.sleep(rng.uniform(0, 0.005))
        os.kill(int(pid), signal.SIGKILL)
        self.command(f"reap {pid}")
        while (line := self.read()) != "reaped":  # "write" lines printed before the kill landed
            assert line == "write", f"unexpected line from the writers: {line!r}"
        self.writer = None

    def close(self) -> None:
        if self.writer is not None:  # a writer outlives its parent: it would upload forever
            os.kill(self.writer, signal.SIGKILL)
        self.parent.kill()
        self.parent.wait(10)
        for pipe in (self.parent.stdin, self.parent.stdout):
            if pipe is not None:
                pipe.close()


def check_store_after_crash(store: MemoryStore, allowed: set[str]) -> str | None:
    """The task's stored version (one of `allowed`, complete and valid), served as such by a fresh
    registry; None if the writer died before its first upload finished."""
    registry = Registry(store, IDENTITY, metrics=Metrics())
    registry.refresh_when_reachable(10)  # what a restarted replica does: recover, then list
    listing = store.scan()
    assert set(listing) <= {"task"}, f"foreign or partial entries visible: {sorted(listing)}"
    if not listing:
        return None
    data, _ = store.read("task")
    assert sha(data) in allowed, "the stored file is none of the uploaded versions: a partial or mixed write"
    served = registry.resolve("task")  # fully validated, or TaskUnavailable
    assert served.version == sha(data)
    return served.version


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_kill_9_during_uploads_never_leaves_a_partial_or_missing_version(
    kind: str, versions: list[Path], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    allowed = {sha(path.read_bytes()) for path in versions}
    store: MemoryStore
    location = tmp_path / "store"
    if kind == "local":
        store_env = {"SPARTAN_MEMORY_DIR": str(location)}
        store = LocalFolderStore(location)
    else:
        seaweed: Any = request.getfixturevalue("seaweed")
        prefix = f"crash-{uuid.uuid4().hex[:8]}/"
        store_env = seaweed.settings_env(seaweed.bucket, prefix)
        store = S3Store(seaweed.client(), seaweed.bucket, prefix)
    rng = random.Random(f"crash-{kind}")
    seen: list[str | None] = []
    mid_write = 0  # kills that left a partial temp file (local store: the write was cut mid-way)
    writers = Writers(store_env, versions)
    request.addfinalizer(writers.close)
    while len(seen) < MIN_KILLS or (len({v for v in seen if v}) < 2 and len(seen) < MAX_KILLS):
        writers.kill_one_at_random(rng)
        if kind == "local":
            mid_write += any(location.glob("*.tmp"))
        seen.append(check_store_after_crash(store, allowed))
        if kind == "local":
            leftovers = [p.name for p in location.iterdir() if p.name.endswith(".tmp")]
            assert leftovers == [], f"partial files left after recovery: {leftovers}"
        assert seen[-1] is not None or all(v is None for v in seen), "a version vanished after a crash"
    distinct = len({v for v in seen if v})
    cut = f", {mid_write} cut a write mid-way (a temp file was left)" if kind == "local" else ""
    print(f"\n{kind}: {len(seen)} kills, {distinct} distinct versions stored after them{cut}")
    assert distinct >= 2, "the kills never interrupted a replace: the test proved nothing"

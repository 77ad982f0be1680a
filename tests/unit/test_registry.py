"""The registry over a local folder: discovery, lazy loading, LRU, pinning, safe swaps, store sync.

Tiny memories (2 layers of width 8) on a made-up backbone identity: no model is needed here.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as save_safetensors

from app.errors import (
    BackboneMismatch,
    InvalidTaskName,
    MemoryConflict,
    MemoryInvalid,
    PoolingMismatch,
    TaskNotFound,
    TaskUnavailable,
)
from app.metrics import Metrics
from app.registry.names import validate_task_name
from app.registry.records import check_replace, memory_nbytes
from app.registry.registry import Registry, RegistryConfig
from app.registry.store import LocalFolderStore
from app.settings import Settings
from app.spartan.memfile import BackboneIdentity, load_memory, memory_tensors, memory_to_bytes, spec_metadata
from app.spartan.memory import MemorySpec, TaskMemory

IDENTITY = BackboneIdentity(fingerprint="tiny-fp", num_layers=2, hidden_size=8, name="tiny")


def tiny_memory(
    seed: int = 0, fingerprint: str = "tiny-fp", labels: tuple[str, ...] = ("no", "yes")
) -> bytes:
    torch.manual_seed(seed)
    spec = MemorySpec(
        num_layers=2,
        hidden_size=8,
        num_parents=4,
        num_children=2,
        top_k=2,
        labels=labels,
        backbone_id="tiny",
        backbone_fingerprint=fingerprint,
    )
    return memory_to_bytes(TaskMemory(spec))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def probe_outputs(memory: TaskMemory) -> torch.Tensor:
    """The memory's layers and head on fixed hidden states: what serving computes with it."""
    hidden = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in memory.memory_layers():
            hidden = hidden + layer(hidden).update
        return memory.head(hidden)


def store_files(folder: Path) -> list[str]:
    """The folder's files but the store's lock file (which stays, empty, by design)."""
    return sorted(p.name for p in folder.iterdir() if p.name != LocalFolderStore.LOCK_NAME)


def write(folder: Path, task: str, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task}.safetensors"
    path.write_bytes(data)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "memories"


def make_registry(folder: Path, **kwargs) -> Registry:
    registry = Registry(LocalFolderStore(folder), IDENTITY, RegistryConfig(**kwargs), metrics=Metrics())
    registry.refresh()
    return registry


def loads(registry: Registry, source: str = "store", outcome: str = "ok") -> float:
    value = registry.metrics.registry.get_sample_value(
        "spartan_memory_loads_total", {"source": source, "outcome": outcome}
    )
    return value or 0.0


def test_scan_registers_tasks_without_loading_them(folder: Path) -> None:
    data = tiny_memory(1)
    write(folder, "alpha", data)
    write(folder, "beta", tiny_memory(2, labels=("a", "b", "c")))
    registry = make_registry(folder)
    infos = {info.name: info for info in registry.list()}
    assert set(infos) == {"alpha", "beta"}
    assert infos["alpha"].status == "on_disk"
    assert infos["alpha"].version == sha(data)
    assert infos["alpha"].file_bytes == len(data)
    assert infos["beta"].labels == ("a", "b", "c")
    assert registry.loaded_count == 0


def test_resolve_loads_once_then_serves_the_resident_memory(folder: Path) -> None:
    data = tiny_memory(1)
    write(folder, "alpha", data)
    registry = make_registry(folder)
    assert registry.resolve_loaded("alpha") is None
    memory = registry.resolve("alpha")
    assert memory.version == sha(data)
    assert registry.resolve("alpha") is memory
    assert registry.resolve_loaded("alpha") is memory
    info = registry.info("alpha")
    assert info.status == "loaded"
    assert info.memory_bytes == memory_nbytes(memory) > 0
    assert info.load_seconds is not None
    assert loads(registry) == 1


class FastPathCounter(Registry):
    """Notes each thread that found the task cold (resolve's lock-free fast path said None)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cold_seen: set[int] = set()
        self.all_cold = threading.Event()
        self.threads = 0

    def resolve_loaded(self, task: str) -> TaskMemory | None:
        memory = super().resolve_loaded(task)
        if memory is None:
            self.cold_seen.add(threading.get_ident())
            if len(self.cold_seen) >= self.threads:
                self.all_cold.set()
        return memory


class ReadAfter(LocalFolderStore):
    """A store whose reads wait until `ready` is set: a slow store, deterministically."""

    def __init__(self, root: Path, ready: threading.Event) -> None:
        super().__init__(root)
        self.ready = ready

    def read(self, task: str) -> tuple[bytes, Any]:
        assert self.ready.wait(timeout=30), "the threads never all found the task cold"
        return super().read(task)


def test_concurrent_resolves_of_a_cold_task_load_it_once(folder: Path) -> None:
    # The race is forced: the first load's read waits until every thread has found the task cold,
    # so all 8 are past the fast path and contend for the load (without the task lock: 8 loads).
    write(folder, "alpha", tiny_memory(1))
    opened, ready = threading.Event(), threading.Event()
    opened.set()
    store = ReadAfter(folder, opened)
    registry = FastPathCounter(store, IDENTITY, metrics=Metrics())
    registry.refresh()  # registers the task (its header is read) without loading it
    store.ready = registry.all_cold = ready
    registry.threads = 8
    results: list[TaskMemory] = []
    threads = [threading.Thread(target=lambda: results.append(registry.resolve("alpha"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert len({id(memory) for memory in results}) == 1
    assert loads(registry) == 1


def test_unknown_task_is_not_found(folder: Path) -> None:
    registry = make_registry(folder)
    with pytest.raises(TaskNotFound):
        registry.resolve("nope")
    with pytest.raises(TaskNotFound):
        registry.info("nope")
    assert registry.list() == []


def test_lru_evicts_the_least_recently_used_by_count(folder: Path) -> None:
    for index, name in enumerate("abc"):
        write(folder, name, tiny_memory(index))
    registry = make_registry(folder, max_loaded=2)
    registry.resolve("a")
    registry.resolve("b")
    registry.resolve("a")  # b is now the least recently used
    registry.resolve("c")
    assert registry.resolve_loaded("b") is None
    assert registry.resolve_loaded("a") is not None
    assert registry.resolve_loaded("c") is not None
    assert registry.loaded_count == 2
    assert registry.metrics.registry.get_sample_value("spartan_memory_evictions_total") == 1


def test_lru_evicts_by_bytes(folder: Path) -> None:
    for index, name in enumerate("abc"):
        write(folder, name, tiny_memory(index))
    one = memory_nbytes(make_registry(folder).resolve("a"))
    registry = make_registry(folder, max_loaded_bytes=2 * one)
    for name in "abc":
        registry.resolve(name)
    assert registry.loaded_bytes == 2 * one
    assert registry.resolve_loaded("a") is None


def test_pinned_tasks_are_never_evicted(folder: Path) -> None:
    for index, name in enumerate("abcd"):
        write(folder, name, tiny_memory(index))
    registry = make_registry(folder, max_loaded=2, pinned=["a"])
    registry.load_pinned()
    for name in "bcd":
        registry.resolve(name)
    assert registry.resolve_loaded("a") is not None
    assert registry.info("a").pinned
    assert registry.loaded_count == 2


def test_an_evicted_memory_still_serves_the_request_holding_it(folder: Path) -> None:
    write(folder, "a", tiny_memory(1))
    write(folder, "b", tiny_memory(2))
    registry = make_registry(folder, max_loaded=1)
    held = registry.resolve("a")
    before = probe_outputs(held)
    registry.resolve("b")
    assert registry.resolve_loaded("a") is None
    # Eviction only forgets the memory: the request holding it still computes exactly what the file
    # holds (nothing was freed, zeroed or moved under it).
    assert torch.equal(probe_outputs(held), before)
    assert torch.equal(before, probe_outputs(load_memory(tiny_memory(1), IDENTITY)))


def test_put_creates_then_refuses_to_overwrite_silently(folder: Path) -> None:
    registry = make_registry(folder)
    first, second = tiny_memory(1), tiny_memory(2)
    result = registry.put("alpha", first)
    assert result.created
    assert result.info.version == sha(first)
    assert (folder / "alpha.safetensors").read_bytes() == first
    with pytest.raises(MemoryConflict, match="already exists"):
        registry.put("alpha", second)
    with pytest.raises(MemoryConflict, match="If-Match"):
        registry.put("alpha", second, if_match="0" * 64)
    assert registry.resolve("alpha").version == sha(first)
    replaced = registry.put("alpha", second, if_match=sha(first))
    assert not replaced.created
    assert registry.resolve("alpha").version == sha(second)
    assert registry.put("alpha", first, replace=True).info.version == sha(first)
    assert registry.put("alpha", second, if_match="*").info.version == sha(second)


def test_if_match_on_a_new_task_is_a_conflict(folder: Path) -> None:
    registry = make_registry(folder)
    with pytest.raises(MemoryConflict, match="does not exist"):
        registry.put("alpha", tiny_memory(1), if_match="*")
    assert registry.list() == []


def test_put_replaces_a_file_that_appeared_in_the_store_since_the_last_poll(folder: Path) -> None:
    registry = make_registry(folder)
    write(folder, "alpha", tiny_memory(1))
    with pytest.raises(MemoryConflict):
        registry.put("alpha", tiny_memory(2))


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"not a memory file", MemoryInvalid),
        (tiny_memory(3)[:100], MemoryInvalid),
        (tiny_memory(3, fingerprint="other-backbone"), BackboneMismatch),
    ],
)
def test_a_bad_upload_changes_nothing(folder: Path, data: bytes, error: type[Exception]) -> None:
    good = tiny_memory(1)
    registry = make_registry(folder)
    registry.put("alpha", good)
    with pytest.raises(error):
        registry.put("alpha", data, replace=True)
    assert registry.resolve("alpha").version == sha(good)
    assert (folder / "alpha.safetensors").read_bytes() == good
    assert store_files(folder) == ["alpha.safetensors"]  # no temp file left
    assert loads(registry, "upload", "invalid") == 1


def test_refresh_picks_up_added_changed_and_removed_files(folder: Path) -> None:
    write(folder, "alpha", tiny_memory(1))
    registry = make_registry(folder)
    resident = registry.resolve("alpha")
    write(folder, "beta", tiny_memory(2))
    changed = tiny_memory(3)
    write(folder, "alpha", changed)
    registry.refresh()
    assert {info.name for info in registry.list()} == {"alpha", "beta"}
    swapped = registry.resolve_loaded("alpha")  # a resident task is swapped at once, not evicted
    assert swapped is not None
    assert swapped is not resident
    assert swapped.version == sha(changed)
    (folder / "beta.safetensors").unlink()
    registry.refresh()
    assert {info.name for info in registry.list()} == {"alpha"}


def test_a_bad_file_dropped_in_the_store_leaves_the_old_version_serving(folder: Path) -> None:
    good = tiny_memory(1)
    write(folder, "alpha", good)
    registry = make_registry(folder)
    registry.resolve("alpha")
    write(folder, "alpha", b"garbage")
    registry.refresh()
    assert registry.resolve("alpha").version == sha(good)
    info = registry.info("alpha")
    assert info.status == "loaded"
    assert info.loaded_version == sha(good)
    assert info.version == sha(b"garbage")
    assert info.error is not None
    assert "safetensors" in info.error


def test_a_bad_file_of_a_cold_task_is_unavailable_with_the_reason(folder: Path) -> None:
    write(folder, "alpha", tiny_memory(1, fingerprint="someone-else"))
    registry = make_registry(folder)
    assert registry.info("alpha").status == "invalid"
    with pytest.raises(TaskUnavailable, match="trained for backbone"):
        registry.resolve("alpha")


def test_a_file_added_after_the_last_poll_is_found_on_request(folder: Path) -> None:
    registry = make_registry(folder)
    data = tiny_memory(1)
    write(folder, "late", data)
    assert registry.resolve("late").version == sha(data)


def test_polling_thread_picks_up_new_files(folder: Path) -> None:
    folder.mkdir()
    registry = make_registry(folder)
    registry.start_polling(0.02)
    try:
        write(folder, "alpha", tiny_memory(1))
        deadline = time.monotonic() + 5
        while not registry.list() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [info.name for info in registry.list()] == ["alpha"]
    finally:
        registry.stop_polling()


def test_delete_removes_the_file_and_frees_the_memory(folder: Path) -> None:
    registry = make_registry(folder)
    registry.put("alpha", tiny_memory(1))
    registry.delete("alpha")
    assert not (folder / "alpha.safetensors").exists()
    assert registry.loaded_count == 0
    assert registry.loaded_bytes == 0
    with pytest.raises(TaskNotFound):
        registry.resolve("alpha")
    with pytest.raises(TaskNotFound):
        registry.delete("alpha")


def test_listeners_hear_every_install_and_unregister(folder: Path) -> None:
    heard: list[tuple[str, str | None]] = []
    registry = make_registry(folder, max_loaded=1)
    registry.add_listener(lambda task, memory: heard.append((task, memory.version if memory else None)))
    registry.add_listener(lambda task, memory: 1 / 0)  # a failing listener changes nothing for others
    v1, v2, other = tiny_memory(1), tiny_memory(2), tiny_memory(3)
    registry.put("alpha", v1)
    registry.put("beta", other)  # evicts alpha (capacity 1)
    registry.resolve("alpha")  # reloaded: announced again, same version
    registry.put("alpha", v2, replace=True)
    write(folder, "beta", v1)  # changed by other means while not resident: no install yet
    registry.refresh()
    registry.delete("alpha")
    assert heard == [
        ("alpha", sha(v1)),
        ("beta", sha(other)),
        ("alpha", sha(v1)),
        ("alpha", sha(v2)),
        ("alpha", None),
    ]
    assert registry.info("beta").spec is not None  # the stored file's spec, for a task not resident


def test_request_counts_are_kept_per_task(folder: Path) -> None:
    registry = make_registry(folder)
    registry.put("alpha", tiny_memory(1))
    registry.record_request("alpha", "ok")
    registry.record_request("alpha", "ok")
    registry.record_request("alpha", "invalid")
    registry.record_request("ghost", "ok")  # unknown tasks are not tracked
    assert registry.info("alpha").requests == {"ok": 2, "invalid": 1}


@pytest.mark.parametrize(
    "name", ["", "../etc", "a/b", "a\\b", ".hidden", "-flag", "a.b", "a b", "ü", "x" * 65, "a\x00"]
)
def test_task_names_that_could_escape_or_confuse_the_store_are_refused(folder: Path, name: str) -> None:
    with pytest.raises(InvalidTaskName):
        validate_task_name(name)
    with pytest.raises(InvalidTaskName):
        LocalFolderStore(folder).path(name)


def test_store_ignores_temp_and_foreign_files(folder: Path) -> None:
    write(folder, "alpha", tiny_memory(1))
    (folder / ".alpha.safetensors.x1y2.tmp").write_bytes(b"partial")
    (folder / "notes.txt").write_text("hello")
    (folder / "bad name.safetensors").write_bytes(b"x")
    (folder / "sub.safetensors").mkdir()
    assert set(LocalFolderStore(folder).scan()) == {"alpha"}


def test_store_write_is_atomic_and_stamps_change(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalFolderStore(folder)
    first = store.write("alpha", b"one")
    seen_mid_write: list[bytes] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the new bytes are all written, not yet renamed into place
        if not seen_mid_write:
            seen_mid_write.append(store.read("alpha")[0])
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    second = store.write("alpha", b"two" * 1000)
    assert seen_mid_write == [b"one"]  # a reader during the write sees the whole old file
    assert first.stamp != second.stamp
    data, stored = store.read("alpha")
    assert data == b"two" * 1000
    assert stored == second

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        store.write("alpha", b"three" * 1000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert store.read("alpha") == (data, second)  # a write that fails midway leaves the old file whole
    assert store_files(folder) == ["alpha.safetensors"]  # and no temp file


def test_check_replace_rules() -> None:
    check_replace("t", None, False, None)  # new task
    check_replace("t", "v1", True, None)
    check_replace("t", "v1", False, "v1")
    check_replace("t", "v1", False, "*")
    with pytest.raises(MemoryConflict):
        check_replace("t", "v1", False, None)
    with pytest.raises(MemoryConflict):
        check_replace("t", "v1", True, "v2")  # an explicit If-Match wins over replace


def test_a_dropped_file_with_finite_but_huge_values_is_invalid_when_loaded(folder: Path) -> None:
    memory = load_memory(tiny_memory(1), IDENTITY)
    tensors = memory_tensors(memory)
    tensors["head.out.weight"] = torch.full_like(
        tensors["head.out.weight"], torch.finfo(torch.float32).max / 4
    )
    write(folder, "alpha", save_safetensors(tensors, metadata=spec_metadata(memory.spec)))
    registry = make_registry(folder)
    with pytest.raises(TaskUnavailable, match="non-finite outputs"):
        registry.resolve("alpha")
    info = registry.info("alpha")
    assert info.status == "invalid"
    assert "non-finite outputs" in (info.error or "")


def test_pinned_tasks_over_the_byte_budget_all_stay_and_the_excess_is_logged(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for index, name in enumerate("abcd"):
        write(folder, name, tiny_memory(index))
    one = memory_nbytes(load_memory(tiny_memory(0), IDENTITY))
    registry = make_registry(folder, max_loaded_bytes=int(1.5 * one), pinned=["a", "b"])
    with caplog.at_level("WARNING", logger="app.registry.registry"):
        registry.load_pinned()
    assert registry.loaded_bytes == 2 * one  # over the budget: pinned memories are never evicted
    assert "capacity exceeded by pinned or in-use tasks" in caplog.text
    registry.resolve("c")  # an unpinned task still serves (kept while it is the one just loaded)
    registry.resolve("d")  # and is the one evicted for the next
    resident = {name for name in "abcd" if registry.resolve_loaded(name) is not None}
    assert resident == {"a", "b", "d"}
    assert registry.loaded_bytes == 3 * one


def test_the_poller_skips_a_task_whose_lock_is_held_and_catches_up_next_time(folder: Path) -> None:
    v1, v2, v3, v4 = (tiny_memory(seed) for seed in (1, 2, 3, 4))
    write(folder, "alpha", v1)
    write(folder, "beta", v2)
    registry = make_registry(folder)
    registry.resolve("alpha")
    write(folder, "alpha", v3)
    write(folder, "beta", v4)
    lock = registry._tasks["alpha"].lock  # as a slow load or upload of alpha holds it
    lock.acquire()
    try:
        done = threading.Event()
        poll = threading.Thread(target=lambda: (registry.refresh(), done.set()))
        poll.start()
        assert done.wait(timeout=10), "the poll waited for a task's lock instead of skipping it"
        assert registry.resolve_loaded("alpha").version == sha(v1)  # skipped, still serving
        assert registry.info("beta").version == sha(v4)  # the others were synced
    finally:
        lock.release()
    poll.join()
    registry.refresh()
    assert registry.resolve_loaded("alpha").version == sha(v3)  # caught up


def test_an_upload_trained_with_another_pooling_is_refused_with_422(folder: Path) -> None:
    from app.api.errors import status_for

    torch.manual_seed(0)
    spec = MemorySpec(num_layers=2, hidden_size=8, num_parents=4, num_children=2, top_k=2,
                      pooling="first", backbone_id="tiny", backbone_fingerprint="tiny-fp")  # fmt: skip
    registry = Registry(
        LocalFolderStore(folder), dataclasses.replace(IDENTITY, pooling="mean"), metrics=Metrics()
    )
    with pytest.raises(PoolingMismatch, match="'first' pooling, this backbone pools with 'mean'") as caught:
        registry.put("alpha", memory_to_bytes(TaskMemory(spec)))
    assert status_for(caught.value) == 422
    assert not folder.exists() or store_files(folder) == []  # nothing was written


def test_the_config_comes_from_the_settings_and_its_defaults_are_theirs(folder: Path) -> None:
    settings = Settings(max_loaded_memories=3, max_loaded_bytes=1000, pinned_tasks=["a"], cold_load_threads=2)
    assert RegistryConfig.from_settings(settings) == RegistryConfig(3, 1000, ("a",), 2)
    defaults = Settings.model_construct()  # the declared defaults, whatever the environment says
    assert RegistryConfig() == RegistryConfig(
        defaults.max_loaded_memories, defaults.max_loaded_bytes, (), defaults.cold_load_threads
    )
    registry = Registry(LocalFolderStore(folder), IDENTITY, RegistryConfig.from_settings(settings))
    assert (registry.max_loaded, registry.max_loaded_bytes) == (3, 1000)

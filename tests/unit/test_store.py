"""The memory-store contract, on both stores: the local folder and a real S3-compatible server
(SeaweedFS on loopback). Compare-and-swap writes, stamps, listings that ignore foreign objects."""

from __future__ import annotations

import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mounts import mounted, remount_read_only  # tests/ is on sys.path (rootdir conftest)

from app.errors import StoreConflict, StoreFull, StoreReadOnly, StoreUnavailable, TaskNotFound
from app.registry.factory import open_store
from app.registry.guard import GuardedStore
from app.registry.s3store import S3Store
from app.registry.store import ANY_VERSION, LocalFolderStore, MemoryStore
from app.settings import Settings


def new_prefix() -> str:
    """Tests share the session's bucket (each bucket costs SeaweedFS volumes), each under its own prefix."""
    return f"{uuid.uuid4().hex[:12]}/"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MemoryStore]:
    if request.param == "local":
        yield LocalFolderStore(tmp_path / "memories")
        return
    seaweed = request.getfixturevalue("seaweed")
    yield S3Store(seaweed.client(), seaweed.bucket, new_prefix())


def test_write_read_stat_scan_delete(store: MemoryStore) -> None:
    assert store.scan() == {}
    assert store.stat("alpha") is None
    first = store.write("alpha", b"one", expected=None)
    assert store.stat("alpha") == first
    assert store.read("alpha") == (b"one", first)
    second = store.write("alpha", b"two!", expected=first.stamp)
    assert second.stamp != first.stamp
    assert second.size == 4
    assert store.scan() == {"alpha": second}
    assert store.delete("alpha") is True
    assert store.delete("alpha") is False
    assert store.scan() == {}
    with pytest.raises(TaskNotFound, match="'alpha' is not in the memory store"):
        store.read("alpha")


def test_conditional_writes_refuse_a_store_that_moved_on(store: MemoryStore) -> None:
    first = store.write("alpha", b"one", expected=None)
    with pytest.raises(StoreConflict, match="saw no file"):
        store.write("alpha", b"two", expected=None)  # create, but it exists
    second = store.write("alpha", b"two", expected=first.stamp)
    with pytest.raises(StoreConflict, match="another writer"):
        store.write("alpha", b"three", expected=first.stamp)  # stale: someone wrote `second`
    assert store.read("alpha") == (b"two", second)  # the refused writes left nothing behind
    store.write("alpha", b"forced", expected=ANY_VERSION)
    assert store.read("alpha")[0] == b"forced"
    store.delete("alpha")
    with pytest.raises(StoreConflict):
        store.write("alpha", b"again", expected=second.stamp)  # it was deleted meanwhile
    assert store.stat("alpha") is None


def test_of_concurrent_writers_that_checked_the_same_version_exactly_one_wins(store: MemoryStore) -> None:
    base = store.write("alpha", b"base", expected=None)
    writers, barrier = 6, threading.Barrier(6)
    outcomes: dict[int, str] = {}

    def write(i: int) -> None:
        barrier.wait()
        try:
            store.write("alpha", f"writer {i} ".encode() * 1000, expected=base.stamp)
            outcomes[i] = "won"
        except StoreConflict:
            outcomes[i] = "conflict"

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, outcome in outcomes.items() if outcome == "won"]
    assert len(winners) == 1, outcomes
    assert store.read("alpha")[0] == f"writer {winners[0]} ".encode() * 1000


def test_local_listing_ignores_temp_lock_and_foreign_files(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path)
    store.write("alpha", b"a", expected=None)
    for name in (".alpha.safetensors.x1.tmp", "notes.txt", "-bad.safetensors", "a.b.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.safetensors").mkdir()
    assert set(store.scan()) == {"alpha"}
    assert (tmp_path / LocalFolderStore.LOCK_NAME).exists()


def test_s3_listing_sees_only_task_files_under_its_prefix(seaweed: Any) -> None:
    client, bucket, root = seaweed.client(), seaweed.bucket, new_prefix()
    store = S3Store(client, bucket, f"{root}memories/")
    store.write("alpha", b"a", expected=None)
    for key in ("memories/notes.txt", "memories/sub/beta.safetensors", "other/gamma.safetensors",
                "memories/-bad.safetensors", "memoriesdelta.safetensors"):  # fmt: skip
        client.put_object(Bucket=bucket, Key=f"{root}{key}", Body=b"x")
    assert set(store.scan()) == {"alpha"}
    assert S3Store(client, bucket, f"{root}other/").scan().keys() == {"gamma"}


def test_s3_settings_build_the_store_and_create_its_bucket(seaweed: Any) -> None:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    settings = Settings(**{key.removeprefix("SPARTAN_").lower(): value
                           for key, value in seaweed.settings_env(bucket).items()})  # fmt: skip
    store = open_store(settings)
    assert isinstance(store, GuardedStore)
    assert isinstance(store.inner, S3Store)
    assert bucket in store.location
    store.write("alpha", b"a", expected=None)
    assert set(seaweed.client().list_objects_v2(Bucket=bucket)["Contents"][0].values()) >= {
        "memories/alpha.safetensors"
    }
    open_store(settings)  # the bucket exists now: creating it again is not an error


def test_an_unreachable_s3_store_is_a_clear_503_error_without_secrets() -> None:
    settings = Settings(store="s3", s3_bucket="b", s3_endpoint_url="http://127.0.0.1:9",  # nothing listens
                        s3_access_key_id="AKIAEXAMPLE", s3_secret_access_key="do-not-print-me",
                        s3_timeout_s=0.5)  # fmt: skip
    store = open_store(settings)
    with pytest.raises(StoreUnavailable, match="cannot be reached") as caught:
        store.scan()
    assert "do-not-print-me" not in str(caught.value)
    assert "AKIAEXAMPLE" not in str(caught.value)


def test_store_s3_needs_a_bucket() -> None:
    with pytest.raises(ValueError, match="needs s3_bucket"):
        Settings(store="s3")


def test_two_registries_on_one_bucket_converge_and_refuse_a_lost_update(seaweed: Any) -> None:
    """Two replicas' registries over one S3 prefix: an upload through one is seen by the other's
    refresh (new, replaced, deleted), and an upload that loses the race between its check and its
    write is refused (StoreConflict, 409) with nothing written, never a silent overwrite."""
    from test_registry import IDENTITY, sha, tiny_memory

    from app.metrics import Metrics
    from app.registry.registry import Registry

    prefix = new_prefix()
    v1, v2, v3 = tiny_memory(1), tiny_memory(2), tiny_memory(3)
    b = Registry(S3Store(seaweed.client(), seaweed.bucket, prefix), IDENTITY, metrics=Metrics())

    class RacedStore(S3Store):
        """b's upload lands between a's check and a's write, once."""

        race = False

        def write(self, task: str, data: bytes, *, expected: str | None = ANY_VERSION) -> Any:
            if self.race:
                self.race = False
                b.put(task, v3, replace=True)
            return super().write(task, data, expected=expected)

    a_store = RacedStore(seaweed.client(), seaweed.bucket, prefix)
    a = Registry(a_store, IDENTITY, metrics=Metrics())
    assert a.put("alpha", v1).created
    b.refresh()
    assert b.resolve("alpha").version == sha(v1)
    a.put("alpha", v2, replace=True)
    b.refresh()
    assert b.resolve("alpha").version == sha(v2)  # a resident memory is swapped at once

    a_store.race = True
    with pytest.raises(StoreConflict, match="another writer"):
        a.put("alpha", v1, replace=True)
    assert a_store.read("alpha")[0] == v3  # b won; a wrote nothing
    assert a.metrics.store_conflicts._value.get() == 1
    a.refresh()
    assert a.resolve("alpha").version == sha(v3)
    assert a.put("alpha", v3).created is False  # the same bytes again: a no-op success, even without replace

    a.delete("alpha")
    b.refresh()
    with pytest.raises(TaskNotFound):
        b.resolve("alpha")


# ------------------------------------------------------------------------ conditional delete (S3)


class _WriteBeforeDelete:
    """An S3 client that lets another writer replace the object between the store's check and its
    DeleteObject (once): the race a conditional delete must lose."""

    def __init__(self, client: Any, newer: bytes) -> None:
        self._client, self._newer = client, newer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def delete_object(self, **kwargs: Any) -> Any:
        if self._newer:
            self._client.put_object(Bucket=kwargs["Bucket"], Key=kwargs["Key"], Body=self._newer)
            self._newer = b""
        return self._client.delete_object(**kwargs)


def test_an_s3_delete_never_removes_a_version_written_after_its_check(seaweed: Any) -> None:
    prefix = new_prefix()
    S3Store(seaweed.client(), seaweed.bucket, prefix).write("alpha", b"seen", expected=None)
    store = S3Store(_WriteBeforeDelete(seaweed.client(), b"written meanwhile"), seaweed.bucket, prefix)
    with pytest.raises(StoreConflict, match="after this delete checked it"):
        store.delete("alpha")
    assert store.read("alpha")[0] == b"written meanwhile"  # SeaweedFS honours If-Match on DeleteObject
    assert store.delete("alpha") is True  # unraced, the current version goes
    assert store.stat("alpha") is None


# ------------------------------------------------------------------------ a full or read-only folder


def test_a_full_store_refuses_a_write_with_store_full_and_leaves_nothing(tmp_path: Path) -> None:
    with mounted(tmp_path / "memories", "size=64k") as folder:
        store = LocalFolderStore(folder)
        store.write("small", b"x" * 1000, expected=None)
        with pytest.raises(StoreFull, match=r"no space left for task .big.*nothing was written"):
            store.write("big", b"x" * 200_000, expected=None)
        assert sorted(p.name for p in folder.iterdir()) == [LocalFolderStore.LOCK_NAME, "small.safetensors"]
        assert store.read("small")[0] == b"x" * 1000


def test_a_read_only_store_serves_and_refuses_writes_and_deletes_clearly(tmp_path: Path) -> None:
    with mounted(tmp_path / "memories", "size=1m") as folder:
        (folder / "alpha.safetensors").write_bytes(b"one")  # written before the volume turned read-only
        remount_read_only(folder)
        store = LocalFolderStore(folder)
        assert store.recover() == 0  # at start: no lock file can be made, nothing to recover
        assert set(store.scan()) == {"alpha"}
        assert store.read("alpha")[0] == b"one"
        with pytest.raises(StoreReadOnly, match=r"read-only.*cannot change task .beta."):
            store.write("beta", b"two", expected=None)
        with pytest.raises(StoreReadOnly, match="cannot change task 'alpha'"):
            store.delete("alpha")
        assert sorted(p.name for p in folder.iterdir()) == ["alpha.safetensors"]


def test_the_lock_file_beside_the_memories_is_ignored_by_git(repo_root: Path) -> None:
    if not (repo_root / ".git").exists():
        pytest.skip("not a git checkout")
    lock = f"memories/{LocalFolderStore.LOCK_NAME}"
    done = subprocess.run(["git", "check-ignore", "-q", lock], cwd=repo_root, check=False)
    assert done.returncode == 0, f"{lock} would show in `git status` after `make run`"

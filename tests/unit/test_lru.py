"""The LRU alone: order, capacity by count and by bytes, pinned entries, and the eviction callback."""

from __future__ import annotations

import pytest

from app.registry.lru import LRUCache


def make(
    max_entries: int = 100, max_bytes: int = 10_000, pinned: tuple[str, ...] = ()
) -> tuple[LRUCache[str], list[str]]:
    """A cache and the keys its on_evict callback was told of, in order."""
    evicted: list[str] = []

    def on_evict(key: str) -> None:
        assert key not in cache, "told of an eviction before the entry left"
        evicted.append(key)

    cache = LRUCache[str](max_entries, max_bytes, on_evict, pinned=pinned)
    return cache, evicted


def test_keys_are_kept_least_recently_used_first_and_touch_moves_one_to_the_end() -> None:
    cache, _ = make()
    for key in "abc":
        cache.put(key, 1)
    cache.touch("a")
    cache.touch("missing")  # nothing happens
    assert list(cache) == ["b", "c", "a"]
    assert len(cache) == 3
    assert "a" in cache
    assert "missing" not in cache


def test_capacity_by_count_evicts_the_least_recently_used() -> None:
    cache, evicted = make(max_entries=2)
    cache.put("a", 1)
    cache.put("b", 1)
    cache.touch("a")  # b is now the least recently used
    assert cache.put("c", 1) == ["b"]
    assert list(cache) == ["a", "c"]
    assert evicted == ["b"]


def test_capacity_by_bytes_evicts_as_many_as_it_takes_and_counts_bytes_exactly() -> None:
    cache, _ = make(max_bytes=100)
    for key in "abcd":
        cache.put(key, 25)
    assert cache.nbytes == 100
    assert cache.put("big", 70) == ["a", "b", "c"]  # 25 + 70 fits, 50 + 70 does not
    assert list(cache) == ["d", "big"]
    assert cache.nbytes == 95


def test_putting_a_key_again_changes_its_size_and_makes_it_the_most_recent() -> None:
    cache, _ = make(max_bytes=100)
    cache.put("a", 40)
    cache.put("b", 40)
    assert cache.put("a", 50) == []  # a swap: 50 + 40 still fits
    assert list(cache) == ["b", "a"]
    assert cache.nbytes == 90
    assert cache.put("a", 70) == ["b"]
    assert cache.nbytes == 70


def test_pinned_entries_are_never_evicted_even_over_capacity() -> None:
    cache, evicted = make(max_entries=2, pinned=("a",))
    cache.pin("b")  # pinned before it is put: applies once it is
    for key in "abcd":
        cache.put(key, 1)
    assert set(cache) == {"a", "b", "d"}  # c went for d; d stays as the one just put
    assert evicted == ["c"]
    assert cache.over_capacity
    assert cache.pinned == {"a", "b"}
    assert cache.is_pinned("a")
    assert not cache.is_pinned("d")


def test_the_entry_just_put_stays_even_alone_over_capacity() -> None:
    cache, _ = make(max_bytes=10)
    cache.put("a", 5)
    assert cache.put("huge", 50) == ["a"]
    assert list(cache) == ["huge"]
    assert cache.over_capacity
    assert cache.put("next", 1) == ["huge"]  # and is evicted first for the next one
    assert not cache.over_capacity


def test_the_callback_is_called_exactly_once_per_evicted_entry_in_order() -> None:
    cache, evicted = make(max_entries=3)
    for number in range(10):
        cache.put(f"k{number}", 1)
    assert evicted == [f"k{number}" for number in range(7)]
    assert list(cache) == ["k7", "k8", "k9"]


def test_remove_forgets_an_entry_without_the_callback() -> None:
    cache, evicted = make()
    cache.put("a", 10)
    cache.put("b", 20)
    assert cache.remove("a") is True
    assert cache.remove("a") is False
    assert list(cache) == ["b"]
    assert cache.nbytes == 20
    assert evicted == []


def test_a_failing_callback_leaves_the_cache_consistent() -> None:
    def on_evict(key: str) -> None:
        raise RuntimeError("owner failed")

    cache = LRUCache[str](1, 100, on_evict)
    cache.put("a", 10)
    with pytest.raises(RuntimeError, match="owner failed"):
        cache.put("b", 10)
    assert list(cache) == ["b"]  # a left before its owner was told
    assert cache.nbytes == 10

"""The LRU of resident entries, bounded by count and by bytes; pinned entries are never evicted.

It keeps only the order and the sizes. What an entry is, and what evicting it means, belong to its
owner, who is told through `on_evict` (as vLLM's LoRA LRU cache tells its adapter manager).

Not thread-safe: the owner calls it under its own lock, so that the order, the byte count and the
owner's records change together (the registry's index lock).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class LRUCache(Generic[K]):
    """Keys with sizes, least recently used first. `put` evicts until both capacities hold again."""

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        on_evict: Callable[[K], None],
        *,
        pinned: Iterable[K] = (),
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._on_evict = on_evict
        self._pinned = set(pinned)  # may name keys not (yet) present: they are never evicted once put
        self._sizes: OrderedDict[K, int] = OrderedDict()
        self._nbytes = 0

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self) -> Iterator[K]:
        """The keys, least recently used first."""
        return iter(list(self._sizes))

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def over_capacity(self) -> bool:
        """True when pinned entries (or the one just put) alone exceed a capacity."""
        return len(self._sizes) > self.max_entries or self._nbytes > self.max_bytes

    @property
    def pinned(self) -> frozenset[K]:
        return frozenset(self._pinned)

    def pin(self, key: K) -> None:
        self._pinned.add(key)

    def is_pinned(self, key: K) -> bool:
        return key in self._pinned

    def touch(self, key: K) -> None:
        """Mark `key` as just used (nothing if absent)."""
        if key in self._sizes:
            self._sizes.move_to_end(key)

    def put(self, key: K, nbytes: int) -> list[K]:
        """Add `key` (or change its size) as the most recently used, then evict least recently used,
        unpinned entries, never `key` itself, until both capacities hold. The evicted keys, in order;
        `on_evict` is called once for each, after it has left the cache."""
        self._nbytes += nbytes - self._sizes.get(key, 0)
        self._sizes[key] = nbytes
        self._sizes.move_to_end(key)
        evicted: list[K] = []
        for candidate in list(self._sizes):
            if not self.over_capacity:
                break
            if candidate == key or candidate in self._pinned:
                continue
            self._nbytes -= self._sizes.pop(candidate)
            evicted.append(candidate)
            self._on_evict(candidate)
        return evicted

    def remove(self, key: K) -> bool:
        """Forget `key` (its owner removed it: no `on_evict`); False if it was not there."""
        if key not in self._sizes:
            return False
        self._nbytes -= self._sizes.pop(key)
        return True

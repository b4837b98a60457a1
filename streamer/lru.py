"""A bounded dict that forgets its least recently used entries.

Per-track and per-size state is dropped explicitly when a track ends or a stream resets, but a caller
that forgets to (or a stream of ever-new photo sizes) must not grow memory without limit. Every such
table uses this one class, so "recently used" means the same thing everywhere: reading an entry with
`get`, `touch` or `get_or_create`, or writing it with `set`. `in`, `len` and `items` never reorder.

Not thread-safe: each instance belongs to one stream's (or one detector's) thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar, overload

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
D = TypeVar("D")


class LruDict(Generic[K, V]):
    """At most `capacity` entries; inserting beyond that evicts the least recently used one."""

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"LruDict: capacity must be an integer >= 1, got {capacity!r}")
        self._capacity = capacity
        # Least recently used first; OrderedDict moves and pops both ends in O(1).
        self._items: OrderedDict[K, V] = OrderedDict()

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __repr__(self) -> str:
        return f"LruDict(capacity={self._capacity}, size={len(self._items)})"

    @overload
    def get(self, key: K) -> V | None: ...
    @overload
    def get(self, key: K, default: D) -> V | D: ...
    def get(self, key: K, default: object = None) -> object:
        """The value for `key` (now the most recently used), or `default` when absent."""
        if key not in self._items:
            return default
        self._items.move_to_end(key)
        return self._items[key]

    def touch(self, key: K) -> bool:
        """Mark `key` as just used; False (and nothing changes) when it is absent."""
        if key not in self._items:
            return False
        self._items.move_to_end(key)
        return True

    def set(self, key: K, value: V) -> None:
        """Insert or replace `key` as the most recently used entry, evicting the oldest beyond capacity."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def get_or_create(self, key: K, factory: Callable[[], V]) -> V:
        """The value for `key`, built by `factory()` and inserted (see `set`) when absent."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = factory()
        self.set(key, value)
        return value

    @overload
    def pop(self, key: K) -> V | None: ...
    @overload
    def pop(self, key: K, default: D) -> V | D: ...
    def pop(self, key: K, default: object = None) -> object:
        """Remove `key` and return its value, or `default` when absent (forgetting twice is fine)."""
        return self._items.pop(key, default)

    def clear(self) -> None:
        self._items.clear()

    def items(self) -> list[tuple[K, V]]:
        """A snapshot of (key, value) pairs, least recently used first; safe to mutate the dict while looping."""
        return list(self._items.items())

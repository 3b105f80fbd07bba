"""A thread-safe LRU bounded by bytes, for per-item rerank tensors that cost ms to build.

Entries are never shared between model versions: the service builds a new cache per model.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteBoundedLRU(Generic[K, V]):
    """Keeps the most recently used values whose `size_of` sum stays within `max_bytes`.

    A value larger than the whole budget is not kept (the caller simply recomputes it).
    """

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def get_many(self, keys: Iterable[K]) -> dict[K, V]:
        """The cached values of `keys` (absent keys are misses); refreshes their recency."""
        found: dict[K, V] = {}
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None:
                    self.misses += 1
                    continue
                self._entries.move_to_end(key)
                found[key] = entry[0]
                self.hits += 1
        return found

    def put_many(self, values: dict[K, V]) -> None:
        # sizes first, outside the lock: the event loop looks entries up under it
        sized = [(key, value, self._size_of(value)) for key, value in values.items()]
        with self._lock:
            for key, value, size in sized:
                self._drop(key)
                if size > self.max_bytes:
                    continue
                self._entries[key] = (value, size)
                self._bytes += size
            while self._bytes > self.max_bytes and self._entries:
                self._drop(next(iter(self._entries)))

    def discard(self, keys: Iterable[K]) -> None:
        with self._lock:
            for key in keys:
                self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _drop(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]

"""A CPU stand-in for the FAISS GPU backend, so device-copy logic runs (and is tested) here."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import faiss


@dataclass
class CpuStandIn:
    """A `DeviceBackend` whose device is the CPU: copies are `faiss.clone_index` clones."""

    name: str = "cuda:5"
    max_k: int = 2048
    copies: list[faiss.Index] = field(default_factory=list)

    def copy(self, index: faiss.Index) -> faiss.Index:
        clone = faiss.clone_index(index)
        self.copies.append(clone)
        return clone

    def set_parameter(self, index: faiss.Index, name: str, value: int) -> None:
        faiss.ParameterSpace().set_index_parameter(index, name, value)


class OneAtATime:
    """Wraps a copy and records the most threads ever inside it at once."""

    def __init__(self, inner: faiss.Index, record: dict[str, int]) -> None:
        self.inner = inner
        self.record = record
        self._inside = 0
        self._guard = threading.Lock()

    @property
    def ntotal(self) -> int:
        return self.inner.ntotal

    def _enter(self) -> None:
        with self._guard:
            self._inside += 1
            self.record["most"] = max(self.record["most"], self._inside)

    def _leave(self) -> None:
        with self._guard:
            self._inside -= 1

    def search(self, queries, k):
        self._enter()
        try:
            time.sleep(0.0005)  # widen the window two threads would need to overlap
            return self.inner.search(queries, k)
        finally:
            self._leave()

    def add_with_ids(self, vectors, ids):
        self._enter()
        try:
            return self.inner.add_with_ids(vectors, ids)
        finally:
            self._leave()


@dataclass
class WatchedStandIn(CpuStandIn):
    record: dict[str, int] = field(default_factory=lambda: {"most": 0})

    def copy(self, index: faiss.Index) -> faiss.Index:
        return OneAtATime(super().copy(index), self.record)

    def set_parameter(self, index, name: str, value: int) -> None:
        super().set_parameter(index.inner, name, value)

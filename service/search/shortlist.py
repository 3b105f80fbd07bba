"""The first stage as one batched index search: concurrent queries of one kind stacked.

A `ShortlistJob` is one query's pooled vector and its k. `ShortlistSearcher` is the shortlist
micro-batcher's batch function: it groups the jobs by index (images, captions), searches each
index once for its group (`Corpus.search_batch`: the largest k, or one search per HNSW beam
width) and hands every caller its own top-k.

Every shortlist search goes through this one batcher, so its single worker thread is the only
thread that ever searches a GPU index (the GPU copy is also updated there; see index/device.py),
and on a CPU concurrent queries become one batched BLAS/OpenMP search instead of many small ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from index.corpus import Corpus, Kind
from index.shortlist import SearchResult


@dataclass(frozen=True)
class ShortlistJob:
    """One query: its l2-normalised pooled vector(s) [Q, dim] against the `kind` index."""

    kind: Kind
    vectors: np.ndarray
    k: int


class ShortlistSearcher:
    """`jobs -> results` (same order) with one index search per kind for the whole batch."""

    def __init__(self, corpus: Corpus, on_call: Callable[[int], None] | None = None) -> None:
        self.corpus = corpus
        self._on_call = on_call

    def __call__(self, jobs: Sequence[ShortlistJob]) -> list[SearchResult]:
        results: list[SearchResult | None] = [None] * len(jobs)
        for kind in ("images", "captions"):
            members = [n for n, job in enumerate(jobs) if job.kind == kind]
            if not members:
                continue
            found = self.corpus.search_batch(kind, [(jobs[n].vectors, jobs[n].k) for n in members])
            for n, result in zip(members, found, strict=True):
                results[n] = result
        if self._on_call is not None:
            self._on_call(len(jobs))
        return [result for result in results if result is not None]

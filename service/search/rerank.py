"""The second stage as one batched model call: queries' candidate pairs concatenated.

A `RerankJob` is one query with its K shortlisted candidates: one caption x K images
(text -> images) or one image x K captions (image -> captions). It holds references to the
per-item tensors (the LRU's own entries), never a concatenated copy: a queued search then
costs almost nothing, and the only copies are the ones the worker makes for the chunk it is
scoring. `PairReranker` is the micro-batcher's batch function: it lays the jobs' pairs end to
end and scores them with as few `RetrievalModel.rerank_pairs` calls as the memory budget
allows (usually one), so concurrent requests share one model call.

The hot path never waits for the device per item: job sizes, region widths and caption widths
come from tensor shapes, the query side is repeated as a view, each chunk is built by one
concatenation per tensor on the device (images with different region counts, and captions of
different lengths, padded to the chunk's widest in that same step and masked when scored), and
the host synchronises once per model call, when the chunk's scores come back
(`RetrievalModel.rerank_pairs`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from model.architecture.precompute import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    CaptionPrecompute,
    ImagePrecompute,
)
from model.architecture.rerankers import bytes_per_pair

if TYPE_CHECKING:
    from model.retrieval import RetrievalModel

# On a GPU one call may use this share of the device's memory (at least the CPU's budget): with
# the shipped model (~0.5 MB a pair) a batch of 16 queries x K = 100 then runs as one call on a
# 16 GB+ GPU instead of two on the CPU's budget.
GPU_MEMORY_SHARE = 1 / 16


def default_memory_budget(device: torch.device) -> int:
    """The reranker's working memory per call on `device`: on a CPU the model's scoring budget
    (activations of every pair in a call; 1,000 pairs of 49 regions x 12 words at d=1024 take
    about 2.5 GB, so a CPU call holds ~200 pairs)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return max(DEFAULT_MEMORY_BUDGET_BYTES, int(total * GPU_MEMORY_SHARE))
    return DEFAULT_MEMORY_BUDGET_BYTES


@dataclass(frozen=True)
class RerankJob:
    """One query side (one item) against K candidates (K items), with their shortlist scores.

    `images` and `captions` are per-item tensors (each of length 1): exactly one side has one
    item unless K == 1, the other has K. Images may have different region counts (a detector's
    variable boxes): they are padded to the widest when a chunk is laid out, and masked.
    """

    images: tuple[ImagePrecompute, ...]
    captions: tuple[CaptionPrecompute, ...]
    shortlist_scores: np.ndarray  # float32 [K]

    def __post_init__(self) -> None:
        k = len(self.shortlist_scores)
        if k == 0:
            raise ValueError("a rerank job needs at least one candidate")
        if len(self.images) not in (1, k) or len(self.captions) not in (1, k):
            raise ValueError(
                f"{len(self.images)} images and {len(self.captions)} captions cannot form "
                f"{k} pairs: one side must have length 1, the other K"
            )
        if any(len(item) != 1 for item in (*self.images, *self.captions)):
            raise ValueError("a rerank job holds per-item tensors of length 1")

    @property
    def size(self) -> int:
        return len(self.shortlist_scores)

    def widest_image(self) -> ImagePrecompute:
        """The image with the most region slots (what a chunk pads the others to)."""
        return max(self.images, key=lambda image: image.regions.shape[1])

    def widest_caption(self) -> CaptionPrecompute:
        return max(self.captions, key=lambda caption: caption.words.shape[1])

    def pairs(self, start: int, stop: int) -> tuple[list[ImagePrecompute], list[CaptionPrecompute]]:
        """The pieces of aligned pairs start..stop: the query side as one repeated view, the
        candidates' side as its per-item tensors (the chunk concatenates all pieces at once)."""
        return _pieces(self.images, start, stop), _pieces(self.captions, start, stop)

    def bytes_per_pair(self) -> int:
        return bytes_per_pair(self.widest_image(), self.widest_caption())


def _pieces(side, start: int, stop: int) -> list:
    """The query side repeats as expanded views; the candidates' side is its items as they are.
    Neither reads anything back from the device."""
    if len(side) == 1:
        return [side[0].repeat(stop - start)]
    return list(side[start:stop])


def _joined(pieces: list):
    """One batch of pieces: one concatenation per tensor (none for a single piece)."""
    return pieces[0] if len(pieces) == 1 else type(pieces[0]).cat(pieces)


class PairReranker:
    """Batch function for `MicroBatcher`: jobs in, final scores [K] per job out, in order."""

    def __init__(
        self,
        model: RetrievalModel,
        *,
        memory_budget_bytes: int | None = None,
        on_call: Callable[[int, float], None] | None = None,
    ) -> None:
        """memory_budget_bytes None: `default_memory_budget` of the model's device."""
        self.model = model
        self.memory_budget_bytes = memory_budget_bytes or default_memory_budget(model.device)
        self._on_call = on_call  # (jobs in the batch, seconds of model time), for metrics

    def __call__(self, jobs: Sequence[RerankJob]) -> list[np.ndarray]:
        started = time.perf_counter()
        outputs = [np.empty(job.size, dtype=np.float32) for job in jobs]
        # Every pair of a call is padded to the call's widest image and caption: reckon each
        # pair at the widest of all the jobs, so no chunk outgrows the budget.
        per_pair = bytes_per_pair(
            max((job.widest_image() for job in jobs), key=lambda i: i.regions.shape[1]),
            max((job.widest_caption() for job in jobs), key=lambda c: c.words.shape[1]),
        )
        max_pairs = max(1, self.memory_budget_bytes // per_pair)
        for chunk in _chunks([(i, job.size) for i, job in enumerate(jobs)], max_pairs):
            self._score_chunk(jobs, chunk, outputs)
        if self._on_call is not None:
            self._on_call(len(jobs), time.perf_counter() - started)
        return outputs

    def _score_chunk(
        self,
        jobs: Sequence[RerankJob],
        chunk: list[tuple[int, int, int]],
        outputs: list[np.ndarray],
    ) -> None:
        image_pieces: list[ImagePrecompute] = []
        caption_pieces: list[CaptionPrecompute] = []
        for j, a, b in chunk:
            images, captions = jobs[j].pairs(a, b)
            image_pieces += images
            caption_pieces += captions
        shortlist = np.concatenate([jobs[j].shortlist_scores[a:b] for j, a, b in chunk])
        scores = np.asarray(
            self.model.rerank_pairs(
                _joined(image_pieces), _joined(caption_pieces), shortlist.astype(np.float32)
            ),
            dtype=np.float32,
        ).reshape(-1)
        if len(scores) != len(shortlist):
            raise RuntimeError(f"rerank_pairs returned {len(scores)} scores for {len(shortlist)}")
        offset = 0
        for j, a, b in chunk:
            outputs[j][a:b] = scores[offset : offset + b - a]
            offset += b - a


def _chunks(sizes: list[tuple[int, int]], max_pairs: int) -> list[list[tuple[int, int, int]]]:
    """Split jobs (index, K) into chunks of at most `max_pairs` pairs: [(index, start, stop)]."""
    chunks: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = max_pairs
    for index, size in sizes:
        start = 0
        while start < size:
            take = min(size - start, room)
            current.append((index, start, start + take))
            start += take
            room -= take
            if room == 0:
                chunks.append(current)
                current, room = [], max_pairs
    if current:
        chunks.append(current)
    return chunks

"""The second stage as one batched model call: queries' candidate pairs concatenated.

A `RerankJob` is one query with its K shortlisted candidates: one caption x K images
(text -> images) or one image x K captions (image -> captions). It holds references to the
per-item tensors (the LRU's own entries), never a concatenated copy: a queued search then
costs almost nothing, and the only copies are the ones the worker makes for the chunk it is
scoring. `PairReranker` is the micro-batcher's batch function: it lays the jobs' pairs end to
end and scores them with as few `RetrievalModel.rerank_pairs` calls as the memory budget
allows (usually one), so concurrent requests share one model call; pairs of very different
widths are scored in a few calls of similar widths instead (`_width_groups`). On a CPU the
pairs go in parts of 32 to 64 over the reranker's worker threads (`CAMPSEARCH_RERANK_WORKERS`),
one model call a part, so a lone search uses the cores that intra-op threads would not.

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
from concurrent.futures import ThreadPoolExecutor, wait
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
# A CPU call's pairs are split over the reranker's worker threads only in parts of at least
# MIN_PART_PAIRS pairs (smaller parts cost more in per-operation overhead than the second core
# gives back) and at most MAX_PART_PAIRS: a part's candidates, gathered into one piece (~8 MB at
# the shipped sizes), are then still in the caches when it is scored (16 searches' 1,600 pairs on
# 2 threads: 225 ms in parts of 64 against 240 ms in two halves).
MIN_PART_PAIRS = 32
MAX_PART_PAIRS = 64


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

    def bytes_per_pair(self) -> int:
        return bytes_per_pair(self.widest_image(), self.widest_caption())


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
        workers: int = 1,
    ) -> None:
        """memory_budget_bytes None: `default_memory_budget` of the model's device.
        `workers`: on a CPU, the threads the pairs are scored on (the calling thread and
        `workers - 1` of the reranker's own), in parts of MIN_PART_PAIRS to MAX_PART_PAIRS
        pairs: one search's 100 pairs then use a second idle core. The parts of a call hold
        no more pairs at once than the call, so the memory budget holds. A GPU call is never
        split."""
        self.model = model
        self.memory_budget_bytes = memory_budget_bytes or default_memory_budget(model.device)
        self._on_call = on_call  # (jobs in the batch, seconds of model time), for metrics
        self.workers = 1 if workers <= 1 or model.device.type == "cuda" else workers
        self._parts = (
            ThreadPoolExecutor(self.workers - 1, thread_name_prefix="rerank-part")
            if self.workers > 1
            else None
        )

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
        """One model call for the chunk, or one per group of similar widths (`_width_groups`);
        on a CPU with `workers` > 1 each group is split into parts (`_part_count`), scored on
        the worker threads at once."""
        groups = _width_groups(jobs, chunk) or [[(j, range(a, b)) for j, a, b in chunk]]
        parts = [part for group in groups for part in _parts_of(group, self._part_count(group))]
        if self._parts is None or len(parts) == 1:
            for part in parts:
                self._score_part(jobs, part, outputs)
            return
        # The calling thread takes every `workers`-th part, the reranker's threads the rest;
        # each part writes its own positions of `outputs`.
        others = [
            self._parts.submit(self._score_part, jobs, part, outputs)
            for k, part in enumerate(parts)
            if k % self.workers
        ]
        try:
            for part in parts[:: self.workers]:
                self._score_part(jobs, part, outputs)
        finally:
            wait(others)  # no part outlives the call, whichever fails
        for other in others:
            other.result()

    def _part_count(self, group: list[tuple[int, Sequence[int]]]) -> int:
        """Parts of a group: one without worker threads, else as many as there are workers
        (each of at least MIN_PART_PAIRS pairs) or more, of at most MAX_PART_PAIRS."""
        if self._parts is None:
            return 1
        pairs = _pair_count(group)
        return max(min(self.workers, pairs // MIN_PART_PAIRS), -(-pairs // MAX_PART_PAIRS))

    def _score_part(
        self,
        jobs: Sequence[RerankJob],
        group: list[tuple[int, Sequence[int]]],
        outputs: list[np.ndarray],
    ) -> None:
        """Scores the pairs at `positions` of each (job index, positions) in one model call."""
        image_pieces: list[ImagePrecompute] = []
        caption_pieces: list[CaptionPrecompute] = []
        for j, positions in group:
            image_pieces += _picked(jobs[j].images, positions)
            caption_pieces += _picked(jobs[j].captions, positions)
        shortlist = np.concatenate([jobs[j].shortlist_scores[list(p)] for j, p in group])
        scores = np.asarray(
            self.model.rerank_pairs(
                _joined(image_pieces), _joined(caption_pieces), shortlist.astype(np.float32)
            ),
            dtype=np.float32,
        ).reshape(-1)
        if len(scores) != len(shortlist):
            raise RuntimeError(f"rerank_pairs returned {len(scores)} scores for {len(shortlist)}")
        offset = 0
        for j, positions in group:
            outputs[j][list(positions)] = scores[offset : offset + len(positions)]
            offset += len(positions)


# A model call pads every pair to its widest image and caption. When a chunk's pairs differ a
# lot in width (one 49-word caption among 100 of 9-20 words, or detector images of 10 and of
# 100 boxes), they are scored in groups whose widths are within 2x of each other; a group of
# fewer than MIN_GROUP_PAIRS pairs joins the next wider one (a call costs too), except the
# widest. 100 coco captions of 9-49 words x one image: 85.7 ms padded to 49, 52.4 ms in two.
MIN_GROUP_PAIRS = 16


def _width_groups(
    jobs: Sequence[RerankJob], chunk: list[tuple[int, int, int]]
) -> list[list[tuple[int, list[int]]]] | None:
    """The chunk's pairs as [(job index, positions)] groups of similar width, narrowest first;
    None when they all fall in one (the chunk is then one call, laid out as it comes)."""
    buckets: dict[tuple[int, int], dict[int, list[int]]] = {}
    for j, a, b in chunk:
        job = jobs[j]
        for position in range(a, b):
            image = job.images[position if len(job.images) > 1 else 0]
            caption = job.captions[position if len(job.captions) > 1 else 0]
            key = (_doubling(image.regions.shape[1]), _doubling(caption.words.shape[1]))
            buckets.setdefault(key, {}).setdefault(j, []).append(position)
    if len(buckets) == 1:
        return None
    groups: list[list[tuple[int, list[int]]]] = []
    carried: dict[int, list[int]] = {}
    for key in sorted(buckets):
        for j, positions in buckets[key].items():
            carried.setdefault(j, []).extend(positions)
        if sum(len(p) for p in carried.values()) >= MIN_GROUP_PAIRS:
            groups.append(list(carried.items()))
            carried = {}
    if carried:
        groups.append(list(carried.items()))
    return groups


def _pair_count(group: list[tuple[int, Sequence[int]]]) -> int:
    return sum(len(positions) for _, positions in group)


def _parts_of(
    group: list[tuple[int, Sequence[int]]], count: int
) -> list[list[tuple[int, Sequence[int]]]]:
    """The group's pairs, in order, as `count` groups of (nearly) equal size (at least one)."""
    pairs = [(j, position) for j, positions in group for position in positions]
    count = max(1, min(count, len(pairs)))
    parts: list[list[tuple[int, Sequence[int]]]] = []
    for k in range(count):
        part: dict[int, list[int]] = {}
        for j, position in pairs[k * len(pairs) // count : (k + 1) * len(pairs) // count]:
            part.setdefault(j, []).append(position)
        parts.append(list(part.items()))
    return parts


def _doubling(width: int) -> int:
    """Widths within one doubling share a value: 9-16 -> 4, 17-32 -> 5, 33-64 -> 6."""
    return max(0, width - 1).bit_length()


def _picked(side, positions: Sequence[int]) -> list:
    """The pieces of one side at `positions`: the query side as one repeated view, the
    candidates' side as its items."""
    if len(side) == 1:
        return [side[0].repeat(len(positions))]
    return [side[i] for i in positions]


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

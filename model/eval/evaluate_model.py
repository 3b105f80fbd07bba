"""Evaluate a `RetrievalModel` on a split: pooled, exhaustive and two-stage (docs/ARCHITECTURE.md,
The evaluation protocol).

Used by `camp-search evaluate`. COCO's `testall` (5,000 images) is scored as the mean of its
five 1K folds and as the whole 5K; any other split as one set. The exhaustive mode runs CAMP
(+ fusion) on every image × caption pair in memory-bounded chunks: on a CPU that costs minutes
per 1,000 × 5,000 split, so it can be skipped with `modes`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from model.architecture.precompute import CaptionPrecompute, ImagePrecompute
from model.architecture.rerankers import bytes_per_pair
from model.eval.data import RetrievalSplit
from model.eval.protocol import (
    TWO_STAGE_K,
    average_metrics,
    fold_slices,
    retrieval_metrics,
    shortlist_recall,
    two_stage_metrics_per_score,
)
from model.retrieval import RetrievalModel

MODES = ("pooled", "exhaustive", "two_stage")
COCO_TESTALL = "testall"
ENCODE_BATCH = 256
PAIR_CHUNK = 4096  # pairs per reranker call, at most
# Activation memory one call may use: at the paper's size (d = 1024, 36 regions) a pair needs
# about 2 MiB, so 4,096 pairs would need 8 GiB; the chunk shrinks to fit this instead.
PAIR_MEMORY_BYTES = 1 << 30


def pairs_per_call(images: ImagePrecompute, captions: CaptionPrecompute) -> int:
    """Pairs of these images and captions one reranker call may score: at most PAIR_CHUNK,
    fewer where a pair's activations are large (PAIR_MEMORY_BYTES)."""
    per_pair = bytes_per_pair(images, captions)
    return max(1, min(PAIR_CHUNK, PAIR_MEMORY_BYTES // per_pair))


class EncodedSplit:
    """A split encoded once: shortlist vectors and rerank precomputes of every image/caption."""

    def __init__(
        self,
        model: RetrievalModel,
        split: RetrievalSplit,
        on_pairs: Callable[[int], None] | None = None,
    ) -> None:
        self.model = model
        self.on_pairs = on_pairs  # told how many pairs each scored chunk held (progress bars)
        started = time.perf_counter()
        images, pooled_images = [], []
        for start in range(0, split.num_images, ENCODE_BATCH):
            regions = np.asarray(split.images[start : start + ENCODE_BATCH])
            counts = split.region_counts_of(slice(start, start + ENCODE_BATCH))
            pooled_images.append(model.pooled_images(regions, counts))
            images.append(model.precompute_images(regions, counts))
        self.images: ImagePrecompute = model.reranker.image_precompute.cat(images)
        self.image_vectors = np.concatenate(pooled_images)
        self.image_seconds = time.perf_counter() - started
        started = time.perf_counter()
        captions, pooled_captions = [], []
        for start in range(0, len(split.captions), ENCODE_BATCH):
            encoded = model.encode_texts(split.captions[start : start + ENCODE_BATCH])
            pooled_captions.append(encoded.pooled)
            captions.extend(encoded.precompute.select([i]) for i in range(len(encoded.pooled)))
        self.captions = captions  # one trimmed CaptionPrecompute per caption
        self.caption_vectors = np.concatenate(pooled_captions)
        self.caption_seconds = time.perf_counter() - started
        longest = max(self.captions, key=lambda caption: caption.words.shape[1])
        self.pair_chunk = pairs_per_call(self.images, longest)

    def subset(self, images: slice) -> tuple[np.ndarray, slice]:
        """Pooled scores [n, 5n] of a fold and its caption slice."""
        captions = slice(5 * images.start, 5 * images.stop)
        return self.image_vectors[images] @ self.caption_vectors[captions].T, captions

    def score_pairs(
        self, image_index: np.ndarray, caption_index: np.ndarray, shortlist: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Scores of aligned (image, caption) pairs, in chunks: {"final": the fused score the
        product ranks by, "camp": CAMP's logit alone}."""
        final = np.empty(len(image_index), dtype=np.float32)
        camp = np.empty(len(image_index), dtype=np.float32)
        for start in range(0, len(image_index), self.pair_chunk):
            chunk = slice(start, start + self.pair_chunk)
            images = self.images.select(torch.as_tensor(image_index[chunk]))
            captions = self.model.reranker.caption_precompute.cat(
                [self.captions[c] for c in caption_index[chunk]]
            )
            logits = self.model.camp_logits(images, captions)
            fused = self.model.fuse(torch.as_tensor(shortlist[chunk], dtype=torch.float32), logits)
            camp[chunk] = logits.float().cpu().numpy()
            final[chunk] = fused.float().cpu().numpy()
            if self.on_pairs is not None:
                self.on_pairs(len(images))
        return {"final": final, "camp": camp}


ScoreSink = Callable[[dict[str, np.ndarray]], None]


def _evaluate_fold(
    encoded: EncodedSplit,
    images: slice,
    modes: Sequence[str],
    ks: Sequence[int],
    on_scores: ScoreSink | None = None,
) -> dict:
    pooled, captions = encoded.subset(images)
    timings: dict[str, float] = {}
    result: dict = {}

    def pairs(image_index: np.ndarray, caption_index: np.ndarray) -> dict[str, np.ndarray]:
        return encoded.score_pairs(
            image_index + images.start,
            caption_index + captions.start,
            pooled[image_index, caption_index],
        )

    if "pooled" in modes:
        result["pooled"] = retrieval_metrics(pooled)
        result["shortlist_recall"] = shortlist_recall(pooled, ks)
    if "two_stage" in modes:
        started = time.perf_counter()
        per_score = two_stage_metrics_per_score(pooled, pairs, ks)
        result["two_stage"] = per_score["final"]
        result.setdefault("camp_alone", {})["two_stage"] = per_score["camp"]
        timings["two_stage_all_k"] = time.perf_counter() - started
    if "exhaustive" in modes:
        started = time.perf_counter()
        n, m = pooled.shape
        image_index = np.repeat(np.arange(n), m)
        caption_index = np.tile(np.arange(m), n)
        scores = pairs(image_index, caption_index)
        if on_scores is not None:
            on_scores({name: values.reshape(n, m) for name, values in scores.items()})
        result["exhaustive"] = retrieval_metrics(scores["final"].reshape(n, m))
        result.setdefault("camp_alone", {})["exhaustive"] = retrieval_metrics(
            scores["camp"].reshape(n, m)
        )
        timings["exhaustive"] = time.perf_counter() - started
    result["timings_s"] = timings
    return result


def evaluate_model(
    model: RetrievalModel,
    split: RetrievalSplit,
    *,
    modes: Sequence[str] = MODES,
    ks: Sequence[int] = TWO_STAGE_K,
    on_pairs: Callable[[int], None] | None = None,
    on_scores: ScoreSink | None = None,
) -> dict:
    """The issue's JSON: {"pooled": M, "exhaustive": M, "two_stage": {K: M}, "shortlist_recall":
    {"t2i": {K: %}, "i2t": {...}}, "timings_s": {...}}, plus "camp_alone": {"two_stage": {K: M},
    "exhaustive": M} (the same pairs ranked by CAMP's logit without the shortlist score, at no
    extra cost); COCO testall adds "coco_5k" (same keys over all 5,000 images) while the top
    level holds the mean of the five 1K folds.

    `on_pairs(n)` is called after every chunk of n reranked pairs (exhaustive mode scores
    millions of pairs on a CPU: the CLI shows progress with it). `on_scores` receives the
    exhaustive score matrices of the whole split, images x captions {"final": fused, "camp":
    CAMP's logits}, once (for COCO testall: of the 5K set), to compare with other code's."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    encoded = EncodedSplit(model, split, on_pairs)
    encode_timings = {
        "encode_images": encoded.image_seconds,
        "encode_captions": encoded.caption_seconds,
    }
    whole = slice(0, split.num_images)
    if split.name != COCO_TESTALL:
        result = _evaluate_fold(encoded, whole, modes, ks, on_scores)
        result["timings_s"] |= encode_timings
        return result
    folds = [_evaluate_fold(encoded, fold, modes, ks) for fold in fold_slices(split.num_images)]
    result = _average_folds(folds)
    result["coco_5k"] = _evaluate_fold(encoded, whole, modes, ks, on_scores)
    result["timings_s"] = encode_timings | {
        f"folds_{k}": sum(f["timings_s"].get(k, 0.0) for f in folds) for k in folds[0]["timings_s"]
    }
    return result


def _average_folds(folds: list[dict]) -> dict:
    out: dict = {}
    for name in ("pooled", "exhaustive"):
        if name in folds[0]:
            out[name] = average_metrics([f[name] for f in folds])
    if "two_stage" in folds[0]:
        out["two_stage"] = {
            k: average_metrics([f["two_stage"][k] for f in folds]) for k in folds[0]["two_stage"]
        }
    if "camp_alone" in folds[0]:
        out["camp_alone"] = _average_folds([f["camp_alone"] for f in folds])
    if "shortlist_recall" in folds[0]:
        out["shortlist_recall"] = {
            d: {
                k: float(np.mean([f["shortlist_recall"][d][k] for f in folds]))
                for k in folds[0]["shortlist_recall"][d]
            }
            for d in ("t2i", "i2t")
        }
    return out

"""The VSE++/SCAN evaluation protocol (docs/ARCHITECTURE.md, The evaluation protocol) for pooled,
exhaustive and two-stage ranking.

Score matrices are images × captions [N, 5N], caption j belongs to image j // 5.
* i2t rank of image i: best (smallest) position of any of its 5 captions among all 5N captions;
* t2i rank of caption j: position of its image among all N images.
R@K = percent of queries ranked < K; medr = floor(median rank) + 1; meanr = mean rank + 1
(ranks 0-based, as the official code computes them); rsum = the six recalls summed.
Ties count in the query's favour (an exact tie is a measure-zero event with float scores).

Two-stage at K: each query's top K by the pooled score are reordered by the model's final score
and stay above the rest, which keep their pooled order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

CAPTIONS_PER_IMAGE = 5
RECALL_AT = (1, 5, 10)
TWO_STAGE_K = (10, 50, 100, 200)
COCO_FOLD_IMAGES = 1000


def i2t_ranks(scores: np.ndarray) -> np.ndarray:
    """[N, 5N] -> [N] 0-based rank of each image's best ground-truth caption."""
    n = scores.shape[0]
    _check_shape(scores)
    gt = scores.reshape(n, n, CAPTIONS_PER_IMAGE)[np.arange(n), np.arange(n)]  # [N, 5]
    best = gt.max(axis=1)
    return (scores > best[:, None]).sum(axis=1)


def t2i_ranks(scores: np.ndarray) -> np.ndarray:
    """[N, 5N] -> [5N] 0-based rank of each caption's image."""
    _check_shape(scores)
    image_of = np.arange(scores.shape[1]) // CAPTIONS_PER_IMAGE
    gt = scores[image_of, np.arange(scores.shape[1])]
    return (scores > gt[None, :]).sum(axis=0)


def recall_metrics(ranks: np.ndarray) -> dict[str, float]:
    """0-based ranks -> {"r1", "r5", "r10" (percent), "medr", "meanr"}."""
    ranks = np.asarray(ranks)
    out = {f"r{k}": float(100.0 * (ranks < k).mean()) for k in RECALL_AT}
    out["medr"] = float(np.floor(np.median(ranks)) + 1)
    out["meanr"] = float(ranks.mean() + 1)
    return out


def metrics_from_ranks(i2t: np.ndarray, t2i: np.ndarray) -> dict:
    result = {"i2t": recall_metrics(i2t), "t2i": recall_metrics(t2i)}
    result["rsum"] = sum(result[d][f"r{k}"] for d in ("i2t", "t2i") for k in RECALL_AT)
    return result


def retrieval_metrics(scores: np.ndarray) -> dict:
    """Images × captions [N, 5N] -> M = {"i2t": {...}, "t2i": {...}, "rsum"}."""
    return metrics_from_ranks(i2t_ranks(scores), t2i_ranks(scores))


def average_metrics(folds: Sequence[dict]) -> dict:
    """Mean of every figure over folds (COCO 1K reports the mean of its five folds)."""
    out: dict = {d: {} for d in ("i2t", "t2i")}
    for direction in ("i2t", "t2i"):
        for name in folds[0][direction]:
            out[direction][name] = float(np.mean([f[direction][name] for f in folds]))
    out["rsum"] = float(np.mean([f["rsum"] for f in folds]))
    return out


def fold_slices(num_images: int, fold_images: int = COCO_FOLD_IMAGES) -> list[slice]:
    """Image slices of the COCO 1K folds (5 folds of 1,000 on the 5K test set)."""
    return [slice(s, s + fold_images) for s in range(0, num_images - fold_images + 1, fold_images)]


# -- two-stage ---------------------------------------------------------------------------------
def shortlist(pooled: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Indices of the top-k pooled scores per query, best first.

    axis=1: image queries over captions -> [N, k]; axis=0: caption queries over images -> [5N, k].
    """
    queries = pooled if axis == 1 else pooled.T
    k = min(k, queries.shape[1])
    top = np.argpartition(-queries, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(queries, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def shortlist_recall(pooled: np.ndarray, ks: Sequence[int] = TWO_STAGE_K) -> dict:
    """Share (percent) of queries whose ground truth is inside the pooled top K."""
    t2i, i2t = t2i_ranks(pooled), i2t_ranks(pooled)
    return {
        "t2i": {str(k): float(100.0 * (t2i < k).mean()) for k in ks},
        "i2t": {str(k): float(100.0 * (i2t < k).mean()) for k in ks},
    }


def two_stage_scores(
    pooled: np.ndarray, candidates: np.ndarray, final: np.ndarray, k: int, axis: int
) -> np.ndarray:
    """A query-major score matrix whose ordering is the two-stage ranking at K.

    candidates [Q, Kmax] (pooled top, best first) and final [Q, Kmax] their final scores, for
    queries along `axis` (as in `shortlist`). Returned in images × captions orientation.
    """
    queries = pooled if axis == 1 else pooled.T
    out = np.empty_like(queries, dtype=np.float64)
    # Everything outside the top K keeps the pooled order, strictly below the top K.
    out[:] = queries - queries.max() - (k + 1.0)  # all <= -(K+1), below the top K's 0..-(K-1)
    rows = np.arange(len(queries))[:, None]
    top, top_final = candidates[:, :k], final[:, :k].astype(np.float64)
    position = np.argsort(np.argsort(-top_final, axis=1, kind="stable"), axis=1)
    out[rows, top] = -position.astype(np.float64)  # 0, -1, ..., -(K-1): above the rest
    return out if axis == 1 else out.T


def two_stage_metrics(
    pooled: np.ndarray,
    score_pairs: Callable[[np.ndarray, np.ndarray], np.ndarray],
    ks: Sequence[int] = TWO_STAGE_K,
) -> dict[str, dict]:
    """Two-stage metrics for every K, scoring each query's top max(ks) candidates once.

    score_pairs(image_index [P], caption_index [P]) -> final scores [P] of aligned pairs.
    """
    return two_stage_metrics_per_score(
        pooled, lambda images, captions: {"final": score_pairs(images, captions)}, ks
    )["final"]


def two_stage_metrics_per_score(
    pooled: np.ndarray,
    score_pairs: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]],
    ks: Sequence[int] = TWO_STAGE_K,
) -> dict[str, dict[str, dict]]:
    """`two_stage_metrics` for several scores of the same pairs at once (e.g. the fused score
    and CAMP alone): score_pairs returns {name: scores [P]}; the result is {name: {K: M}}."""
    kmax = max(ks)
    per_direction = {}
    for axis in (0, 1):  # 0: t2i (caption queries), 1: i2t (image queries)
        candidates = shortlist(pooled, kmax, axis)
        queries = np.repeat(np.arange(len(candidates)), candidates.shape[1])
        flat = candidates.reshape(-1)
        images, captions = (flat, queries) if axis == 0 else (queries, flat)
        scores = score_pairs(images, captions)
        per_direction[axis] = {
            name: (candidates, final.reshape(candidates.shape)) for name, final in scores.items()
        }
    out: dict[str, dict[str, dict]] = {}
    for name in per_direction[0]:
        out[name] = {}
        for k in ks:
            t2i = t2i_ranks(two_stage_scores(pooled, *per_direction[0][name], k=k, axis=0))
            i2t = i2t_ranks(two_stage_scores(pooled, *per_direction[1][name], k=k, axis=1))
            out[name][str(k)] = metrics_from_ranks(i2t, t2i)
    return out


def _check_shape(scores: np.ndarray) -> None:
    if scores.ndim != 2 or scores.shape[1] != CAPTIONS_PER_IMAGE * scores.shape[0]:
        raise ValueError(
            f"expected images x captions [N, {CAPTIONS_PER_IMAGE}N], got {scores.shape}"
        )

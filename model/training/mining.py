"""Shortlist mining: each training query's pooled top-K, i.e. what the reranker will see."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

MINING_CHUNK = 2048


@dataclass
class MinedShortlists:
    """Top-K candidates (best first) and their pooled scores, per query, both directions.

    t2i: [5N, K] image indices for every caption; i2t: [N, K] caption indices for every image.
    """

    t2i: np.ndarray
    t2i_scores: np.ndarray
    i2t: np.ndarray
    i2t_scores: np.ndarray


def _topk(queries: Tensor, items: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    indices, scores = [], []
    for start in range(0, len(queries), MINING_CHUNK):
        top = (queries[start : start + MINING_CHUNK] @ items.t()).topk(k, dim=1)
        indices.append(top.indices.numpy())
        scores.append(top.values.numpy())
    return np.concatenate(indices), np.concatenate(scores)


@torch.no_grad()
def mine_shortlists(image_vectors: Tensor, text_vectors: Tensor, k: int) -> MinedShortlists:
    """Pooled unit vectors [N, e] and [5N, e] -> top-k both ways (ground truth included)."""
    t2i, t2i_scores = _topk(text_vectors, image_vectors, min(k, len(image_vectors)))
    i2t, i2t_scores = _topk(image_vectors, text_vectors, min(k, len(text_vectors)))
    return MinedShortlists(t2i, t2i_scores, i2t, i2t_scores)


def sample_negatives(
    candidates: np.ndarray,
    is_positive: np.ndarray,
    count: int,
    rng: np.random.Generator,
    pool: int,
) -> np.ndarray:
    """`count` negatives per row drawn uniformly from the first `pool` non-positive candidates.

    candidates [Q, K], is_positive [Q, K] bool -> [Q, count] column indices into candidates.
    """
    pool = min(pool, candidates.shape[1])
    weights = rng.random((len(candidates), pool))
    weights[is_positive[:, :pool]] = -1.0  # never pick a positive
    return np.argsort(-weights, axis=1)[:, :count]

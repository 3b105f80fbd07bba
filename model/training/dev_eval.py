"""Fast dev evaluation of a network on frozen features (no MiniLM pass: cached token features)."""

from __future__ import annotations

import time

import numpy as np
import torch

from model.architecture.network import RetrievalNetwork
from model.eval.evaluate_model import PAIR_CHUNK, pairs_per_call
from model.eval.protocol import retrieval_metrics, shortlist_recall, two_stage_metrics
from model.training.features import FrozenSplit


@torch.no_grad()
def pooled_scores(network: RetrievalNetwork, data: FrozenSplit) -> np.ndarray:
    """Images × captions [N, 5N] shortlist scores."""
    images = network.heads.image.embed_mean(data.region_means)
    texts = network.heads.text.embed_mean(data.text_means)
    return (images @ texts.t()).numpy()


def pair_scorer(network: RetrievalNetwork, data: FrozenSplit, pooled: np.ndarray):
    """score_pairs(image_index, caption_index) -> final fused scores, in chunks."""
    scorer = network.pair_scorer()
    with torch.no_grad():
        every = np.arange(len(data.region_means))
        encoded = network.camp.image_encoder(data.regions(every))
        images = scorer.precompute_images(encoded, data.region_counts(every))

    @torch.no_grad()
    def score_pairs(image_index: np.ndarray, caption_index: np.ndarray) -> np.ndarray:
        out = np.empty(len(image_index), dtype=np.float32)
        for start in range(0, len(image_index), PAIR_CHUNK):
            ii = image_index[start : start + PAIR_CHUNK]
            cc = caption_index[start : start + PAIR_CHUNK]
            unique, slot = np.unique(cc, return_inverse=True)
            features, lengths = data.tokens.batch(unique)
            captions = scorer.precompute_captions(network.words_from_features(features, lengths))
            part = pairs_per_call(images, captions)
            for at in range(0, len(ii), part):  # large pairs (d = 1024): several calls
                rows = slice(at, at + part)
                logits = scorer.score_pairs(
                    images.select(torch.as_tensor(ii[rows])),
                    captions.select(torch.as_tensor(slot[rows])),
                )
                shortlist = torch.from_numpy(pooled[ii[rows], cc[rows]])
                out[start + at : start + at + len(logits)] = network.fusion(
                    shortlist, logits
                ).numpy()
        return out

    return score_pairs


def evaluate_frozen(network: RetrievalNetwork, data: FrozenSplit, ks=(10, 50, 100, 200)) -> dict:
    """pooled + two-stage metrics, shortlist recall and timings on a frozen split."""
    started = time.perf_counter()
    pooled = pooled_scores(network, data)
    result = {"pooled": retrieval_metrics(pooled), "shortlist_recall": shortlist_recall(pooled, ks)}
    pooled_s = time.perf_counter() - started
    started = time.perf_counter()
    result["two_stage"] = two_stage_metrics(pooled, pair_scorer(network, data, pooled), ks)
    result["timings_s"] = {"pooled": pooled_s, "two_stage_all_k": time.perf_counter() - started}
    return result

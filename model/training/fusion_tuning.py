"""Tune the score fusion on dev: CAMP's logits for each query's shortlist are computed once,
then every candidate weight is a cheap recombination (the fusion is part of the checkpoint)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.architecture.network import RetrievalNetwork
from model.eval.protocol import two_stage_metrics
from model.training.dev_eval import pair_scorer, pooled_scores
from model.training.features import FrozenSplit

# The last weight ranks each shortlist by CAMP alone (reported as "CAMP alone in top K").
CAMP_WEIGHTS = (0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 1000.0)


class _RecordedPairs:
    """Remembers the (shortlist, CAMP) parts of the pairs two_stage_metrics asks for, in order."""

    def __init__(self, network: RetrievalNetwork, data: FrozenSplit, pooled: np.ndarray) -> None:
        self.pooled = pooled
        with torch.no_grad():
            saved = (float(network.fusion.shortlist_weight), float(network.fusion.camp_weight))
            network.fusion.shortlist_weight.fill_(0.0)
            network.fusion.camp_weight.fill_(1.0)
        self.camp = pair_scorer(network, data, pooled)
        self.calls: list[np.ndarray] = []
        self._restore = (network, saved)

    def record(self, images: np.ndarray, captions: np.ndarray) -> np.ndarray:
        self.calls.append(self.camp(images, captions))
        return self.calls[-1]

    def restore(self) -> None:
        network, (shortlist, camp) = self._restore
        with torch.no_grad():
            network.fusion.shortlist_weight.fill_(shortlist)
            network.fusion.camp_weight.fill_(camp)


def tune_fusion(
    network: RetrievalNetwork,
    data: FrozenSplit,
    k: int,
    shortlist_weight: float,
    camp_weights: Sequence[float] = CAMP_WEIGHTS,
) -> tuple[float, dict[float, dict]]:
    """Set fusion = (shortlist_weight, best camp weight by two-stage rsum at K); returns
    (best weight, {weight: metrics at K}). The candidates are `camp_weights` in units of the
    scorer's registry scale (CAMP's logits: 1; IMRAM's sum of cosines: the heads' scale per
    cosine), so one grid fits every scorer."""
    scale = network.spec.reranker_kind.score_scale(network)
    camp_weights = [weight * scale for weight in camp_weights]
    pooled = pooled_scores(network, data)
    recorded = _RecordedPairs(network, data, pooled)
    two_stage_metrics(pooled, recorded.record, ks=(k,))
    recorded.restore()
    results = {}
    for weight in camp_weights:
        calls = iter(recorded.calls)

        def fused(images, captions, weight=weight, calls=calls):
            return shortlist_weight * pooled[images, captions] + weight * next(calls)

        results[weight] = two_stage_metrics(pooled, fused, ks=(k,))[str(k)]
    best = max(results, key=lambda w: results[w]["rsum"])
    with torch.no_grad():
        network.fusion.shortlist_weight.fill_(shortlist_weight)
        network.fusion.camp_weight.fill_(best)
    return best, results

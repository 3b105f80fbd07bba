"""The final two-stage score: the shortlist score fused with CAMP's score (part of the model).

final = shortlist_weight · shortlist_score + camp_weight · camp_logit, both weights
learned (or tuned on dev) and saved in the checkpoint. CAMP contributes its *logit* (the score
MLP before the sigmoid), so a confident reranker is not flattened by sigmoid saturation; with
camp_weight = 0 the ranking is exactly the shortlist's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.architecture.scorer import CampScorer

# Initial weight of the cosine skip (about an InfoNCE temperature of 0.1).
INITIAL_COSINE_SCALE = 10.0


class CampLogitScorer(CampScorer):
    """CampScorer whose `score_mlp` returns the pre-sigmoid logit (same weights, same names).

    `PrecomputedScorer` calls `score_mlp`, so with this scorer its scores are logits; the
    direct `forward` keeps CampScorer's sigmoid outputs (used only for parity checks).

    `cosine_skip=True` adds `cosine_scale · ⟨v*, t*⟩` to the logit: the authors' first training
    stage scores pairs by this cosine alone, and an MLP over [v*; t*] learns nothing for
    hundreds of steps on a CPU, so the skip lets the message passing learn from the start.
    Without it (official checkpoints) the state dict is exactly CampScorer's.
    """

    def __init__(self, *, embed_size: int, num_heads: int = 4, cosine_skip: bool = False) -> None:
        super().__init__(embed_size=embed_size, num_heads=num_heads)
        self.cosine_scale = (
            nn.Parameter(torch.tensor(INITIAL_COSINE_SCALE)) if cosine_skip else None
        )

    def score_mlp(self, pooled_image: Tensor, pooled_text: Tensor) -> Tensor:
        joint = torch.cat((pooled_image, pooled_text), dim=-1)
        logit = self.score_out(F.relu(self.score_hidden(joint))).squeeze(-1)
        if self.cosine_scale is not None:
            logit = logit + self.cosine_scale * (pooled_image * pooled_text).sum(-1)
        return logit


class ScoreFusion(nn.Module):
    """final = shortlist_weight · shortlist + camp_weight · camp_logit (elementwise)."""

    def __init__(self, shortlist_weight: float = 1.0, camp_weight: float = 0.0) -> None:
        super().__init__()
        self.shortlist_weight = nn.Parameter(torch.tensor(float(shortlist_weight)))
        self.camp_weight = nn.Parameter(torch.tensor(float(camp_weight)))

    def forward(self, shortlist_scores: Tensor, camp_logits: Tensor) -> Tensor:
        return self.shortlist_weight * shortlist_scores + self.camp_weight * camp_logits

"""Training losses on a square score matrix S [B, B]: rows images, columns captions, diagonal
positives (docs/ARCHITECTURE.md, Training and Shortlist heads). All return a scalar **sum** over
the batch unless named mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The official BCE clamps scores into [eps, 1 - eps] before the logs.
BCE_EPS = 1e-6
# VSE++ margin used for the pooled shortlist embeddings.
VSE_MARGIN = 0.2


def _check_square(scores: Tensor) -> None:
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1] or scores.shape[0] < 2:
        raise ValueError(f"expected a square score matrix with B >= 2, got {tuple(scores.shape)}")


def _bce_terms(scores: Tensor) -> tuple[Tensor, Tensor]:
    """log s on the diagonal and log(1 - s) off it, zero elsewhere (as the official code)."""
    s = scores.clamp(min=BCE_EPS, max=1.0 - BCE_EPS)
    positive = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    return torch.log(s) * positive, torch.log(1.0 - s) * (1.0 - positive)


def bce_hardest_negative_loss(scores: Tensor) -> Tensor:
    """CAMP's training loss: −Σ_i [2 log s_ii + log(1 − max_j≠i s_ij) + log(1 − max_k≠i s_ki)].

    `scores` are sigmoid outputs. The hardest negative is taken from the zeroed-diagonal log
    matrix exactly as coded (min over log(1-s) with 0 on the diagonal).
    """
    _check_square(scores)
    positive, negative = _bce_terms(scores)
    return -(
        2.0 * positive.sum() + negative.min(dim=1).values.sum() + negative.min(dim=0).values.sum()
    )


def bce_mean_loss(scores: Tensor) -> Tensor:
    """The official non-hardest variant: −(mean_i log s_ii + mean over all B² of log(1 − s))
    with the diagonal's negative term zeroed (so its mean divides by B², as coded)."""
    _check_square(scores)
    positive, negative = _bce_terms(scores)
    return -(positive.diagonal().mean() + negative.mean())


def vse_hinge_loss(
    scores: Tensor, margin: float = VSE_MARGIN, max_violation: bool = True
) -> Tensor:
    """VSE++ hinge on similarities (e.g. inner products of l2-normalised pooled embeddings).

    max_violation=True: one hardest negative caption per image and image per caption (VSE++);
    False: the sum over all negatives.
    """
    _check_square(scores)
    diagonal = scores.diagonal().unsqueeze(1)
    cost_caption = (margin + scores - diagonal).clamp(min=0)  # image i vs captions j (rows)
    cost_image = (margin + scores - diagonal.t()).clamp(min=0)  # caption j vs images i (cols)
    positives = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_caption = cost_caption.masked_fill(positives, 0.0)
    cost_image = cost_image.masked_fill(positives, 0.0)
    if max_violation:
        return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    return cost_caption.sum() + cost_image.sum()

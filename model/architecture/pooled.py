"""Shortlist heads (docs/ARCHITECTURE.md, Shortlist heads): cheap pooled embeddings compared by
inner product.

Each side mean-pools its fragments (regions, or a caption's real tokens), maps the mean through a
linear map plus a small MLP residual, and l2-normalises, so FAISS inner product = cosine. The
heads read the *raw* inputs (region features, frozen text-encoder token features), not CAMP's
encoders, so the shortlist can be trained and re-indexed independently of the reranker.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.architecture.encoders import length_mask
from model.architecture.scorer import l2norm

# InfoNCE temperature at initialisation (CLIP's 0.07); the learned scale is capped at 100.
INITIAL_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0


def masked_mean(fragments: Tensor, lengths: Tensor | None = None) -> Tensor:
    """[B, N, D] -> [B, D], averaging only the first `lengths[b]` fragments when given."""
    if lengths is None:
        return fragments.mean(dim=1)
    keep = length_mask(lengths, fragments.shape[1]).to(fragments.dtype).unsqueeze(-1)
    return (fragments * keep).sum(1) / keep.sum(1).clamp_min(1.0)


class PooledHead(nn.Module):
    """mean over fragments -> Linear + MLP residual -> l2norm; [B, N, in_dim] -> [B, out_dim]."""

    def __init__(self, *, in_dim: int, out_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, fragments: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.embed_mean(masked_mean(fragments, lengths))

    def embed_mean(self, mean: Tensor) -> Tensor:
        """Already-pooled input [B, in_dim] -> [B, out_dim] unit vectors."""
        return l2norm(self.linear(mean) + self.mlp(mean))


class PooledHeads(nn.Module):
    """The image and text shortlist heads plus the learned InfoNCE logit scale."""

    def __init__(self, *, image_dim: int, text_dim: int, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.image = PooledHead(in_dim=image_dim, out_dim=embed_dim, hidden_dim=hidden_dim)
        self.text = PooledHead(in_dim=text_dim, out_dim=embed_dim, hidden_dim=hidden_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / INITIAL_TEMPERATURE)))

    @property
    def embed_dim(self) -> int:
        return self.image.out_dim

    @property
    def logit_scale(self) -> Tensor:
        return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def hyperparameters(self) -> dict[str, int]:
        return {
            "image_dim": self.image.in_dim,
            "text_dim": self.text.in_dim,
            "embed_dim": self.image.out_dim,
            "hidden_dim": self.image.mlp[0].out_features,
        }

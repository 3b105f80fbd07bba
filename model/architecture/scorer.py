"""The CAMP cross-modal scorer (docs/ARCHITECTURE.md, The scorer), exactly as the authors coded it.

`CampScorer` holds the weights and computes the *direct form*: every image of a batch against
every caption, as the official training and evaluation code does. The reranker uses the
cheaper, equal precompute split in `model.architecture.precompute`, built on the same weights.

Parameter names explain their role; `model.checkpoints.checkpoint.OFFICIAL_SCORER_KEYS` maps
them to the official ones (`img_key_fc`, `weighted_txt_query_fc`, `fc_1.0`,
`final_reduce_1.linear.0`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.checkpoints.config import CampConfig

# The official code writes -1e9 into masked attention logits (exp() of it is exactly 0).
MASKED_LOGIT = -1e9
# l2norm(x) = x / (||x|| + eps), as coded.
L2NORM_EPS = 1e-8


def wide(x: Tensor) -> torch.dtype:
    """float32, or x's dtype when wider: reductions and softmaxes under autocast stay exact
    enough on any device (CUDA's autocast does this by itself, a CPU's does not)."""
    return torch.promote_types(x.dtype, torch.float32)


def l2norm(x: Tensor, dim: int = -1) -> Tensor:
    """x / (||x||_2 + 1e-8) along `dim` (the official formula, not F.normalize); the norm in
    float32 or wider (under autocast too)."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True, dtype=wide(x)).sqrt() + L2NORM_EPS)


def masked_logits(logits: Tensor, keep: Tensor, *, inplace: bool = False) -> Tensor:
    """Replace logits where `keep` is False by -1e9 (or the dtype's lowest value in fp16);
    `inplace` for a fresh product nothing else reads (inference only)."""
    fill = max(MASKED_LOGIT, torch.finfo(logits.dtype).min)
    return logits.masked_fill_(~keep, fill) if inplace else logits.masked_fill(~keep, fill)


@dataclass
class AttentionMaps:
    """Attention and gate weights for a grid of (image, caption) pairs: what `explain` draws.

    Shapes for Ni images x Nc captions, R region slots, L word slots, H pooling heads:
    attn_t2v [Ni, Nc, L, R] each word over regions (zero on padded regions); attn_v2t
    [Ni, Nc, R, L] each region over words (zero on padded words); selfattn_v [Ni, Nc, R, R]
    (zero on padded regions as keys); selfattn_t [Ni, Nc, L, L]; gate_v [Ni, Nc, R]; gate_t
    [Ni, Nc, L]; pool_attn_v [Ni, Nc, H, R] (zero on padded regions); pool_attn_t [Ni, Nc, H, L]
    (zero on padded words). Rows of padded words and padded regions are meaningless.
    """

    attn_t2v: Tensor
    attn_v2t: Tensor
    selfattn_v: Tensor
    selfattn_t: Tensor
    gate_v: Tensor
    gate_t: Tensor
    pool_attn_v: Tensor
    pool_attn_t: Tensor


@dataclass
class ScoreTrace:
    """Every intermediate of the direct form, for parity checks and inspection.

    Per-image tensors are [Ni, R, ...], per-caption [Nc, L, ...], per-pair [Ni, Nc, ...].
    `*_fusion_output` is ReLU(W (g·[x; F])) before the residual; `pooled_*` are before l2norm;
    `score_input` is [v*; t*] after l2norm.
    """

    scores: Tensor  # [Ni, Nc]
    attention: AttentionMaps
    image_keys: Tensor  # [Ni, R, d]
    image_queries: Tensor
    text_keys: Tensor  # [Nc, L, d]
    text_queries: Tensor
    region_messages: Tensor  # M_v [Ni, Nc, R, d]
    region_message_queries: Tensor
    region_message_keys: Tensor
    word_messages: Tensor  # M_t [Ni, Nc, L, d]
    word_message_queries: Tensor
    word_message_keys: Tensor
    image_fusion_input: Tensor  # [Ni, Nc, R, 2d]
    image_fusion_output: Tensor  # [Ni, Nc, R, d]
    text_fusion_input: Tensor  # [Ni, Nc, L, 2d]
    text_fusion_output: Tensor  # [Ni, Nc, L, d]
    fused_regions: Tensor  # v-hat [Ni, Nc, R, d]
    fused_words: Tensor  # t-hat [Ni, Nc, L, d]
    pooled_image: Tensor  # [Ni, Nc, d]
    pooled_text: Tensor  # [Ni, Nc, d]
    score_input: Tensor  # [Ni, Nc, 2d]


class AttentionPool(nn.Module):
    """Multi-head attention pooling (official `SummaryAttn`), heads averaged, no normalisation."""

    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(dim, dim)
        self.heads = nn.Linear(dim, num_heads)

    def forward(self, fragments: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """fragments [..., N, d], keep [..., N] bool (broadcastable) -> ([..., d], [..., H, N])."""
        logits = self.heads(F.relu(self.hidden(fragments))).transpose(-2, -1)
        if keep is not None:
            logits = masked_logits(logits, keep.unsqueeze(-2))
        weights = logits.softmax(dim=-1, dtype=wide(logits))
        pooled = torch.matmul(weights, fragments).mean(dim=-2)
        return pooled, weights


def attention(
    query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention without value projection; `keep` masks keys."""
    logits = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(query.shape[-1])
    if keep is not None:
        logits = masked_logits(logits, keep)
    weights = logits.softmax(dim=-1, dtype=wide(logits))
    return torch.matmul(weights, value), weights


class CampScorer(nn.Module):
    """One CAMP message-passing step + gated fusion + attention pooling + score MLP.

    `forward(images [Ni, R, d], words [Nc, L, d], word_mask [Nc, L], region_mask [Ni, R] | None)
    -> scores [Ni, Nc]` in (0, 1). Padded regions are masked exactly as padded words are (in
    every softmax whose axis they lie on, and in the pooling), so scores do not depend on how
    far `words` or `images` is padded; `region_mask=None` means every region is real and runs
    exactly the unmasked arithmetic of the authors' code.
    Memory grows as Ni·Nc·(R+L)·d: use `model.architecture.precompute` for large grids.
    """

    def __init__(self, *, embed_size: int, num_heads: int = 4) -> None:
        super().__init__()
        d = embed_size
        self.embed_size = d
        self.num_heads = num_heads
        # Stage 1: cross-modal attention (values are the raw features).
        self.image_key = nn.Linear(d, d, bias=False)
        self.text_key = nn.Linear(d, d, bias=False)
        self.image_query = nn.Linear(d, d, bias=False)
        self.text_query = nn.Linear(d, d, bias=False)
        # Stage 2: self-attention over the messages. region_message_* act on M_v (textual
        # messages received by regions), word_message_* on M_t (visual messages for words).
        self.region_message_query = nn.Linear(d, d, bias=False)
        self.region_message_key = nn.Linear(d, d, bias=False)
        self.word_message_query = nn.Linear(d, d, bias=False)
        self.word_message_key = nn.Linear(d, d, bias=False)
        # Gated concat fusion, residual.
        self.image_fusion = nn.Linear(2 * d, d, bias=False)
        self.text_fusion = nn.Linear(2 * d, d, bias=False)
        # Pooling and score MLP.
        self.image_pool = AttentionPool(dim=d, num_heads=num_heads)
        self.text_pool = AttentionPool(dim=d, num_heads=num_heads)
        self.score_hidden = nn.Linear(2 * d, d)
        self.score_out = nn.Linear(d, 1)

    @classmethod
    def from_config(cls, config: CampConfig) -> CampScorer:
        return cls(embed_size=config.embed_size, num_heads=config.num_heads)

    def forward(
        self, images: Tensor, words: Tensor, word_mask: Tensor, region_mask: Tensor | None = None
    ) -> Tensor:
        return self._direct(images, words, word_mask, region_mask, keep_trace=False).scores

    def forward_with_trace(
        self, images: Tensor, words: Tensor, word_mask: Tensor, region_mask: Tensor | None = None
    ) -> ScoreTrace:
        """Same scores as `forward`, with every intermediate kept."""
        return self._direct(images, words, word_mask, region_mask, keep_trace=True)

    def score_mlp(self, pooled_image: Tensor, pooled_text: Tensor) -> Tensor:
        """l2-normalised v*, t* [..., d] -> sigmoid score [...]."""
        joint = torch.cat((pooled_image, pooled_text), dim=-1)
        return torch.sigmoid(self.score_out(F.relu(self.score_hidden(joint)))).squeeze(-1)

    def _direct(
        self,
        images: Tensor,
        words: Tensor,
        word_mask: Tensor,
        region_mask: Tensor | None,
        *,
        keep_trace: bool,
    ):
        if images.dim() != 3 or words.dim() != 3 or word_mask.shape != words.shape[:2]:
            raise ValueError(
                f"expected images [Ni, R, d], words [Nc, L, d], word_mask [Nc, L]; got "
                f"{tuple(images.shape)}, {tuple(words.shape)}, {tuple(word_mask.shape)}"
            )
        if region_mask is not None and region_mask.shape != images.shape[:2]:
            raise ValueError(
                f"expected region_mask [Ni, R] = {tuple(images.shape[:2])}, got "
                f"{tuple(region_mask.shape)}"
            )
        keep_words = word_mask.bool()
        # Masks the region axis of [Ni, Nc, *, R]; None: every region is real (nothing masked).
        region_keep = None if region_mask is None else region_mask.bool()[:, None, None, :]
        ni, nc = images.shape[0], words.shape[0]
        image_keys, image_queries = self.image_key(images), self.image_query(images)
        text_keys, text_queries = self.text_key(words), self.text_query(words)

        # Pair grid [Ni, Nc, ...] (expanded views, no copies).
        v = images.unsqueeze(1).expand(-1, nc, -1, -1)
        t = words.unsqueeze(0).expand(ni, -1, -1, -1)
        word_keep = keep_words[None, :, None, :]  # masks the word axis of [Ni, Nc, *, L]

        # Stage 1: every word attends over regions; every region over real words.
        word_messages, attn_t2v = attention(
            text_queries.unsqueeze(0), image_keys.unsqueeze(1), v, region_keep
        )
        region_messages, attn_v2t = attention(
            image_queries.unsqueeze(1), text_keys.unsqueeze(0), t, word_keep
        )

        # Stage 2: self-attention over the messages within each modality.
        rm_q = self.region_message_query(region_messages)
        rm_k = self.region_message_key(region_messages)
        wm_q = self.word_message_query(word_messages)
        wm_k = self.word_message_key(word_messages)
        refined_regions, selfattn_v = attention(rm_q, rm_k, region_messages, region_keep)
        refined_words, selfattn_t = attention(wm_q, wm_k, word_messages, word_keep)
        refined_regions, refined_words = l2norm(refined_regions), l2norm(refined_words)

        # Gated concat fusion with residual.
        gate_v = torch.sigmoid((v * refined_regions).sum(dim=-1))
        gate_t = torch.sigmoid((t * refined_words).sum(dim=-1))
        image_fusion_input = torch.cat((v, refined_regions), dim=-1) * gate_v.unsqueeze(-1)
        text_fusion_input = torch.cat((t, refined_words), dim=-1) * gate_t.unsqueeze(-1)
        image_fusion_output = F.relu(self.image_fusion(image_fusion_input))
        text_fusion_output = F.relu(self.text_fusion(text_fusion_input))
        fused_regions = image_fusion_output + v
        fused_words = text_fusion_output + t

        # Attention pooling, l2norm, score MLP.
        pooled_image, pool_attn_v = self.image_pool(
            fused_regions, None if region_keep is None else region_keep[:, :, 0]
        )
        pooled_text, pool_attn_t = self.text_pool(fused_words, keep_words.unsqueeze(0))
        image_vec, text_vec = l2norm(pooled_image), l2norm(pooled_text)
        score_input = torch.cat((image_vec, text_vec), dim=-1)
        scores = torch.sigmoid(self.score_out(F.relu(self.score_hidden(score_input)))).squeeze(-1)

        if not keep_trace:
            return _ScoresOnly(scores)
        return ScoreTrace(
            scores=scores,
            attention=AttentionMaps(
                attn_t2v=attn_t2v,
                attn_v2t=attn_v2t,
                selfattn_v=selfattn_v,
                selfattn_t=selfattn_t,
                gate_v=gate_v,
                gate_t=gate_t,
                pool_attn_v=pool_attn_v,
                pool_attn_t=pool_attn_t,
            ),
            image_keys=image_keys,
            image_queries=image_queries,
            text_keys=text_keys,
            text_queries=text_queries,
            region_messages=region_messages,
            region_message_queries=rm_q,
            region_message_keys=rm_k,
            word_messages=word_messages,
            word_message_queries=wm_q,
            word_message_keys=wm_k,
            image_fusion_input=image_fusion_input,
            image_fusion_output=image_fusion_output,
            text_fusion_input=text_fusion_input,
            text_fusion_output=text_fusion_output,
            fused_regions=fused_regions,
            fused_words=fused_words,
            pooled_image=pooled_image,
            pooled_text=pooled_text,
            score_input=score_input,
        )


@dataclass
class _ScoresOnly:
    scores: Tensor

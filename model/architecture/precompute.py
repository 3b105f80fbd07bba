"""The precompute split of the CAMP scorer (docs/ARCHITECTURE.md, The precompute split): same
scores, far less work per pair.

Matrix products regroup (W(A X) = A(X Wᵀ)), so every projection of an image's regions V is
computed once per image and every projection of a caption's words T once per caption:

* stage-1 keys/queries of both sides;
* the stage-2 self-attention logits collapse to per-item kernels: for words,
  (M_t W3ᵀ)(M_t W4ᵀ)ᵀ = A_t2v [(V W3ᵀ)(V W4ᵀ)ᵀ] A_t2vᵀ, so the image keeps (V W3ᵀ)(V W4ᵀ)ᵀ/√d
  [R, R]; the caption keeps (T W1ᵀ)(T W2ᵀ)ᵀ/√d [L, L];
* the refined messages are P·V and P·T with P = (self-attention)(cross-attention) small
  [L, R] / [R, L] matrices, so the halves of the fusion layers W_fv = [W_a | W_b] apply to
  V and T once: W_a v and W_b F_v = (P_v (T W_bᵀ)) / ||P_v T||.

What stays per pair is the attention itself, the norms and gates, the pooling MLP's first layer
and the score MLP. Captions are trimmed to their own length; padding up to a batch's longest
caption is masked exactly, and so is padding up to a batch's most regions (a detector's
variable box counts), so scores do not depend on padding or batching (to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint

from model.architecture.encoders import EncodedText, length_mask
from model.architecture.scorer import (
    L2NORM_EPS,
    AttentionMaps,
    CampScorer,
    l2norm,
    masked_logits,
    wide,
)

# Working memory one chunk of an N x M grid may use (activations, not the inputs).
DEFAULT_MEMORY_BUDGET_BYTES = 512 * 2**20


_IMAGE_REGION_FIELDS = ("regions", "queries", "keys", "fusion_self", "fusion_for_words")
_IMAGE_SQUARE_FIELDS = ("word_message_logits", "gram")


class _PerItemTensors:
    """What every per-item tensor set of a scorer shares (CAMP's and IMRAM's, images and
    captions): N items' tensors padded to the widest, [N, W, d] row fields and [N, W, W]
    square fields, and the [N] int64 counts of real slots. Subclasses name their fields."""

    _ROW_FIELDS: tuple[str, ...] = ()
    _SQUARE_FIELDS: tuple[str, ...] = ()
    _COUNTS = ""

    def __len__(self) -> int:
        return getattr(self, self._ROW_FIELDS[0]).shape[0]

    @property
    def mask(self) -> Tensor:
        """[N, W] bool, True on real regions (or words)."""
        return length_mask(getattr(self, self._COUNTS), getattr(self, self._ROW_FIELDS[0]).shape[1])

    def repeat(self, count: int) -> Self:
        """One item as `count` rows: expanded views, no copy, no index tensor on the device."""
        return type(self)(**{f.name: _expand(getattr(self, f.name), count) for f in fields(self)})

    def to(self, device=None, dtype=None) -> Self:
        return _moved(self, self._COUNTS, device, dtype)

    @classmethod
    def cat(cls, items: list[Self]) -> Self:
        """Concatenate, padding every item to the widest one (see `_padded_cat`); items of one
        width concatenate exactly as before masks existed."""
        counts = torch.cat([getattr(item, cls._COUNTS) for item in items])
        padded = _padded_cat(items, cls._ROW_FIELDS, cls._SQUARE_FIELDS)
        return cls(**{cls._COUNTS: counts}, **padded)

    def _rows(self, index: Tensor | slice | list[int]) -> Self:
        return type(self)(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def _narrowed_to(self, width: int) -> Self:
        return _narrowed(self, width, self._ROW_FIELDS, self._SQUARE_FIELDS)


class ImageTensorsBase(_PerItemTensors):
    """Per-image tensors: `select` keeps the padding (no host synchronisation)."""

    _COUNTS = "region_counts"

    def select(self, index: Tensor | slice | list[int]) -> Self:
        """A subset, padded as before (no host synchronisation; `trimmed` narrows it)."""
        return self._rows(index)

    def trimmed(self, width: int | None = None) -> Self:
        """Views narrowed to `width` region slots (None: the most regions of these images, read
        back from the device); `width` must not cut a real region."""
        return self._narrowed_to(int(self.region_counts.max()) if width is None else width)


class CaptionTensorsBase(_PerItemTensors):
    """Per-caption tensors: `select` trims to the subset's own longest caption."""

    _COUNTS = "lengths"

    def select(self, index: Tensor | slice | list[int]) -> Self:
        """A subset, trimmed to its own longest caption."""
        return self._rows(index).trimmed()

    def trimmed(self) -> Self:
        return self._narrowed_to(int(self.lengths.max()))


@dataclass
class ImagePrecompute(ImageTensorsBase):
    """Per-image tensors of N images, padded to the most regions among them (R).

    regions V [N, R, d] (zero past each image's count); region_counts [N] int64, real regions
    per image (the rest are padding, masked exactly); queries V Wqvᵀ and keys V Wkvᵀ [N, R, d];
    word_message_logits (V W3ᵀ)(V W4ᵀ)ᵀ/√d [N, R, R]; gram V Vᵀ [N, R, R]; fusion_self V W_aᵀ
    (first half of image_fusion) [N, R, d]; fusion_for_words V W_bᵀ (second half of
    text_fusion) [N, R, d].
    """

    regions: Tensor
    queries: Tensor
    keys: Tensor
    word_message_logits: Tensor
    gram: Tensor
    fusion_self: Tensor
    fusion_for_words: Tensor
    region_counts: Tensor

    _ROW_FIELDS = _IMAGE_REGION_FIELDS
    _SQUARE_FIELDS = _IMAGE_SQUARE_FIELDS

    @staticmethod
    def bytes_of_one(regions: int, dim: int, element_size: int) -> int:
        """Bytes of one image's tensors with `regions` regions: five [R, d], two [R, R], a count."""
        return (5 * regions * dim + 2 * regions * regions) * element_size + 8


def _padded_cat(items: list, row_fields: tuple[str, ...], square_fields: tuple[str, ...]):
    """{field: the items' tensors concatenated, each padded with zeros to the widest}.

    `row_fields` are [n, W, d], `square_fields` [n, W, W], W varying by item. Items of one width
    are one `torch.cat` per tensor. Mixed widths on a GPU cost one `torch.cat` and one
    `masked_scatter_` per tensor into a zeroed buffer: the slots each row owns come from the
    shapes, known on the host, so nothing is read back from the device and no op runs per item.
    On the CPU, where `masked_scatter_` is slow and an op per item cheap: `_padded_cat_cpu`.
    """
    widths = [getattr(item, row_fields[0]).shape[1] for item in items]
    width = max(widths)
    if min(widths) == width:
        return {
            name: torch.cat([getattr(item, name) for item in items])
            for name in (*row_fields, *square_fields)
        }
    first = getattr(items[0], row_fields[0])
    if first.device.type == "cpu":
        return _padded_cat_cpu(items, widths, row_fields, square_fields)
    owned = _owned_slots(widths, [len(item) for item in items], width, first.device)
    rows = owned.shape[0]
    out: dict[str, Tensor] = {}
    for name in row_fields:
        flat = torch.cat([getattr(item, name).reshape(-1) for item in items])
        padded = flat.new_zeros((rows, width, getattr(items[0], name).shape[-1]))
        out[name] = padded.masked_scatter_(owned.unsqueeze(-1), flat)
    square = owned.unsqueeze(-1) & owned.unsqueeze(-2)
    for name in square_fields:
        flat = torch.cat([getattr(item, name).reshape(-1) for item in items])
        out[name] = flat.new_zeros((rows, width, width)).masked_scatter_(square, flat)
    return out


def _padded_cat_cpu(
    items: list, widths: list[int], row_fields: tuple[str, ...], square_fields: tuple[str, ...]
) -> dict[str, Tensor]:
    """`_padded_cat` of mixed widths on the CPU: each row field one `pad_sequence` over the
    items' rows, each square field a zeroed buffer that every item's block is copied into
    (100 captions of 9-49 words: 14.8 ms against 18.0 ms with `masked_scatter_`)."""
    width = max(widths)
    out: dict[str, Tensor] = {}
    for name in row_fields:
        rows = [row for item in items for row in getattr(item, name).unbind(0)]
        out[name] = pad_sequence(rows, batch_first=True)
    for name in square_fields:
        padded = getattr(items[0], name).new_zeros((sum(map(len, items)), width, width))
        start = 0
        for item, item_width in zip(items, widths, strict=True):
            block = getattr(item, name)
            padded[start : start + len(block), :item_width, :item_width] = block
            start += len(block)
        out[name] = padded
    return out


def _owned_slots(widths: list[int], rows: list[int], width: int, device: torch.device) -> Tensor:
    """[sum(rows), width] bool: True on the region slots each row's own item has.

    Built from shapes on the host and copied once (pinned and non-blocking on CUDA, so the host
    never waits for the device)."""
    per_row = torch.repeat_interleave(torch.tensor(widths), torch.tensor(rows))
    if device.type == "cuda":
        per_row = per_row.pin_memory().to(device, non_blocking=True)
    else:
        per_row = per_row.to(device)
    return length_mask(per_row, width)


def _narrowed(item, width: int, row_fields: tuple[str, ...], square_fields: tuple[str, ...]):
    """`item` with its [n, W, d] and [n, W, W] tensors narrowed to `width` slots (views)."""
    if width == getattr(item, row_fields[0]).shape[1]:
        return item
    changes = {name: getattr(item, name)[:, :width] for name in row_fields}
    changes.update({name: getattr(item, name)[:, :width, :width] for name in square_fields})
    return replace(item, **changes)


def _moved(item, counts_field: str, device, dtype):
    """`item` on `device` with its tensors cast to `dtype`; the integer counts keep theirs."""
    moved = {
        f.name: getattr(item, f.name).to(device=device, dtype=dtype)
        for f in fields(item)
        if f.name != counts_field
    }
    counts = getattr(item, counts_field).to(device=device)
    return type(item)(**{counts_field: counts}, **moved)


_CAPTION_WORD_FIELDS = ("words", "queries", "keys", "fusion_self", "fusion_for_regions")
_CAPTION_SQUARE_FIELDS = ("region_message_logits", "gram")


@dataclass
class CaptionPrecompute(CaptionTensorsBase):
    """Per-caption tensors of N captions, padded to the longest of them (L).

    words T [N, L, d] (zero past each length); lengths [N] int64; queries T Wqtᵀ, keys T Wktᵀ
    [N, L, d]; region_message_logits (T W1ᵀ)(T W2ᵀ)ᵀ/√d [N, L, L]; gram T Tᵀ [N, L, L];
    fusion_self T W_aᵀ (first half of text_fusion) [N, L, d]; fusion_for_regions T W_bᵀ
    (second half of image_fusion) [N, L, d].
    """

    words: Tensor
    lengths: Tensor
    queries: Tensor
    keys: Tensor
    region_message_logits: Tensor
    gram: Tensor
    fusion_self: Tensor
    fusion_for_regions: Tensor

    _ROW_FIELDS = _CAPTION_WORD_FIELDS
    _SQUARE_FIELDS = _CAPTION_SQUARE_FIELDS

    @staticmethod
    def bytes_of_one(words: int, dim: int, element_size: int) -> int:
        """Bytes of one caption's tensors with `words` words: five [L, d], two [L, L], a length."""
        return (5 * words * dim + 2 * words * words) * element_size + 8


def checkpointed_grid(
    grid_block: Callable[[Any, Any], Tensor], images: Any, captions: Any, max_pairs: int
) -> Tensor:
    """Scores [Ni, Nc] of `grid_block(image rows, caption rows)` over blocks of at most
    `max_pairs` pairs, each under activation checkpointing (freed after the forward, recomputed
    in the backward), so the gradients are those of one unchunked grid, to float rounding."""
    ni, nc = len(images), len(captions)
    image_block, caption_block = _block_shape(ni, nc, max(1, max_pairs))
    rows = []
    for i in range(0, ni, image_block):
        image_rows = images.select(slice(i, i + image_block))
        row = [
            checkpoint(
                grid_block,
                image_rows,
                captions.select(slice(j, j + caption_block)),
                use_reentrant=False,
            )
            for j in range(0, nc, caption_block)
        ]
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


def _block_shape(ni: int, nc: int, max_pairs: int) -> tuple[int, int]:
    """(images, captions) per block of an Ni x Nc grid, at most `max_pairs` pairs a block."""
    caption_block = min(nc, max_pairs)
    return max(1, min(ni, max_pairs // caption_block)), caption_block


def _expand(x: Tensor, count: int) -> Tensor:
    if x.shape[0] != 1:
        raise ValueError(f"repeat needs exactly one item, got {x.shape[0]}")
    return x.expand(count, *x.shape[1:])


def _rownorm(mix: Tensor, mix_gram: Tensor) -> Tensor:
    """||P X|| per row from P and P·(X Xᵀ), plus the l2norm epsilon."""
    product = mix * mix_gram
    return product.sum(-1, dtype=wide(product)).clamp_min(0).sqrt() + L2NORM_EPS


def _softmax(logits: Tensor) -> Tensor:
    return logits.softmax(-1, dtype=wide(logits))


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    product = a * b
    return product.sum(-1, dtype=wide(product))


class PrecomputedScorer:
    """Scores (image, caption) pairs from per-item precomputed tensors, equal to the direct form.

    Built on a `CampScorer`'s weights (no copy). Device and dtype follow the inputs; under
    autocast (CUDA or CPU) the matmuls run in bf16/fp16, softmaxes and norms in fp32.
    """

    def __init__(self, scorer: CampScorer) -> None:
        self.scorer = scorer

    # -- per item ------------------------------------------------------------------------------
    def precompute_images(
        self, images: Tensor, region_counts: Tensor | None = None
    ) -> ImagePrecompute:
        """V [N, R, d] (image encoder output) -> per-image tensors.

        `region_counts` [N]: real regions of each image when images are padded to R (padded
        rows are zeroed here and masked when scoring); None: all R are real.
        """
        s, d = self.scorer, self.scorer.embed_size
        if region_counts is None:
            region_counts = torch.full(
                (images.shape[0],), images.shape[1], dtype=torch.int64, device=images.device
            )
        else:
            region_counts = region_counts.to(device=images.device, dtype=torch.int64)
            if region_counts.shape != images.shape[:1]:
                raise ValueError(
                    f"need one region count per image: {images.shape[0]} images, counts of "
                    f"shape {tuple(region_counts.shape)}"
                )
            keep = length_mask(region_counts, images.shape[1])
            images = images * keep.unsqueeze(-1).to(images.dtype)
        message_query = s.word_message_query(images)
        message_key = s.word_message_key(images)
        return ImagePrecompute(
            regions=images,
            queries=s.image_query(images),
            keys=s.image_key(images),
            word_message_logits=message_query @ message_key.transpose(-2, -1) / math.sqrt(d),
            gram=images @ images.transpose(-2, -1),
            fusion_self=F.linear(images, s.image_fusion.weight[:, :d]),
            fusion_for_words=F.linear(images, s.text_fusion.weight[:, d:]),
            region_counts=region_counts,
        )

    def precompute_captions(self, text: EncodedText) -> CaptionPrecompute:
        """Word features of N captions -> per-caption tensors, trimmed to the longest."""
        s, d = self.scorer, self.scorer.embed_size
        width = int(text.lengths.max())
        words = text.words[:, :width] * text.mask[:, :width].unsqueeze(-1).to(text.words.dtype)
        message_query = s.region_message_query(words)
        message_key = s.region_message_key(words)
        return CaptionPrecompute(
            words=words,
            lengths=text.lengths.to(torch.int64),
            queries=s.text_query(words),
            keys=s.text_key(words),
            region_message_logits=message_query @ message_key.transpose(-2, -1) / math.sqrt(d),
            gram=words @ words.transpose(-2, -1),
            fusion_self=F.linear(words, s.text_fusion.weight[:, :d]),
            fusion_for_regions=F.linear(words, s.image_fusion.weight[:, d:]),
        )

    # -- scoring -------------------------------------------------------------------------------
    def score_grid(
        self,
        images: ImagePrecompute,
        captions: CaptionPrecompute,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    ) -> Tensor:
        """Scores [Ni, Nc] of every image against every caption, in memory-bounded chunks.

        The chunk size comes from `memory_budget_bytes`, so 1,000 images x 5,000 captions run
        without ever holding Ni·Nc·L·d values.
        """
        ni, nc = len(images), len(captions)
        max_pairs = max(1, memory_budget_bytes // self.bytes_per_pair(images, captions))
        image_block, caption_block = _block_shape(ni, nc, max_pairs)
        out = images.regions.new_empty((ni, nc), dtype=torch.float32)
        for j in range(0, nc, caption_block):
            block = captions.select(slice(j, j + caption_block))
            for i in range(0, ni, image_block):
                scores, _ = self._score(images.select(slice(i, i + image_block)), block, "grid")
                out[i : i + image_block, j : j + caption_block] = scores
        return out

    def score_grid_checkpointed(
        self, images: ImagePrecompute, captions: CaptionPrecompute, max_pairs: int
    ) -> Tensor:
        """Scores [Ni, Nc] for training: differentiable, at most `max_pairs` pairs' activations
        alive at once.

        Each block of pairs runs under activation checkpointing: its activations are freed
        after the forward and recomputed, one block at a time, during the backward. The
        per-item tensors (and their graph back to the encoders) are kept once for the whole
        grid. The backward replays the same operations, so the gradients are those of one
        unchunked grid, to float rounding; the price is a second forward of the pair math.
        """
        return checkpointed_grid(self._grid_block, images, captions, max_pairs)

    def _grid_block(self, images: ImagePrecompute, captions: CaptionPrecompute) -> Tensor:
        return self._score(images, captions, "grid")[0]

    def score_text_against_images(
        self, caption: CaptionPrecompute, images: ImagePrecompute, explain: bool = False
    ) -> tuple[Tensor, AttentionMaps | None]:
        """One caption x K images (the text->image reranker): scores [K], maps [K, 1, ...]."""
        if len(caption) != 1:
            raise ValueError(f"expected one caption, got {len(caption)}")
        scores, maps = self._score(images, caption.trimmed(), "grid", explain=explain)
        return scores[:, 0], maps

    def score_image_against_captions(
        self, image: ImagePrecompute, captions: CaptionPrecompute, explain: bool = False
    ) -> tuple[Tensor, AttentionMaps | None]:
        """One image x K captions (the image->caption reranker): scores [K], maps [1, K, ...]."""
        if len(image) != 1:
            raise ValueError(f"expected one image, got {len(image)}")
        scores, maps = self._score(image, captions.trimmed(), "grid", explain=explain)
        return scores[0], maps

    def score_pairs(
        self, images: ImagePrecompute, captions: CaptionPrecompute, *, trim: bool = True
    ) -> Tensor:
        """Scores [K] of aligned pairs (images[k], captions[k]).

        trim=False skips trimming the captions to their longest length: the scores are the same
        (padding is masked exactly) and no lengths are read back to the host.
        """
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images cannot pair with {len(captions)} captions")
        captions = captions.trimmed() if trim else captions
        if not torch.is_grad_enabled():
            return self._score_pairs_inference(images, captions)
        scores, _ = self._score(images, captions, "pairs")
        return scores

    @staticmethod
    def bytes_per_pair(images: ImagePrecompute, captions: CaptionPrecompute) -> int:
        """Upper estimate of the working memory of one pair (activations of `_score`)."""
        r, d = images.regions.shape[1], images.regions.shape[2]
        length = captions.words.shape[1]
        elements = 10 * (r + length) * d + 12 * (r * length + r * r + length * length)
        return elements * max(4, images.regions.element_size())

    # -- the per-pair math ---------------------------------------------------------------------
    def _score_pairs_inference(self, img: ImagePrecompute, cap: CaptionPrecompute) -> Tensor:
        """`_score`'s aligned pairs without autograd, laid out for large matrix products.

        A side repeated over every pair (the query of a rerank: an expanded view or one item)
        is used as its one [n, d] item, so every product with it folds into ONE matrix product
        over all K pairs' rows (K·R x d x L) instead of K small batched ones; only products of
        two per-pair factors stay batched. The attention scale is folded into that side's small
        matrices, masks are applied in place on fresh products, intermediates are updated in
        place, and the pooling heads are averaged before weighting the fragments
        (mean_h(W_h F) = (mean_h W_h) F). Same arithmetic as `_score` up to float rounding, and
        no read back from the device.
        """
        s = self.scorer
        scale = 1.0 / math.sqrt(s.embed_size)
        cap_shared = _is_shared(cap.words)
        img_shared = not cap_shared and _is_shared(img.regions)
        c = _one_item(cap) if cap_shared else cap
        v = _one_item(img) if img_shared else img
        keep_words, keep_regions = cap.mask, img.mask  # [K, L], [K, R]

        # Stage 1 in [K, R, L] layout: t2v is a softmax over R (dim -2), v2t over L (dim -1).
        if cap_shared:
            logits_t2v = _cross(v.keys, c.queries * scale)
            logits_v2t = _cross(v.queries, c.keys * scale)
        elif img_shared:
            logits_t2v = _cross(v.keys * scale, c.queries)
            logits_v2t = _cross(v.queries * scale, c.keys)
        else:
            logits_t2v = _cross(v.keys, c.queries).mul_(scale)
            logits_v2t = _cross(v.queries, c.keys).mul_(scale)
        attn_t2v_rl = _softmax_masked(logits_t2v, _axis(keep_regions, -2), dim=-2)
        attn_v2t = _softmax_masked(logits_v2t, _axis(keep_words, -1), dim=-1)  # [K, R, L]
        attn_t2v = attn_t2v_rl.transpose(-2, -1)  # [K, L, R] view

        # Stage 2 with the per-item kernels.
        region_logits = (attn_v2t @ c.region_message_logits) @ attn_v2t.transpose(-2, -1)
        selfattn_v = _softmax_masked(region_logits, _axis(keep_regions, -1), dim=-1)
        word_logits = (attn_t2v @ v.word_message_logits) @ attn_t2v_rl
        selfattn_t = _softmax_masked(word_logits, _axis(keep_words, -1), dim=-1)
        mix_v = selfattn_v @ attn_v2t  # [K, R, L]
        mix_t = selfattn_t @ attn_t2v  # [K, L, R]

        region_word_dots = _cross(v.regions, c.words)  # [K, R, L]
        norm_v = _rownorm(mix_v, mix_v @ c.gram)
        norm_t = _rownorm(mix_t, mix_t @ v.gram)
        gate_v = torch.sigmoid(_rowdot(mix_v, region_word_dots) / norm_v)
        gate_t = torch.sigmoid(_rowdot(mix_t, region_word_dots.transpose(-2, -1)) / norm_t)
        mix_v.mul_((gate_v / norm_v).unsqueeze(-1))
        mix_t.mul_((gate_t / norm_t).unsqueeze(-1))
        fused_v = (mix_v @ c.fusion_for_regions).addcmul_(gate_v.unsqueeze(-1), v.fusion_self)
        fused_t = (mix_t @ v.fusion_for_words).addcmul_(gate_t.unsqueeze(-1), c.fusion_self)
        fused_v = fused_v.relu_().add_(v.regions)
        fused_t = fused_t.relu_().add_(c.words)

        pooled_v = _pool(s.image_pool, fused_v, keep_regions)
        pooled_t = _pool(s.text_pool, fused_t, keep_words)
        return s.score_mlp(l2norm(pooled_v), l2norm(pooled_t))

    def _score(
        self,
        img: ImagePrecompute,
        cap: CaptionPrecompute,
        pairing: str,
        explain: bool = False,
    ) -> tuple[Tensor, AttentionMaps | None]:
        """`grid`: all Ni x Nc pairs -> [Ni, Nc]; `pairs`: aligned -> [K]."""
        s = self.scorer
        if pairing == "grid":
            i, j, o = "i", "j", "ij"

            def per_image(x: Tensor) -> Tensor:
                return x.unsqueeze(1)

            def per_caption(x: Tensor) -> Tensor:
                return x.unsqueeze(0)
        else:
            i, j, o = "k", "k", "k"

            def per_image(x: Tensor) -> Tensor:
                return x

            per_caption = per_image

        scale = 1.0 / math.sqrt(s.embed_size)
        keep = per_caption(cap.mask)  # [.., L]
        keep_regions = per_image(img.mask)  # [.., R]

        # Stage 1: cross attention. t2v: words over real regions; v2t: regions over real words.
        logits_t2v = torch.einsum(f"{j}ld,{i}rd->{o}lr", cap.queries, img.keys) * scale
        attn_t2v = _softmax(masked_logits(logits_t2v, keep_regions.unsqueeze(-2)))
        logits_v2t = torch.einsum(f"{i}rd,{j}ld->{o}rl", img.queries, cap.keys) * scale
        attn_v2t = _softmax(masked_logits(logits_v2t, keep.unsqueeze(-2)))

        # Stage 2 with the per-item kernels; P = selfattn @ crossattn maps messages to items.
        region_logits = torch.einsum(f"{o}rl,{j}lm->{o}rm", attn_v2t, cap.region_message_logits)
        region_logits = region_logits @ attn_v2t.transpose(-2, -1)
        selfattn_v = _softmax(masked_logits(region_logits, keep_regions.unsqueeze(-2)))
        word_logits = torch.einsum(f"{o}lr,{i}rs->{o}ls", attn_t2v, img.word_message_logits)
        word_logits = word_logits @ attn_t2v.transpose(-2, -1)
        selfattn_t = _softmax(masked_logits(word_logits, keep.unsqueeze(-2)))
        mix_v = selfattn_v @ attn_v2t  # [.., R, L]
        mix_t = selfattn_t @ attn_t2v  # [.., L, R]

        # Refined messages F = P·X / ||P·X|| are never formed: their norms come from the Gram
        # matrices (||P X||² = rowsum((P XXᵀ) ⊙ P)), the gates from V Tᵀ, and the fusion's
        # second half from P (X W_bᵀ), with gate/norm folded into the small P.
        regions, words = per_image(img.regions), per_caption(cap.words)
        region_word_dots = torch.einsum(f"{i}rd,{j}ld->{o}rl", img.regions, cap.words)
        norm_v = _rownorm(mix_v, torch.einsum(f"{o}rl,{j}lm->{o}rm", mix_v, cap.gram))
        norm_t = _rownorm(mix_t, torch.einsum(f"{o}lr,{i}rs->{o}ls", mix_t, img.gram))
        gate_v = torch.sigmoid(_rowdot(mix_v, region_word_dots) / norm_v)
        gate_t = torch.sigmoid(_rowdot(mix_t, region_word_dots.transpose(-2, -1)) / norm_t)
        mix_v = mix_v * (gate_v / norm_v).unsqueeze(-1)
        mix_t = mix_t * (gate_t / norm_t).unsqueeze(-1)
        fused_v = torch.einsum(f"{o}rl,{j}ld->{o}rd", mix_v, cap.fusion_for_regions)
        fused_t = torch.einsum(f"{o}lr,{i}rd->{o}ld", mix_t, img.fusion_for_words)
        # v-hat = ReLU(g·(W_a v) + g·(W_b F)) + v, in place on the per-pair buffers.
        fused_v = fused_v.addcmul_(gate_v.unsqueeze(-1), per_image(img.fusion_self))
        fused_t = fused_t.addcmul_(gate_t.unsqueeze(-1), per_caption(cap.fusion_self))
        if torch.is_grad_enabled():  # training: autograd needs ReLU's output unmodified
            fused_v, fused_t = fused_v.relu() + regions, fused_t.relu() + words
        else:
            fused_v = fused_v.relu_().add_(regions)
            fused_t = fused_t.relu_().add_(words)

        pooled_v, pool_attn_v = s.image_pool(fused_v, keep_regions)
        pooled_t, pool_attn_t = s.text_pool(fused_t, keep)
        scores = s.score_mlp(l2norm(pooled_v), l2norm(pooled_t))
        if not explain:
            return scores, None
        maps = AttentionMaps(
            attn_t2v=attn_t2v,
            attn_v2t=attn_v2t,
            selfattn_v=selfattn_v,
            selfattn_t=selfattn_t,
            gate_v=gate_v,
            gate_t=gate_t,
            pool_attn_v=pool_attn_v,
            pool_attn_t=pool_attn_t,
        )
        return scores, maps


def _is_shared(x: Tensor) -> bool:
    """True when every row of a side is one item: a single row, or a view expanded from one."""
    return x.shape[0] == 1 or x.stride(0) == 0


def _one_item(side):
    """The side's first item as 2-D tensors ([n, d], [n, n]) that broadcast over any batch."""
    return replace(
        side, **{f.name: getattr(side, f.name)[0] for f in fields(side) if f.name != "lengths"}
    )


def _axis(keep: Tensor | None, axis: int) -> Tensor | None:
    """keep [K, n] as a mask of the last axis ([K, 1, n]) or the one before ([K, n, 1]) of
    [K, *, *] logits."""
    if keep is None:
        return None
    return keep.unsqueeze(-2) if axis == -1 else keep.unsqueeze(-1)


def _cross(rows: Tensor, columns: Tensor) -> Tensor:
    """rows [(K,) R, d] x columns [(K,) L, d] -> [K, R, L] = rows @ columnsᵀ, with a 2-D factor
    on the right whenever one is 2-D, so that the product folds into one matrix product."""
    if rows.dim() == 2 and columns.dim() == 3:
        return (columns @ rows.transpose(-2, -1)).transpose(-2, -1)
    return rows @ columns.transpose(-2, -1)


def _softmax_masked(logits: Tensor, keep: Tensor | None, dim: int) -> Tensor:
    """Softmax along `dim` over the slots `keep` (shaped to broadcast over logits) leaves;
    `logits` is a fresh product, masked in place."""
    if keep is not None:
        logits = masked_logits(logits, keep, inplace=True)
    return logits.softmax(dim, dtype=wide(logits))


def _pool(pool, fragments: Tensor, keep: Tensor | None) -> Tensor:
    """`AttentionPool`'s pooled vector [K, d] of fragments [K, N, d] (keep [K, N] or None),
    with the heads averaged before they weight the fragments."""
    hidden = F.linear(fragments, pool.hidden.weight, pool.hidden.bias).relu_()
    logits = F.linear(hidden, pool.heads.weight, pool.heads.bias)  # [K, N, H]
    if keep is not None:
        logits = masked_logits(logits, keep.unsqueeze(-1), inplace=True)
    weights = logits.softmax(-2, dtype=wide(logits)).mean(-1)  # [K, N]
    return (weights.unsqueeze(-2).to(fragments.dtype) @ fragments).squeeze(-2)

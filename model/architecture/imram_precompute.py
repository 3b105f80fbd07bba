"""IMRAM's per-item tensors and its pair scorer over them: the reranker interface that
`PrecomputedScorer` gives CAMP (model/architecture/precompute.py), for IMRAM.

IMRAM's attention is a function of both items at every step, so what is computed once per item
is the encoders' output (an image's unit region vectors [R, d], a caption's unit word vectors
[L, d] and its length) and the memory update's layers applied ahead (`MemoryProjections`,
model/architecture/imram.py): of the regions as Text-IMRAM's context (R W_cᵀ) and as
Image-IMRAM's first query (W_q R + b), of the words likewise. A direction the mode does not
run keeps zero-width tensors. Everything else is per pair (`ImramScorer.score_pairs`). Padding
up to a batch's most regions or longest caption is masked exactly, so scores do not depend on
how the pairs are batched (to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from model.architecture.encoders import EncodedText, length_mask
from model.architecture.imram import ImramScorer, MemoryProjections
from model.architecture.precompute import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    CaptionTensorsBase,
    ImageTensorsBase,
    _block_shape,
    checkpointed_grid,
)

_IMAGE_FIELDS = ("regions", "text_context", "image_first_query")
_CAPTION_FIELDS = ("words", "image_context", "text_first_query")


@dataclass
class ImramImagePrecompute(ImageTensorsBase):
    """N images: regions [N, R, d] (unit vectors, zero past each image's count); text_context
    [N, R, 2d] the regions through Text-IMRAM's memory layers' context half; image_first_query
    [N, R, 2d] through Image-IMRAM's query half (with its bias); region_counts [N] int64."""

    regions: Tensor
    text_context: Tensor
    image_first_query: Tensor
    region_counts: Tensor

    _ROW_FIELDS = _IMAGE_FIELDS

    @staticmethod
    def bytes_of_one(regions: int, dim: int, element_size: int) -> int:
        """At most one [R, d] and two [R, 2d] tensors (full IMRAM), and a count."""
        return 5 * regions * dim * element_size + 8


@dataclass
class ImramCaptionPrecompute(CaptionTensorsBase):
    """N captions: words [N, L, d] (unit vectors, zero past each length); image_context
    [N, L, 2d] and text_first_query [N, L, 2d] as for images, the other way round; lengths [N].
    """

    words: Tensor
    image_context: Tensor
    text_first_query: Tensor
    lengths: Tensor

    _ROW_FIELDS = _CAPTION_FIELDS

    @staticmethod
    def bytes_of_one(words: int, dim: int, element_size: int) -> int:
        return 5 * words * dim * element_size + 8


@dataclass
class ImramExplanationMaps:
    """What an explanation draws for a grid of pairs [Ni, Nc, ...]: word_region [.., L, R] the
    first step's Text-IMRAM attention (each word over the regions, zero on padded regions);
    region_weights [.., R] that attention averaged over the caption's words (where the words
    looked: IMRAM averages its fragments' similarities alike, so a uniform "pooling" would draw
    nothing); word_weights [.., L] uniform over the real words, as IMRAM weighs them."""

    word_region: Tensor
    region_weights: Tensor
    word_weights: Tensor


class ImramPrecomputedScorer:
    """Scores (image, caption) pairs from `ImramImagePrecompute` / `ImramCaptionPrecompute`,
    built on an `ImramScorer`'s weights (no copy). Scores are float64, as the authors' code
    returns them."""

    image_precompute = ImramImagePrecompute
    caption_precompute = ImramCaptionPrecompute

    def __init__(self, scorer: ImramScorer) -> None:
        self.scorer = scorer

    # -- per item ------------------------------------------------------------------------------
    def precompute_images(
        self, images: Tensor, region_counts: Tensor | None = None
    ) -> ImramImagePrecompute:
        """Unit region vectors [N, R, d] (image encoder output) -> per-image tensors; rows past
        `region_counts` [N] are zeroed here and masked when scoring (None: all R are real)."""
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
        return ImramImagePrecompute(
            regions=images,
            text_context=self._projected(images, "text", self.scorer.context_projection),
            image_first_query=self._projected(images, "image", self.scorer.query_projection),
            region_counts=region_counts,
        )

    def precompute_captions(self, text: EncodedText) -> ImramCaptionPrecompute:
        """Unit word vectors of N captions -> per-caption tensors, trimmed to the longest."""
        width = int(text.lengths.max())
        words = text.words[:, :width] * text.mask[:, :width].unsqueeze(-1).to(text.words.dtype)
        return ImramCaptionPrecompute(
            words=words,
            image_context=self._projected(words, "image", self.scorer.context_projection),
            text_first_query=self._projected(words, "text", self.scorer.query_projection),
            lengths=text.lengths.to(torch.int64),
        )

    def _projected(self, fragments: Tensor, direction: str, projection) -> Tensor:
        """`projection(direction, fragments)` [N, W, 2d], or [N, W, 0] when the mode does not
        run `direction` (nothing to compute or store)."""
        if direction not in self.scorer.options.directions:
            return fragments.new_zeros(*fragments.shape[:2], 0)
        return projection(direction, fragments)

    # -- scoring -------------------------------------------------------------------------------
    def score_pairs(
        self, images: ImramImagePrecompute, captions: ImramCaptionPrecompute, *, trim: bool = True
    ) -> Tensor:
        """Scores [K] float64 of aligned pairs (images[k], captions[k]); trim=False skips
        trimming the captions (same scores: padding is masked exactly)."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images cannot pair with {len(captions)} captions")
        captions = captions.trimmed() if trim else captions
        projections = {
            "text": MemoryProjections(captions.text_first_query, images.text_context),
            "image": MemoryProjections(images.image_first_query, captions.image_context),
        }
        return self.scorer.score_pairs(
            images.regions, images.mask, captions.words, captions.mask, projections
        )

    def score_grid(
        self,
        images: ImramImagePrecompute,
        captions: ImramCaptionPrecompute,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    ) -> Tensor:
        """Scores [Ni, Nc] float64 of every image against every caption, in memory-bounded
        blocks of pairs."""
        ni, nc = len(images), len(captions)
        max_pairs = max(1, memory_budget_bytes // self.bytes_per_pair(images, captions))
        image_block, caption_block = _block_shape(ni, nc, max_pairs)
        out = images.regions.new_empty((ni, nc), dtype=torch.float64)
        for j in range(0, nc, caption_block):
            block = captions.select(slice(j, j + caption_block))
            for i in range(0, ni, image_block):
                rows = images.select(slice(i, i + image_block))
                out[i : i + image_block, j : j + caption_block] = self._grid_block(rows, block)
        return out

    def score_grid_checkpointed(
        self, images: ImramImagePrecompute, captions: ImramCaptionPrecompute, max_pairs: int
    ) -> Tensor:
        """Scores [Ni, Nc] for training: differentiable, each block of at most `max_pairs` pairs
        under activation checkpointing (its activations recomputed during the backward), so
        the gradients are those of one unchunked grid, to float rounding."""
        return checkpointed_grid(self._grid_block, images, captions, max_pairs)

    def _grid_block(self, images: ImramImagePrecompute, captions: ImramCaptionPrecompute) -> Tensor:
        """[Ni, Nc]: every pair, caption-major, through `score_pairs`."""
        ni, nc = len(images), len(captions)
        pair_images = replace(
            images,
            **{
                f.name: _repeat_block(getattr(images, f.name), nc, outer=True)
                for f in fields(images)
            },
        )
        pair_captions = replace(
            captions,
            **{
                f.name: _repeat_block(getattr(captions, f.name), ni, outer=False)
                for f in fields(captions)
            },
        )
        return self.score_pairs(pair_images, pair_captions, trim=False).view(nc, ni).t()

    def score_text_against_images(
        self,
        caption: ImramCaptionPrecompute,
        images: ImramImagePrecompute,
        explain: bool = False,
    ) -> tuple[Tensor, ImramExplanationMaps | None]:
        """One caption x K images: scores [K], maps [K, 1, ...]."""
        if len(caption) != 1:
            raise ValueError(f"expected one caption, got {len(caption)}")
        captions = caption.trimmed().repeat(len(images))
        scores = self.score_pairs(images, captions, trim=False)
        maps = self._maps(images, captions).unsqueeze_pairs(1) if explain else None
        return scores, maps

    def score_image_against_captions(
        self,
        image: ImramImagePrecompute,
        captions: ImramCaptionPrecompute,
        explain: bool = False,
    ) -> tuple[Tensor, ImramExplanationMaps | None]:
        """One image x K captions: scores [K], maps [1, K, ...]."""
        if len(image) != 1:
            raise ValueError(f"expected one image, got {len(image)}")
        captions = captions.trimmed()
        images = image.repeat(len(captions))
        scores = self.score_pairs(images, captions, trim=False)
        maps = self._maps(images, captions).unsqueeze_pairs(0) if explain else None
        return scores, maps

    def _maps(self, images: ImramImagePrecompute, captions: ImramCaptionPrecompute) -> _PairMaps:
        """The first Text-IMRAM step's attention of aligned pairs (it has no parameters, so it
        is the same in every mode), the regions' share of it, and uniform word weights."""
        region_mask, word_mask = images.mask, captions.mask
        _, _, word_region = self.scorer.attend(
            captions.words, word_mask, images.regions, region_mask
        )
        word_region = word_region.masked_fill(~word_mask.unsqueeze(-1), 0.0)
        return _PairMaps(
            word_region=word_region,
            region_weights=(word_region * _uniform(word_mask).unsqueeze(-1)).sum(dim=-2),
            word_weights=_uniform(word_mask),
        )

    @staticmethod
    def bytes_per_pair(images: ImramImagePrecompute, captions: ImramCaptionPrecompute) -> int:
        """Upper estimate of one pair's working memory in `ImramScorer.score_pairs`: per
        direction and step a handful of [R, L] attention tensors and of [Q, 2d] MDU tensors."""
        r, d = images.regions.shape[1], images.regions.shape[2]
        length = captions.words.shape[1]
        elements = 8 * r * length + 14 * (r + length) * d
        return elements * max(4, images.regions.element_size())


@dataclass
class _PairMaps:
    word_region: Tensor
    region_weights: Tensor
    word_weights: Tensor

    def unsqueeze_pairs(self, axis: int) -> ImramExplanationMaps:
        """[K, ...] -> the grid layout [K, 1, ...] (axis 1) or [1, K, ...] (axis 0)."""
        return ImramExplanationMaps(
            word_region=self.word_region.unsqueeze(axis),
            region_weights=self.region_weights.unsqueeze(axis),
            word_weights=self.word_weights.unsqueeze(axis),
        )


def _repeat_block(x: Tensor, count: int, *, outer: bool) -> Tensor:
    """Rows laid out for `count` x len(x) caption-major pairs: the whole block `count` times
    (outer: images) or each row `count` times in a run (captions)."""
    rows = count * x.shape[0]
    if outer:
        return x.unsqueeze(0).expand(count, *x.shape).reshape(rows, *x.shape[1:])
    return x.unsqueeze(1).expand(x.shape[0], count, *x.shape[1:]).reshape(rows, *x.shape[1:])


def _uniform(mask: Tensor) -> Tensor:
    """1/count on the real slots of each row, 0 on padding."""
    weights = mask.to(torch.float32)
    return weights / weights.sum(dim=-1, keepdim=True)


__all__ = [
    "ImramCaptionPrecompute",
    "ImramExplanationMaps",
    "ImramImagePrecompute",
    "ImramPrecomputedScorer",
]

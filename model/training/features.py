"""Frozen inputs of a training split, computed once: region means and text-encoder features."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from model.eval.data import RetrievalSplit
from model.text.token_cache import TokenFeatures, cached_token_features

MEAN_CHUNK = 512


@dataclass
class FrozenSplit:
    """A split with its frozen features: raw regions (memmap), region means, token features."""

    split: RetrievalSplit
    region_means: Tensor  # [N, D] float32
    tokens: TokenFeatures  # ragged [5N captions]
    text_means: Tensor  # [5N, h] masked mean of each caption's token features

    @property
    def caption_image(self) -> np.ndarray:
        return self.split.caption_image()

    def regions(self, image_indices: np.ndarray) -> Tensor:
        """[B, R, D] float32 region features of these images."""
        order = np.argsort(image_indices)
        rows = np.asarray(self.split.images[image_indices[order]], dtype=np.float32)
        out = np.empty_like(rows)
        out[order] = rows
        return torch.from_numpy(out)

    def region_counts(self, image_indices: np.ndarray) -> Tensor | None:
        """[B] int64 real regions of these images (padded splits), or None: all R are real."""
        counts = self.split.region_counts_of(image_indices)
        return None if counts is None else torch.from_numpy(np.asarray(counts, dtype=np.int64))


def region_means(images: np.ndarray, region_counts: np.ndarray | None = None) -> Tensor:
    """[N, R, D] (memmap ok) -> [N, D] float32 means, read in chunks; with `region_counts` [N]
    each mean is over that image's real regions only (the padding is left out)."""
    out = np.empty((len(images), images.shape[2]), dtype=np.float32)
    for start in range(0, len(images), MEAN_CHUNK):
        chunk = np.asarray(images[start : start + MEAN_CHUNK], dtype=np.float32)
        if region_counts is None:
            out[start : start + MEAN_CHUNK] = chunk.mean(axis=1)
            continue
        counts = np.asarray(region_counts[start : start + MEAN_CHUNK], dtype=np.int64)
        real = np.arange(chunk.shape[1])[None, :] < counts[:, None]
        sums = (chunk * real[:, :, None]).sum(axis=1)
        out[start : start + MEAN_CHUNK] = sums / counts[:, None].astype(np.float32)
    return torch.from_numpy(out)


def frozen_split(split: RetrievalSplit, cache_dir: Path) -> FrozenSplit:
    """Region means + MiniLM token features (cached as {cache_dir}/{split}_tokens.npz)."""
    from model.text.minilm import WordpieceTokenizer, load_minilm

    tokens = cached_token_features(
        split.captions,
        Path(cache_dir) / f"{split.name}_tokens.npz",
        load_minilm,
        WordpieceTokenizer,
    )
    return FrozenSplit(
        split=split,
        region_means=region_means(split.images, split.region_counts),
        tokens=tokens,
        text_means=token_means(tokens),
    )


def token_means(tokens: TokenFeatures) -> Tensor:
    """[5N, h] masked mean of each caption's token features (MiniLM's sentence vector)."""
    sums = np.add.reduceat(tokens.features.astype(np.float32), tokens.offsets[:-1])
    return torch.from_numpy((sums / tokens.lengths()[:, None]).astype(np.float32))

"""Frozen text-encoder token features of a caption file, computed once and cached on disk.

Training a reranker over a frozen MiniLM spends nearly all its CPU time in the transformer, so
the features of every caption are computed once: a ragged float16 array `features`
[total_tokens, h] with `offsets` [N+1] (caption i owns rows offsets[i]:offsets[i+1]).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from model.files import READABLE_FILE_MODE, write_atomically
from model.text.minilm import MiniLMBackbone, WordpieceTokenizer

CACHE_FORMAT = "minilm-token-features-v1"
ENCODE_BATCH = 128


@dataclass
class TokenFeatures:
    """Ragged token features of N captions; `batch(indices)` pads a subset for a model."""

    features: np.ndarray  # [total_tokens, h] float16
    offsets: np.ndarray  # [N + 1] int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[Tensor, Tensor]:
        """Features [B, L, h] float32 (zeros past each length) and lengths [B] int64."""
        indices = np.asarray(indices)
        lengths = self.offsets[indices + 1] - self.offsets[indices]
        out = np.zeros((len(indices), int(lengths.max()), self.dim), dtype=np.float32)
        for row, (start, length) in enumerate(zip(self.offsets[indices], lengths, strict=True)):
            out[row, :length] = self.features[start : start + length]
        return torch.from_numpy(out), torch.from_numpy(lengths.astype(np.int64))


def encode_token_features(
    captions: Sequence[str],
    encoder: MiniLMBackbone,
    tokenizer: WordpieceTokenizer,
    batch_size: int = ENCODE_BATCH,
) -> TokenFeatures:
    """Run the frozen encoder over captions (sorted by length to waste no padding)."""
    order = np.argsort([len(c) for c in captions], kind="stable")
    chunks: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            picked = order[start : start + batch_size]
            batch = tokenizer([captions[i] for i in picked])
            features = encoder(batch.input_ids, batch.attention_mask).to(torch.float16).numpy()
            for row, caption_index in enumerate(picked):
                chunks[int(caption_index)] = features[row, : int(batch.lengths[row])]
    lengths = np.array([len(chunks[i]) for i in range(len(captions))], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    features = np.concatenate([chunks[i] for i in range(len(captions))]).astype(np.float16)
    return TokenFeatures(features=features, offsets=offsets)


def captions_digest(captions: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]


def cached_token_features(
    captions: Sequence[str],
    cache_path: Path,
    encoder_factory,
    tokenizer_factory,
) -> TokenFeatures:
    """Load `cache_path` if it holds these exact captions, else compute and write it atomically.

    The factories are called only on a cache miss (loading MiniLM costs a second or two).
    """
    digest = captions_digest(captions)
    if cache_path.exists():
        with np.load(cache_path) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") == CACHE_FORMAT and meta.get("captions") == digest:
                return TokenFeatures(features=data["features"], offsets=data["offsets"])
    token_features = encode_token_features(captions, encoder_factory(), tokenizer_factory())
    meta = json.dumps({"format": CACHE_FORMAT, "captions": digest})

    def write(temp: Path) -> None:
        with temp.open("wb") as handle:
            np.savez(
                handle, features=token_features.features, offsets=token_features.offsets, meta=meta
            )

    write_atomically(cache_path, write, mode=READABLE_FILE_MODE)
    return token_features

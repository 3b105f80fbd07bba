"""The two CAMP encoders (docs/ARCHITECTURE.md, Encoders): regions -> V [B, R, d], token ids -> T
[B, L, d].

Neither output is l2-normalised, as in the released CAMP configs (`no_imgnorm`, `no_txtnorm`).
Any text encoder that returns `EncodedText` (word features plus true lengths) can feed the
scorer; `GRUTextEncoder` is the paper's, a projected pretrained transformer can be another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from model.checkpoints.config import CampConfig


@dataclass
class EncodedText:
    """Word features of a batch of captions, trimmed to the longest caption in the batch.

    words: [B, L, d], rows past a caption's length are zeros.
    lengths: [B] int64, tokens per caption (<start> and <end> included), each >= 1.
    """

    words: Tensor
    lengths: Tensor

    @property
    def mask(self) -> Tensor:
        """[B, L] bool, True on real words."""
        return length_mask(self.lengths, self.words.shape[1])

    def padded_to(self, width: int) -> EncodedText:
        """Zero-pad the word axis to `width` slots (the official layout uses 50)."""
        length = self.words.shape[1]
        if width < length:
            raise ValueError(f"cannot pad {length} word slots down to {width}")
        words = nn.functional.pad(self.words, (0, 0, 0, width - length))
        return EncodedText(words=words, lengths=self.lengths)

    def select(self, index: int) -> EncodedText:
        """One caption, trimmed to its own length: [1, length, d]."""
        length = int(self.lengths[index])
        return EncodedText(self.words[index : index + 1, :length], self.lengths[index : index + 1])


def length_mask(lengths: Tensor, width: int) -> Tensor:
    """[B, width] bool mask, True where position < length."""
    positions = torch.arange(width, device=lengths.device)
    return positions.unsqueeze(0) < lengths.to(positions.device).unsqueeze(1)


def pad_token_ids(ids: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Right-padded [B, L] int64 token ids (0 = <pad>) and their lengths [B]."""
    lengths = torch.tensor([len(i) for i in ids], dtype=torch.int64)
    out = torch.zeros(len(ids), int(lengths.max()), dtype=torch.int64)
    for row, caption in enumerate(ids):
        out[row, : len(caption)] = torch.as_tensor(caption, dtype=torch.int64)
    return out, lengths


class ImageEncoder(nn.Module):
    """Linear(img_dim -> d) on every region feature; no normalisation."""

    def __init__(self, *, img_dim: int, embed_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(img_dim, embed_size)

    @classmethod
    def from_config(cls, config: CampConfig) -> ImageEncoder:
        return cls(img_dim=config.img_dim, embed_size=config.embed_size)

    @property
    def embed_size(self) -> int:
        return self.fc.out_features

    def forward(self, regions: Tensor) -> Tensor:
        """regions [..., R, img_dim] -> [..., R, d]."""
        return self.fc(regions)


class TextEncoder(nn.Module):
    """Contract of every text encoder: token ids + lengths -> `EncodedText` of width d.

    `features` is what the text side computes before CAMP's own projection (what the pooled
    text head reads and training caches); `project` finishes from there. An encoder without a
    separate projection keeps these defaults: its word features are its features.
    """

    embed_size: int

    def forward(self, token_ids: Tensor, lengths: Tensor) -> EncodedText:  # pragma: no cover
        raise NotImplementedError

    def features(self, token_ids: Tensor, lengths: Tensor) -> Tensor:
        """[B, L, h] text features before CAMP's projection."""
        return self(token_ids, lengths).words

    def project(self, features: Tensor, lengths: Tensor) -> EncodedText:
        """[B, L, h] text features -> CAMP word features (here the identity, trimmed)."""
        return EncodedText(words=features[:, : int(lengths.max())], lengths=lengths)


class GRUTextEncoder(TextEncoder):
    """Embedding -> bidirectional GRU over the packed sequence; forward and backward averaged.

    Captions may come in any order and with any right padding: the encoder packs them itself
    (`enforce_sorted=False`), so callers never sort by length.
    """

    def __init__(
        self, *, vocab_size: int, word_dim: int, embed_size: int, num_layers: int = 1
    ) -> None:
        super().__init__()
        self.embed_size = embed_size
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=True)

    @classmethod
    def from_config(cls, config: CampConfig) -> GRUTextEncoder:
        return cls(
            vocab_size=config.vocab_size,
            word_dim=config.word_dim,
            embed_size=config.embed_size,
            num_layers=config.num_gru_layers,
        )

    def forward(self, token_ids: Tensor, lengths: Tensor) -> EncodedText:
        """token_ids [B, L_in] int64 (right-padded, any order), lengths [B] (int or float).

        Returns words [B, max(lengths), d]. Refuses empty captions and lengths past L_in.
        """
        lengths = torch.as_tensor(lengths).to(dtype=torch.int64, device="cpu")
        if token_ids.dim() != 2 or lengths.shape != token_ids.shape[:1]:
            raise ValueError(
                f"expected token_ids [B, L] and lengths [B], got {tuple(token_ids.shape)} "
                f"and {tuple(lengths.shape)}"
            )
        if int(lengths.min()) < 1 or int(lengths.max()) > token_ids.shape[1]:
            raise ValueError(
                f"caption lengths must lie in [1, {token_ids.shape[1]}], got {lengths.tolist()}"
            )
        embedded = self.embed(token_ids)
        packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
        output, _ = self.rnn(packed)
        states, _ = pad_packed_sequence(output, batch_first=True, total_length=int(lengths.max()))
        forward_states, backward_states = states.chunk(2, dim=-1)
        words = (forward_states + backward_states) / 2
        return EncodedText(words=words, lengths=lengths.to(words.device))

"""The residual recipe with the paper's GRU text encoder instead of frozen MiniLM.

The GRU has no pretrained weights (its embedding may start from GloVe), so it is trained in
the pooled stage, jointly with the shortlist heads (InfoNCE over the masked mean of its word
states). It is then frozen and its word states play the part MiniLM's token features play in
the MiniLM recipe: computed once per split, they feed the mined-shortlist reranker stage and
dev selection unchanged, and the shortlist stays fixed while CAMP learns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from model.architecture.encoders import pad_token_ids
from model.architecture.network import RetrievalNetwork
from model.eval.data import RetrievalSplit
from model.text.token_cache import TokenFeatures
from model.training.features import FrozenSplit, region_means, token_means
from model.training.pooled import PooledTrainingConfig, train_pooled_heads

ENCODE_BATCH = 1024


def caption_ids(network: RetrievalNetwork, captions: Sequence[str]) -> list[list[int]]:
    """Vocabulary ids as inference makes them (same max_words), one list per caption."""
    max_words = network.camp_config().max_words
    return [network.vocabulary.encode(c, max_words=max_words) for c in captions]


def train_gru_pooled(
    network: RetrievalNetwork,
    split: RetrievalSplit,
    split_region_means: Tensor,
    ids: list[list[int]],
    config: PooledTrainingConfig,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> list[float]:
    """Heads + GRU trained together with InfoNCE; the GRU is left frozen afterwards."""
    encoder = network.camp.text_encoder
    encoder.train()

    def text_vectors(rows: Tensor) -> Tensor:
        padded, lengths = pad_token_ids([ids[r] for r in rows.tolist()])
        return network.heads.text(encoder(padded, lengths).words, lengths)

    losses = train_pooled_heads(
        network.heads,
        split_region_means,
        None,
        split.caption_image(),
        config,
        on_epoch=on_epoch,
        text_vectors=text_vectors,
        extra_parameters=list(encoder.parameters()),
    )
    encoder.eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    return losses


@torch.no_grad()
def gru_token_features(network: RetrievalNetwork, ids: list[list[int]]) -> TokenFeatures:
    """The frozen GRU's word states of every caption, ragged like MiniLM's token cache."""
    encoder = network.camp.text_encoder.eval()
    device = next(encoder.parameters()).device
    lengths = np.asarray([len(i) for i in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    features = np.empty((int(offsets[-1]), network.spec.embed_size), dtype=np.float16)
    for start in range(0, len(ids), ENCODE_BATCH):
        padded, batch_lengths = pad_token_ids(ids[start : start + ENCODE_BATCH])
        words = encoder(padded.to(device), batch_lengths).words.float().cpu().numpy()
        for row, length in enumerate(batch_lengths.tolist()):
            at = offsets[start + row]
            features[at : at + length] = words[row, :length]
    return TokenFeatures(features=features, offsets=offsets)


def frozen_means(
    network: RetrievalNetwork, split: RetrievalSplit, ids: list[list[int]] | None = None
) -> tuple[Tensor, Tensor]:
    """(region means, means of the frozen GRU's word states) of a split: what shortlist heads
    learn from. The word states are dropped once averaged (`ids`: the captions' ids, if the
    caller has them)."""
    ids = caption_ids(network, split.captions) if ids is None else ids
    text = token_means(gru_token_features(network, ids))
    return region_means(split.images, split.region_counts), text


def gru_frozen_split(
    network: RetrievalNetwork, split: RetrievalSplit, split_region_means: Tensor | None = None
) -> FrozenSplit:
    """A split with region means (computed unless given) and the frozen GRU's word states."""
    tokens = gru_token_features(network, caption_ids(network, split.captions))
    return FrozenSplit(
        split=split,
        region_means=region_means(split.images, split.region_counts)
        if split_region_means is None
        else split_region_means,
        tokens=tokens,
        text_means=token_means(tokens),
    )

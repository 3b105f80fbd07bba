"""A small camp_official network and batch, for the training tests on the CPU and the GPU."""

from __future__ import annotations

import torch

from model.architecture.encoders import pad_token_ids
from model.architecture.network import NetworkSpec, RetrievalNetwork
from model.text.vocab import Vocabulary
from model.training.losses import bce_hardest_negative_loss


def official_batch(batch: int, dtype: torch.dtype = torch.float32):
    """A small camp_official network (GRU text side, logit scorer) with spread-out weights and
    a batch of random regions and captions of mixed lengths."""
    sentence = "a dog runs on the grass two people sit by water child plays with red ball"
    vocabulary = Vocabulary.build([sentence], min_count=1)
    spec = NetworkSpec(
        text_encoder="gru",
        embed_size=16,
        word_dim=8,
        region_dim=24,
        num_heads=2,
        pooled_dim=8,
        pooled_hidden=16,
    )
    torch.manual_seed(0)
    network = RetrievalNetwork(spec, vocabulary=vocabulary).to(dtype)
    with torch.no_grad():
        for parameter in network.camp.parameters():
            parameter.normal_(0.0, 0.25)
    generator = torch.Generator().manual_seed(1)
    regions = torch.randn(batch, 5, spec.region_dim, generator=generator, dtype=dtype)
    lengths = torch.randint(2, 12, (batch,), generator=generator)
    ids = [
        torch.randint(4, len(vocabulary), (int(n),), generator=generator).tolist() for n in lengths
    ]
    padded, lengths = pad_token_ids(ids)
    return network, regions, padded, lengths


def loss_and_grads(network: RetrievalNetwork, scores_fn) -> tuple[torch.Tensor, dict]:
    """The BCE hardest-negative loss of `scores_fn()` and the CAMP gradients it gives."""
    network.zero_grad(set_to_none=True)
    loss = bce_hardest_negative_loss(scores_fn())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in network.camp.named_parameters() if p.grad is not None}
    return loss.detach(), grads

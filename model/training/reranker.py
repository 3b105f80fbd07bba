"""Stage 2: the scorer (CAMP, or another of the registry) as a residual reranker over the frozen
shortlist, trained on mined shortlists.

final = shortlist_weight · pooled_score + camp_weight · scorer_score. The residual start
(`init_residual`) silences the scorer as its registry entry says (CAMP: the score MLP's output
layer at zero; a scorer without such a layer: fusion weight 0), so training starts from exactly
the shortlist's ranking and the scorer only has to learn a correction. What is trained and
whether a warm start from the heads exists also come from the registry entry
(model/architecture/rerankers.py), so no scorer is a special case here. Each step takes B
caption queries (t2i) and B image queries (i2t); every query gets its positive plus
`negatives` candidates drawn from its own pooled top-`pool` (what the reranker sees at serving
time), and the loss is a listwise softmax cross-entropy over each group (the positive in slot
0). `loss="bce_hardest"` instead uses the authors' BCE on the group's hardest negative
(docs/ARCHITECTURE.md, Training). `negatives_from="batch"` trains on CAMP's own shape instead:
B distinct images with one caption each, every B×B pair scored, a symmetric listwise loss with
the diagonal positive (much faster to learn from scratch: bench/train_step.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.architecture.network import RetrievalNetwork
from model.architecture.precompute import CaptionPrecompute, PrecomputedScorer
from model.training.features import FrozenSplit
from model.training.mining import MinedShortlists, sample_negatives

CAPTIONS_PER_IMAGE = 5
LOSSES = ("listwise", "bce_hardest")
NEGATIVE_SOURCES = ("shortlist", "batch")


@dataclass(frozen=True)
class RerankerTrainingConfig:
    steps: int = 300
    queries_per_direction: int = 16
    negatives: int = 15
    pool: int = 100
    lr: float = 5e-4
    weight_decay: float = 1e-4
    grad_clip: float = 2.0
    loss: str = "listwise"
    seed: int = 0
    train_fusion: bool = True
    # residual: the loss sees shortlist + CAMP (fusion trained); otherwise CAMP alone (fusion
    # fixed at shortlist 0 / CAMP 1 while training, tuned on dev afterwards).
    residual: bool = True
    # Start CAMP from the shortlist heads' linear maps (needs embed_size == pooled_dim).
    warm_start: bool = False
    # "shortlist": each query's negatives from its pooled top-`pool`; "batch": all pairs of a
    # batch of 2 × queries_per_direction images (one caption each), listwise loss only.
    negatives_from: str = "shortlist"


def reranker_optimizer(
    network: RetrievalNetwork, config: RerankerTrainingConfig
) -> torch.optim.Optimizer:
    """AdamW over what the scorer's registry entry says is trainable (+ the fusion weights)."""
    parameters = list(network.spec.reranker_kind.trainable_parameters(network.camp))
    if config.train_fusion and config.residual:
        parameters += list(network.fusion.parameters())
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)


def warm_start_from_heads(network: RetrievalNetwork) -> None:
    """Start the scorer from the shortlist heads, as its registry entry says (CAMP: encoders
    from the heads' linear maps, score = cosine skip); a scorer without one is refused."""
    kind = network.spec.reranker_kind
    if kind.warm_start is None:
        raise ValueError(
            f"the {kind.name!r} scorer has no warm start from the shortlist heads; set "
            "reranker.warm_start to false"
        )
    kind.warm_start(network)


def init_residual(network: RetrievalNetwork) -> None:
    """Start as the shortlist: shortlist weight = InfoNCE scale and the scorer's part zero.

    The scorer's part is zeroed by its registry entry's `zero_output` (CAMP: the output layer,
    fusion weight 1); a scorer without one keeps its scores and gets fusion weight 0 instead,
    which the first step moves (its gradient is the scorer's scores), so the scorer then
    learns too.
    """
    zero_output = network.spec.reranker_kind.zero_output
    with torch.no_grad():
        network.fusion.shortlist_weight.fill_(float(network.heads.logit_scale))
        network.fusion.camp_weight.fill_(1.0 if zero_output is not None else 0.0)
    if zero_output is not None:
        zero_output(network.camp.scorer)


def _group_scores(
    network: RetrievalNetwork,
    scorer: PrecomputedScorer,
    data: FrozenSplit,
    image_index: np.ndarray,
    caption_index: np.ndarray,
    shortlist_scores: Tensor,
) -> Tensor:
    """Final scores [P] of aligned (image, caption) pairs, with autograd."""
    unique_images, image_slot = np.unique(image_index, return_inverse=True)
    unique_captions, caption_slot = np.unique(caption_index, return_inverse=True)
    encoded_images = network.camp.image_encoder(data.regions(unique_images))
    images = scorer.precompute_images(encoded_images, data.region_counts(unique_images)).select(
        torch.as_tensor(image_slot)
    )
    features, lengths = data.tokens.batch(unique_captions)
    words = network.words_from_features(features, lengths)
    captions: CaptionPrecompute = scorer.precompute_captions(words).select(
        torch.as_tensor(caption_slot)
    )
    logits = scorer.score_pairs(images, captions)
    return network.fusion(shortlist_scores, logits)


def in_batch_loss(
    network: RetrievalNetwork,
    scorer: PrecomputedScorer,
    data: FrozenSplit,
    rng: np.random.Generator,
    batch: int,
) -> Tensor:
    """Symmetric listwise loss over the B×B final scores of B distinct images and one caption
    of each (diagonal positive); each image and caption is precomputed once per step."""
    images = rng.choice(len(data.region_means), size=batch, replace=False)
    captions = images * CAPTIONS_PER_IMAGE + rng.integers(0, CAPTIONS_PER_IMAGE, size=batch)
    encoded = scorer.precompute_images(
        network.camp.image_encoder(data.regions(images)), data.region_counts(images)
    )
    features, lengths = data.tokens.batch(captions)
    words = scorer.precompute_captions(network.words_from_features(features, lengths))
    logits = scorer.score_grid(encoded, words)  # [B images, B captions]
    with torch.no_grad():
        pooled = network.heads.image.embed_mean(data.region_means[images]) @ (
            network.heads.text.embed_mean(data.text_means[captions]).t()
        )
    final = network.fusion(pooled, logits)
    target = torch.arange(batch)
    return (F.cross_entropy(final, target) + F.cross_entropy(final.t(), target)) / 2


def _loss(final: Tensor, group: int, kind: str) -> Tensor:
    scores = final.view(-1, group)
    if kind == "listwise":
        return F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.int64))
    probs = torch.sigmoid(scores).clamp(1e-6, 1 - 1e-6)
    return -(torch.log(probs[:, 0]) + torch.log(1 - probs[:, 1:].max(dim=1).values)).mean()


def train_reranker(
    network: RetrievalNetwork,
    data: FrozenSplit,
    mined: MinedShortlists | None,
    config: RerankerTrainingConfig,
    on_step: Callable[[int, float, float], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[float]:
    """Train CAMP (+ fusion) in place; heads stay frozen. on_step(step, loss, pairs_per_s).

    `mined` may be None with `negatives_from="batch"`.

    Pass `optimizer` (from `reranker_optimizer`) to carry its state across epochs.
    """
    if config.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {config.loss!r}")
    if config.negatives_from not in NEGATIVE_SOURCES:
        raise ValueError(
            f"negatives_from must be one of {NEGATIVE_SOURCES}, got {config.negatives_from!r}"
        )
    if config.negatives_from == "batch" and config.loss != "listwise":
        raise ValueError("in-batch negatives train with the listwise loss")
    if config.negatives_from == "shortlist" and config.negatives + CAPTIONS_PER_IMAGE > config.pool:
        raise ValueError(
            f"shortlist negatives: {config.negatives} negatives per query need a pool of at "
            f"least {config.negatives + CAPTIONS_PER_IMAGE} (an image's {CAPTIONS_PER_IMAGE} "
            f"captions may be in it), got pool {config.pool}"
        )
    if config.negatives_from == "shortlist" and mined is None:
        raise ValueError("shortlist negatives need the mined shortlists")
    if config.residual and not config.train_fusion and network.fusion.camp_weight.item() == 0:
        raise ValueError(
            "the fusion weight of the scorer is 0 (a residual start without an output layer to "
            "zero) and the fusion is not trained: the scorer would get no gradient; set "
            "train_fusion to true"
        )
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    optimizer = optimizer or reranker_optimizer(network, config)
    if not config.residual:  # the scorer alone, at its registry entry's scale (CAMP: 1)
        with torch.no_grad():
            network.fusion.shortlist_weight.fill_(0.0)
            network.fusion.camp_weight.fill_(network.spec.reranker_kind.score_scale(network))
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    scorer = network.pair_scorer()
    caption_image = data.caption_image
    group = config.negatives + 1
    b = config.queries_per_direction
    losses = []
    network.train()
    for step in range(config.steps):
        started = time.perf_counter()
        if config.negatives_from == "batch":
            loss = in_batch_loss(network, scorer, data, rng, 2 * b)
            losses.append(_optimize(loss, optimizer, parameters, config.grad_clip))
            if on_step is not None:
                on_step(step, losses[-1], (2 * b) ** 2 / (time.perf_counter() - started))
            continue
        # t2i: caption queries, image candidates.
        captions = rng.choice(len(caption_image), size=b, replace=False)
        t2i_positive = mined.t2i[captions] == caption_image[captions][:, None]
        t2i_neg = sample_negatives(
            mined.t2i[captions], t2i_positive, config.negatives, rng, config.pool
        )
        t2i_images = np.concatenate(
            [
                caption_image[captions][:, None],
                np.take_along_axis(mined.t2i[captions], t2i_neg, axis=1),
            ],
            axis=1,
        )
        t2i_pooled = _pooled_pairs(network, data, t2i_images, np.repeat(captions, group))
        # i2t: image queries, caption candidates.
        images = rng.choice(len(data.region_means), size=b, replace=False)
        i2t_positive = (mined.i2t[images] // CAPTIONS_PER_IMAGE) == images[:, None]
        i2t_neg = sample_negatives(
            mined.i2t[images], i2t_positive, config.negatives, rng, config.pool
        )
        own_caption = images * CAPTIONS_PER_IMAGE + rng.integers(0, CAPTIONS_PER_IMAGE, size=b)
        i2t_captions = np.concatenate(
            [own_caption[:, None], np.take_along_axis(mined.i2t[images], i2t_neg, axis=1)], axis=1
        )
        i2t_pooled = _pooled_pairs(network, data, np.repeat(images, group), i2t_captions)

        image_index = np.concatenate([t2i_images.reshape(-1), np.repeat(images, group)])
        caption_index = np.concatenate([np.repeat(captions, group), i2t_captions.reshape(-1)])
        shortlist = torch.cat([t2i_pooled, i2t_pooled])
        final = _group_scores(network, scorer, data, image_index, caption_index, shortlist)
        loss = _loss(final, group, config.loss)
        losses.append(_optimize(loss, optimizer, parameters, config.grad_clip))
        if on_step is not None:
            on_step(step, losses[-1], len(final) / (time.perf_counter() - started))
    network.eval()
    return losses


def _optimize(
    loss: Tensor, optimizer: torch.optim.Optimizer, parameters: list[Tensor], grad_clip: float
) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def _pooled_pairs(
    network: RetrievalNetwork, data: FrozenSplit, image_index: np.ndarray, caption_index: np.ndarray
) -> Tensor:
    """Pooled (shortlist) scores of aligned pairs, flattened."""
    image_index, caption_index = image_index.reshape(-1), caption_index.reshape(-1)
    image_vectors = network.heads.image.embed_mean(data.region_means[image_index])
    text_vectors = network.heads.text.embed_mean(data.text_means[caption_index])
    return (image_vectors * text_vectors).sum(-1)

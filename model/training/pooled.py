"""Stage 1: the shortlist heads, trained with symmetric InfoNCE on frozen pooled inputs.

Inputs are the region means and the MiniLM sentence vectors, both fixed, so an epoch over
30,000 captions takes seconds on a CPU (with the GRU text encoder, the GRU trains alongside:
model/training/gru_text.py). Captions of the same image inside a batch are not
treated as negatives of each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.architecture.pooled import PooledHeads


@dataclass(frozen=True)
class PooledTrainingConfig:
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0


def info_nce_loss(
    image_vectors: Tensor, text_vectors: Tensor, image_index: Tensor, scale: Tensor
) -> Tensor:
    """Symmetric InfoNCE over a batch of (caption, its image) rows; same-image pairs masked."""
    logits = scale * text_vectors @ image_vectors.t()
    same = image_index[:, None] == image_index[None, :]
    eye = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def train_pooled_heads(
    heads: PooledHeads,
    region_means: Tensor,
    text_means: Tensor | None,
    caption_image: np.ndarray,
    config: PooledTrainingConfig,
    on_epoch: Callable[[int, float, float], None] | None = None,
    *,
    text_vectors: Callable[[Tensor], Tensor] | None = None,
    extra_parameters: Sequence[nn.Parameter] = (),
) -> list[float]:
    """Train `heads` in place; returns the mean loss per epoch. on_epoch(epoch, loss, seconds).

    `text_vectors(caption_rows)` replaces the frozen `text_means` when the text encoder trains
    with the heads (the GRU recipe); its parameters then come in `extra_parameters`.
    """
    if text_vectors is None:
        if text_means is None:
            raise ValueError("give text_means or text_vectors")
        frozen_means = text_means

        def text_vectors(rows: Tensor) -> Tensor:
            return heads.text.embed_mean(frozen_means[rows])

    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        [*heads.parameters(), *extra_parameters], lr=config.lr, weight_decay=config.weight_decay
    )
    captions = len(caption_image)
    steps = config.epochs * (captions // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=max(1, steps), pct_start=0.1
    )
    caption_image_t = torch.as_tensor(caption_image)
    losses = []
    heads.train()
    for epoch in range(config.epochs):
        started, total, count = time.perf_counter(), 0.0, 0
        order = torch.randperm(captions, generator=generator)
        for start in range(0, len(order) - config.batch_size + 1, config.batch_size):
            rows = order[start : start + config.batch_size]
            images = caption_image_t[rows]
            loss = info_nce_loss(
                heads.image.embed_mean(region_means[images]),
                text_vectors(rows),
                images,
                heads.logit_scale,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, count = total + float(loss.detach()), count + 1
        losses.append(total / max(1, count))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1], time.perf_counter() - started)
    heads.eval()
    return losses

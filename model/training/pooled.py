"""Stage 1: the shortlist heads, trained with symmetric InfoNCE on frozen pooled inputs.

Inputs are the region means and the MiniLM sentence vectors, both fixed, so an epoch over
30,000 captions takes seconds on a CPU. Captions of the same image inside a batch are not
treated as negatives of each other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.pooled import PooledHeads


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
    text_means: Tensor,
    caption_image: np.ndarray,
    config: PooledTrainingConfig,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> list[float]:
    """Train `heads` in place; returns the mean loss per epoch. on_epoch(epoch, loss, seconds)."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        heads.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps = config.epochs * (len(text_means) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=max(1, steps), pct_start=0.1
    )
    caption_image_t = torch.as_tensor(caption_image)
    losses = []
    heads.train()
    for epoch in range(config.epochs):
        started, total, count = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(text_means), generator=generator)
        for start in range(0, len(order) - config.batch_size + 1, config.batch_size):
            rows = order[start : start + config.batch_size]
            images = caption_image_t[rows]
            loss = info_nce_loss(
                heads.image.embed_mean(region_means[images]),
                heads.text.embed_mean(text_means[rows]),
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

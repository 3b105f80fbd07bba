"""The authors' recipe for precomputed BUTD features (docs/ARCHITECTURE.md, Training), meant for a
GPU.

BCE on the hardest negative of every row and column of the B×B score matrix of a batch (all
pairs, scored with the precompute split in checkpointed blocks so that a batch fits one GPU:
`batch_logits`), gradient norm clipped at 2, AMP (bf16) on CUDA, one checkpoint per
epoch, resume, best by dev rsum of exhaustive CAMP on the first `selection.dev_images` dev
images. After the three stages the shortlist heads are trained on the frozen model.
See model/training/recipes.py for the one deviation from the authors' stage 1.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from model.architecture.camp import CampModel
from model.architecture.encoders import pad_token_ids
from model.architecture.fusion import CampLogitScorer
from model.architecture.network import NetworkSpec, RetrievalNetwork
from model.architecture.precompute import PrecomputedScorer
from model.checkpoints.checkpoint import load_checkpoint
from model.eval.data import RetrievalSplit, load_precomputed
from model.eval.protocol import retrieval_metrics
from model.text.vocab import Vocabulary
from model.training.gru_text import frozen_means
from model.training.losses import bce_hardest_negative_loss
from model.training.pooled import PooledTrainingConfig, train_pooled_heads
from model.training.recipes import TrainConfig
from model.training.run_state import RunFolder

GRAD_CLIP = 2.0
# Pairs of a batch's B x B grid whose activations are alive at once (a stage's "chunk_pairs").
DEFAULT_CHUNK_PAIRS = 2048
ATTENTION_MODULES = (
    "image_key",
    "text_key",
    "image_query",
    "text_query",
    "region_message_query",
    "region_message_key",
    "word_message_query",
    "word_message_key",
)


def batch_logits(
    camp: CampModel,
    regions: torch.Tensor,
    token_ids: torch.Tensor,
    lengths,
    chunk_pairs: int,
    region_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """CAMP logits [B, B] of every image of a batch against every caption, differentiable.

    The direct form (`CampModel.forward`) holds every pair's activations at once: at the
    preset's B = 256 that is 65,536 pairs and hundreds of GB. Here the projections are made once
    per item (the precompute split) and the pairs are scored in checkpointed blocks of at most
    `chunk_pairs`, so memory grows with B (items) plus one block, not with B² pairs. The scores
    are the direct form's (before its sigmoid) to float rounding; with `camp_cosine_skip` they
    include the skip, as served. `region_counts` [B]: real regions per image of a padded split.
    """
    if not isinstance(camp.scorer, CampLogitScorer):
        raise TypeError("batch_logits needs a CampLogitScorer (its score_mlp returns logits)")
    scorer = PrecomputedScorer(camp.scorer)
    images = scorer.precompute_images(camp.encode_images(regions), region_counts)
    captions = scorer.precompute_captions(camp.encode_text(token_ids, lengths))
    return scorer.score_grid_checkpointed(images, captions, chunk_pairs)


def set_trainable(network: RetrievalNetwork, freeze: list[str]) -> list[torch.nn.Parameter]:
    """Freeze "encoders" and/or "attention" (the 8 cross/self-attention projections)."""
    camp = network.camp
    for parameter in camp.parameters():
        parameter.requires_grad_(True)
    if "encoders" in freeze:
        for parameter in [*camp.image_encoder.parameters(), *camp.text_encoder.parameters()]:
            parameter.requires_grad_(False)
    if "attention" in freeze:
        for name in ATTENTION_MODULES:
            for parameter in getattr(camp.scorer, name).parameters():
                parameter.requires_grad_(False)
    return [p for p in camp.parameters() if p.requires_grad]


def _optimizer(stage: dict, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if stage["optimizer"] == "adam":
        return torch.optim.Adam(parameters, lr=stage["lr"])
    return torch.optim.SGD(
        parameters, lr=stage["lr"], momentum=0.9, nesterov=True, weight_decay=1e-4
    )


@torch.no_grad()
def exhaustive_dev_rsum(network: RetrievalNetwork, split: RetrievalSplit, ids, device) -> dict:
    scorer = network.pair_scorer()
    regions = torch.from_numpy(np.asarray(split.images, dtype=np.float32)).to(device)
    counts = split.region_counts
    images = scorer.precompute_images(
        network.camp.image_encoder(regions),
        None if counts is None else torch.from_numpy(counts).to(device),
    )
    padded, lengths = pad_token_ids(ids)
    words = network.camp.text_encoder(padded.to(device), lengths)
    captions = scorer.precompute_captions(words)
    return retrieval_metrics(scorer.score_grid(images, captions).float().cpu().numpy())


def run_official(config: TrainConfig, run: RunFolder, resume: bool, console: Console) -> Path:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(config.data["root"])
    train = load_precomputed(root, config.data.get("train", "train"))
    dev = load_precomputed(root, config.data.get("dev", "dev"))
    dev = dev.subset(slice(0, int(config.selection.get("dev_images", dev.num_images))))
    vocabulary = Vocabulary.build(train.captions, min_count=int(config.data.get("min_count", 4)))
    network = RetrievalNetwork(NetworkSpec.from_dict(config.network), vocabulary=vocabulary)
    network.to(device)
    max_words = network.camp_config().max_words
    train_ids = [vocabulary.encode(c, max_words=max_words) for c in train.captions]
    dev_ids = [vocabulary.encode(c, max_words=max_words) for c in dev.captions]
    caption_image = train.caption_image()
    metadata = config.metadata()
    state = run.resume_state() if resume else None
    best = state["best_rsum"] if state else float("-inf")
    if state is not None:
        network.load_state_dict(state["network"])
    stage_names = [s["name"] for s in config.stages]
    position = (stage_names.index(state["stage"]), state["epoch"] + 1) if state else (0, 0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for stage_index, stage in enumerate(config.stages):
        if stage_index < position[0]:
            continue
        parameters = set_trainable(network, stage.get("freeze", []))
        optimizer = _optimizer(stage, parameters)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, stage["lr_step_epochs"], 0.1)
        first_epoch = position[1] if stage_index == position[0] else 0
        if state is not None and state["stage"] == stage["name"]:
            optimizer.load_state_dict(state["optimizer"])
        for _ in range(first_epoch):
            schedule.step()
        batch = int(stage["batch_size"])
        chunk = int(stage.get("chunk_pairs", DEFAULT_CHUNK_PAIRS))
        for epoch in range(first_epoch, int(stage["epochs"])):
            network.train()
            order = rng.permutation(len(train.captions))
            started, seen = time.perf_counter(), 0
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
            )
            with Progress(*columns, console=console) as bar:
                task = bar.add_task(
                    f"{stage['name']} {epoch}", total=len(order) // batch, status=""
                )
                for start in range(0, len(order) - batch + 1, batch):
                    rows = order[start : start + batch]
                    batch_images = np.sort(caption_image[rows])
                    regions = torch.from_numpy(
                        np.asarray(train.images[batch_images], dtype=np.float32)
                    )
                    counts = train.region_counts_of(batch_images)
                    rows = rows[np.argsort(caption_image[rows], kind="stable")]
                    padded, lengths = pad_token_ids([train_ids[r] for r in rows])
                    with autocast:
                        logits = batch_logits(
                            network.camp,
                            regions.to(device),
                            padded.to(device),
                            lengths,
                            chunk,
                            None if counts is None else torch.from_numpy(counts).to(device),
                        )
                    loss = bce_hardest_negative_loss(torch.sigmoid(logits.float()))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(parameters, GRAD_CLIP)
                    optimizer.step()
                    seen += batch
                    rate = seen / (time.perf_counter() - started)
                    value = loss.item()  # the step's one host sync, for the log
                    bar.update(task, advance=1, status=f"loss {value:.3f} {rate:.0f} captions/s")
                    run.log(
                        event="step",
                        stage=stage["name"],
                        epoch=epoch,
                        loss=value,
                        captions_per_s=rate,
                    )
            schedule.step()
            network.eval()
            metrics = exhaustive_dev_rsum(network, dev, dev_ids, device)
            run.log(event="dev", stage=stage["name"], epoch=epoch, rsum=metrics["rsum"])
            console.print(
                f"{stage['name']} epoch {epoch}: dev exhaustive rsum {metrics['rsum']:.1f}"
            )
            if metrics["rsum"] > best:
                best = metrics["rsum"]
                run.save_best(network, metadata)
            run.save_epoch(network, metadata, stage["name"], epoch, optimizer, best)
    best_path = run.path / "best.pt"
    if best_path.exists():  # the heads are trained on the best CAMP, then saved with it
        network.camp.load_state_dict(load_checkpoint(best_path).state_dict)
    _train_heads(network, train, train_ids, config, device)
    return run.save_best(network, metadata)


def _train_heads(
    network: RetrievalNetwork, train: RetrievalSplit, ids, config: TrainConfig, device
) -> None:
    """Shortlist heads on the frozen CAMP text encoder's word means and the region means."""
    regions, text = frozen_means(network, train, ids)
    heads = network.heads.cpu()
    train_pooled_heads(
        heads,
        regions,
        text,
        train.caption_image(),
        PooledTrainingConfig(**{"seed": config.seed, **config.pooled}),
    )
    network.heads = heads.to(device)

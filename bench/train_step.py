"""Reranker training: all-pairs in-batch negatives vs shortlist-mined negatives, same wall time.

Both train CAMP alone (cosine skip on, d from --embed-size) from the same initial weights with
a listwise softmax loss, for --seconds each:
* all_pairs: B captions with their images, every B×B pair scored (CAMP's own recipe shape);
* mined: B/2 caption and B/2 image queries, each with its positive and `negatives` candidates
  from its pooled top-100 (what the reranker sees when serving).
Prints training pairs/s of each, their ratio, and the dev two-stage rsum each reaches.

    python bench/train_step.py --data /work/cache/flickr8k-grid \
        --text-cache /work/cache/flickr8k-minilm --seconds 120 --json bench/results/train_step.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from model.architecture.network import NetworkSpec, RetrievalNetwork
from model.architecture.precompute import PrecomputedScorer
from model.eval.data import load_precomputed
from model.training.dev_eval import evaluate_frozen
from model.training.features import FrozenSplit, frozen_split
from model.training.mining import mine_shortlists
from model.training.pooled import PooledTrainingConfig, train_pooled_heads
from model.training.reranker import (
    RerankerTrainingConfig,
    in_batch_loss,
    reranker_optimizer,
    train_reranker,
)
from model.training.residual import frozen_subset


def all_pairs_step(
    network: RetrievalNetwork, data: FrozenSplit, optimizer, batch: int, rng: np.random.Generator
) -> int:
    """One step on a batch of distinct images, one caption each; returns pairs scored."""
    loss = in_batch_loss(network, PrecomputedScorer(network.camp.scorer), data, rng, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(network.camp.parameters(), 2.0)
    optimizer.step()
    return batch * batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--text-cache", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--embed-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=24, help="all-pairs batch (B² pairs)")
    parser.add_argument("--dev-images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train = frozen_split(load_precomputed(args.data, "train"), args.text_cache)
    dev = frozen_subset(
        frozen_split(load_precomputed(args.data, "dev"), args.text_cache), args.dev_images
    )
    torch.manual_seed(0)
    base = RetrievalNetwork(
        NetworkSpec(embed_size=args.embed_size, camp_cosine_skip=True), backbone=None
    )
    train_pooled_heads(
        base.heads,
        train.region_means,
        train.text_means,
        train.caption_image,
        PooledTrainingConfig(epochs=3),
    )
    with torch.no_grad():
        mined = mine_shortlists(
            base.heads.image.embed_mean(train.region_means),
            base.heads.text.embed_mean(train.text_means),
            100,
        )
        base.fusion.shortlist_weight.fill_(0.0)
        base.fusion.camp_weight.fill_(1.0)
    for parameter in base.heads.parameters():
        parameter.requires_grad_(False)
    initial = {k: v.clone() for k, v in base.state_dict().items()}
    results = {}
    for mode in ("all_pairs", "mined"):
        base.load_state_dict(initial)
        config = RerankerTrainingConfig(
            steps=1, residual=False, lr=1e-3, queries_per_direction=args.batch // 2, negatives=15
        )
        optimizer = reranker_optimizer(base, config)
        rng = np.random.default_rng(0)
        pairs, steps, started = 0, 0, time.perf_counter()
        base.train()
        while time.perf_counter() - started < args.seconds:
            if mode == "all_pairs":
                pairs += all_pairs_step(base, train, optimizer, args.batch, rng)
            else:
                config = RerankerTrainingConfig(**{**config.__dict__, "seed": steps})
                train_reranker(base, train, mined, config, optimizer=optimizer)
                pairs += 2 * config.queries_per_direction * (config.negatives + 1)
            steps += 1
        elapsed = time.perf_counter() - started
        base.eval()
        metrics = evaluate_frozen(base, dev, ks=(50,))
        results[mode] = {
            "steps": steps,
            "seconds": elapsed,
            "pairs_per_s": pairs / elapsed,
            "dev_pooled_rsum": metrics["pooled"]["rsum"],
            "dev_camp_alone_two_stage_k50_rsum": metrics["two_stage"]["50"]["rsum"],
        }
        print(
            f"{mode:10s} {steps:5d} steps {pairs / elapsed:8.0f} pairs/s  dev CAMP-alone "
            f"K=50 rsum {results[mode]['dev_camp_alone_two_stage_k50_rsum']:.1f}"
        )
    ratio = results["all_pairs"]["pairs_per_s"] / results["mined"]["pairs_per_s"]
    print(f"pairs/s ratio all_pairs / mined: {ratio:.2f}")
    results["pairs_per_s_ratio_all_pairs_over_mined"] = ratio
    results["settings"] = {k: str(v) for k, v in vars(args).items()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

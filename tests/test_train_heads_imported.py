"""`camp-search train` with the shipped heads_imported preset: shortlist heads for the imported
official tiny CAMP, trained on the fake split, CAMP untouched, and the result searched
two-stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_paths import PARITY_DIR
from typer.testing import CliRunner

import model.eval.evaluate_model as evaluate_module
from model.checkpoints.checkpoint import load_checkpoint
from model.eval.data import load_precomputed
from model.eval.evaluate_model import evaluate_model
from model.retrieval import RetrievalModel
from model.text.vocab import Vocabulary
from service.cli.main import app

PRESET = Path(__file__).resolve().parents[1] / "model" / "configs" / "train_heads_imported.json"
METRIC_KEYS = ("r1", "r5", "r10", "medr", "meanr")


def _invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The tiny official checkpoint imported by the command, and the fake split as train (the
    released 5N-row layout) and dev (one row per image)."""
    root = tmp_path_factory.mktemp("heads-imported")
    fake = torch.load(PARITY_DIR / "camp_tiny_eval_fake_5N_rows.pt", weights_only=False)
    vocab = root / "vocab.json"
    Vocabulary(fake["vocab_words"]).save_json(vocab)
    imported = root / "camp_tiny.pt"
    result = _invoke(
        "import-checkpoint", PARITY_DIR / "camp_tiny_checkpoint.pth.tar", "--vocab", vocab,
        "--out", imported, "--extractor", "precomputed",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = root / "precomp"
    data.mkdir()
    images = fake["image_feats"].numpy()
    np.save(data / "train_ims.npy", np.repeat(images, 5, axis=0))
    np.save(data / "dev_ims.npy", images)
    for split in ("train", "dev"):
        (data / f"{split}_caps.txt").write_text("\n".join(fake["captions_txt"]) + "\n")
    return {"root": root, "imported": imported, "data": data}


def _preset(setup: dict, name: str, **changes: dict) -> Path:
    """The shipped preset pointed at the test's files, at the tiny model's sizes."""
    config = json.loads(PRESET.read_text())
    config["init"] = {"checkpoint": str(setup["imported"])}
    config["data"] = {**config["data"], "root": str(setup["data"])}
    config["network"] = {"pooled_dim": 8, "pooled_hidden": 16}
    config["pooled"] = {"epochs": 4, "batch_size": 16, "lr": 0.01}
    config["selection"] = {**config["selection"], "dev_images": 12, "k": 10}
    config["out"] = str(setup["root"] / name)
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(config[key], dict) else value
    path = setup["root"] / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def test_trains_only_the_heads_and_the_result_searches_two_stage(setup):
    result = _invoke("train", "--config", _preset(setup, "run"))
    assert result.exit_code == 0, result.output
    best = setup["root"] / "run" / "best.pt"
    imported, trained = load_checkpoint(setup["imported"]), load_checkpoint(best)

    # CAMP and its vocabulary are the release's, bit for bit.
    assert trained.vocabulary == imported.vocabulary
    assert trained.state_dict.keys() == imported.state_dict.keys()
    for key, value in imported.state_dict.items():
        assert torch.equal(trained.state_dict[key], value), key
    # The heads trained: the loss fell, and they moved from where the same seed starts them.
    events = [json.loads(line) for line in (best.parent / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "epoch"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    untrained = _invoke("train", "--config", _preset(setup, "untrained", pooled={"epochs": 0}))
    assert untrained.exit_code == 0, untrained.output
    start = load_checkpoint(setup["root"] / "untrained" / "best.pt").extras["pooled_heads"]
    heads = trained.extras["pooled_heads"]
    assert heads.keys() == start.keys()
    assert any(not torch.equal(heads[k], start[k]) for k in heads)

    # It loads as a two-stage model, keeps the imported extractor and ranks by CAMP alone.
    model = RetrievalModel.load(best, device="cpu")
    assert model.network.heads is not None and model.pooled_dim == 8
    assert model.extractor_name == "precomputed" and model.version == "camp-f30k-official-heads-v1"
    fusion = model.network.fusion
    assert (fusion.shortlist_weight.item(), fusion.camp_weight.item()) == (0.0, 1.0)
    assert model.metadata["training"]["base_checkpoint"] == str(setup["imported"])
    dev = load_precomputed(setup["data"], "dev")
    metrics = evaluate_model(model, dev, modes=["pooled", "two_stage", "exhaustive"], ks=[5, 12])
    # CAMP is untouched: every pair scored gives the official evaluation; the heads' shortlist
    # feeds it, and a caption's shortlist of all 12 images gives the official t2i ranking.
    printed = json.loads((PARITY_DIR / "camp_tiny_eval_fake_summary.json").read_text())["5N_rows"]
    for direction in ("i2t", "t2i"):
        got = [metrics["exhaustive"][direction][k] for k in METRIC_KEYS]
        np.testing.assert_allclose(got, printed[direction], rtol=1e-12)
    assert metrics["two_stage"]["12"]["t2i"] == metrics["exhaustive"]["t2i"]
    assert metrics["two_stage"]["5"] == metrics["camp_alone"]["two_stage"]["5"]
    dev_event = next(e for e in events if e["event"] == "dev")
    assert dev_event["k"] == 10 and "pooled_rsum" in dev_event


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"network": {"embed_size": 64}}, "network may set only ['pooled_dim', 'pooled_hidden']"),
        ({"init": {"checkpoint": ""}}, "init.checkpoint must name the imported model"),
        ({"init": {"checkpoint": "/nowhere/model.pt"}}, "init.checkpoint: "),
        ({"init": {"checkpoint": __file__}}, "init.checkpoint: "),
        ({"selection": {"fusion": "average"}}, "selection.fusion must be one of"),
        ({"extractor": {"name": "grid"}}, "differs from the imported model's 'precomputed'"),
    ],
)
def test_a_wrong_preset_is_refused_with_its_key_named(setup, changes, expected):
    result = _invoke("train", "--config", _preset(setup, "refused", **changes))
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())


def test_features_of_another_width_are_refused(setup, tmp_path):
    data = tmp_path / "wide"
    data.mkdir()
    np.save(data / "train_ims.npy", np.zeros((2, 36, 2048), dtype=np.float32))
    (data / "train_caps.txt").write_text("w4 w5\n" * 10)
    result = _invoke("train", "--config", _preset(setup, "wide", data={"root": str(data)}))
    assert result.exit_code == 2
    assert "holds 2048-d regions; the imported model reads 64-d" in " ".join(result.output.split())


def test_the_whole_path_release_to_two_stage_search(shared_dir, small_grid_extractor, tmp_path):
    """A release in the official layout whose regions are the grid extractor's (1280-d), so the
    path runs here without detectron2: import -> extract real photos -> train the heads ->
    serve -> ingest -> both searches, the shortlist from the heads and the order from CAMP."""
    from collections import Counter

    from service_support import coco_photos, make_settings, running_client

    from model.text.tokenizer import tokenize
    from model.vision.extract import extract_dataset
    from model.vision.extractors.grid import HEAD_CHANNELS
    from service.api.app import create_app

    photos = coco_photos(shared_dir, 30)
    counts = Counter(w for _, captions in photos for c in captions[:5] for w in tokenize(c))
    words = ["<pad>", "<start>", "<end>", "<unk>", *(w for w, _ in counts.most_common(36))]
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(words)}}))
    payload = torch.load(PARITY_DIR / "camp_tiny_checkpoint.pth.tar")
    image_part = dict(payload["model"][0])
    generator = torch.Generator().manual_seed(0)
    image_part["module.fc.weight"] = 0.05 * torch.randn(32, HEAD_CHANNELS, generator=generator)
    release = tmp_path / "model_best.pth.tar"
    opt = {**payload["opt"], "img_dim": HEAD_CHANNELS}
    torch.save({**payload, "model": [image_part, *payload["model"][1:]], "opt": opt}, release)
    imported = tmp_path / "imported.pt"
    result = _invoke("import-checkpoint", release, "--vocab", vocab, "--out", imported)
    assert result.exit_code == 0, result.output

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"image": str(path), "id": path.stem, "captions": caps[:5], "split": split})
            + "\n"
            for (path, caps), split in zip(photos, ["train"] * 24 + ["dev"] * 6, strict=True)
        )
    )
    extract_dataset(manifest, tmp_path / "precomp", small_grid_extractor)
    setup = {"root": tmp_path, "imported": imported, "data": tmp_path / "precomp"}
    preset = _preset(setup, "run", selection={"dev_images": 6, "k": 5})
    result = _invoke("train", "--config", preset)
    assert result.exit_code == 0, result.output

    model = RetrievalModel.load(tmp_path / "run" / "best.pt", device="cpu")
    assert model.extractor_name == "grid" and model.network.heads is not None
    settings = make_settings(tmp_path / "data", batch_max_wait_ms=20)
    app = create_app(settings, model=model, extractor=small_grid_extractor)
    with running_client(app) as client:
        ids = []
        for path, captions in photos[24:]:
            response = client.post(
                "/v1/images", files={"file": (path.name, path.read_bytes())},
                data={"captions": captions[:2]},
            )  # fmt: skip
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        query = photos[24][1][0]
        response = client.post("/v1/search/images", json={"text": query, "limit": 6})
        assert response.status_code == 200, response.text
        hits = response.json()["results"]
        assert sorted(h["id"] for h in hits) == sorted(ids)
        # Each hit's score is CAMP's own logit for the pair: the shortlist only chose them.
        runtime = app.state.service.runtime
        encoded = runtime.model.encode_texts([query])
        for hit in hits:
            tensors = runtime.pipeline.tensors_of_images([hit["id"]])[hit["id"]]
            logit = runtime.model.camp_logits(tensors.precompute, encoded.precompute)
            assert hit["score"] == pytest.approx(float(logit[0]), abs=1e-5)
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True)
        response = client.post("/v1/search/captions", json={"image_id": ids[0], "limit": 5})
        assert response.status_code == 200, response.text
        assert len(response.json()["results"]) == 5


def test_dev_pair_scores_do_not_depend_on_the_memory_budget(setup, monkeypatch):
    """The dev two-stage pass scores fewer pairs per call where pairs are large (d = 1024);
    its CAMP scores stay those of the whole grid."""
    import model.training.dev_eval as dev_eval
    from model.architecture.precompute import PrecomputedScorer
    from model.training.gru_text import gru_frozen_split
    from model.training.heads_imported import frozen_network

    network, _ = frozen_network(setup["imported"], {"pooled_dim": 8, "pooled_hidden": 16})
    with torch.no_grad():  # rank by CAMP alone, so the scores are CAMP's
        network.fusion.shortlist_weight.fill_(0.0)
        network.fusion.camp_weight.fill_(1.0)
    data = gru_frozen_split(network, load_precomputed(setup["data"], "dev"))
    pooled = dev_eval.pooled_scores(network, data)
    images, captions = np.divmod(np.arange(pooled.size), pooled.shape[1])
    whole = dev_eval.pair_scorer(network, data, pooled)(images, captions)
    monkeypatch.setattr(evaluate_module, "PAIR_MEMORY_BYTES", 1)  # one pair per call
    single = dev_eval.pair_scorer(network, data, pooled)(images, captions)
    np.testing.assert_allclose(single, whole, atol=1e-6, rtol=0)
    scorer = PrecomputedScorer(network.camp.scorer)
    features, lengths = data.tokens.batch(np.arange(pooled.shape[1]))
    with torch.no_grad():
        grid = scorer.score_grid(
            scorer.precompute_images(network.camp.image_encoder(data.regions(np.arange(12)))),
            scorer.precompute_captions(network.words_from_features(features, lengths)),
        )
    np.testing.assert_allclose(whole.reshape(pooled.shape), grid.numpy(), atol=1e-5, rtol=0)

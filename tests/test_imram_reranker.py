"""IMRAM behind the reranker interface: its per-item tensors and pair scorer equal the direct
form, an imported official IMRAM checkpoint scores as the authors' code through the service's
path, and a checkpoint that records scorer "imram" is served over real HTTP (uvicorn) with
ranked, explained results."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from redis_server import free_port
from service_support import ServerThread, coco_photos, make_settings, small_extractor
from shared_paths import PARITY_DIR
from typer.testing import CliRunner

from model.architecture import imram
from model.architecture.encoders import EncodedText
from model.architecture.imram import ImramMiniLMWordEncoder, ImramModel, ImramOptions
from model.architecture.imram_precompute import (
    ImramCaptionPrecompute,
    ImramImagePrecompute,
    ImramPrecomputedScorer,
)
from model.architecture.network import NetworkSpec, RetrievalNetwork
from model.architecture.rerankers import (
    UnknownReranker,
    registered_rerankers,
    reranker_kind,
)
from model.checkpoints.checkpoint import CheckpointError, load_checkpoint
from model.checkpoints.config import CampConfig, ConfigError
from model.retrieval import RetrievalModel
from model.text.vocab import Vocabulary
from service.api.app import create_app
from service.cli.main import app as cli
from service.search.stored_tensors import (
    ImageTensors,
    caption_record,
    caption_tensors,
    image_record,
    image_tensors,
)

IMRAM_DIR = PARITY_DIR / "imram"
ATOL = 1e-5
# float16 storage keeps ~3 significant digits of unit vectors; a score sums 2K cosines.
STORED_ATOL = 2e-2


def _tiny_imram(mode: str = "full", seed: int = 0) -> ImramModel:
    torch.manual_seed(seed)
    config = CampConfig(vocab_size=40, word_dim=16, embed_size=32, img_dim=24)
    return ImramModel.from_config(config, ImramOptions(mode=mode)).eval()


def _inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    regions = torch.relu(torch.randn(4, 9, 24, generator=generator))
    counts = torch.tensor([9, 5, 7, 3])
    lengths = torch.tensor([6, 11, 4])
    token_ids = torch.randint(4, 40, (3, 11), generator=generator)
    return regions, counts, token_ids, lengths


def test_both_scorers_are_registered_and_unknown_names_are_refused():
    assert {"camp", "imram"} <= set(registered_rerankers())
    with pytest.raises(UnknownReranker, match="registered"):
        reranker_kind("caan-from-the-future")
    with pytest.raises(ConfigError, match="IMRAM mode"):
        NetworkSpec(text_encoder="gru", scorer="imram", scorer_options={"mode": "sideways"})
    with pytest.raises(ConfigError, match="takes no options"):
        NetworkSpec(text_encoder="gru", scorer="camp", scorer_options={"mode": "full"})


@pytest.mark.parametrize("mode", ["full", "text", "image"])
def test_precomputed_pairs_equal_the_direct_form_with_padded_regions(mode):
    model = _tiny_imram(mode)
    regions, counts, token_ids, lengths = _inputs()
    scorer = ImramPrecomputedScorer(model.scorer)
    with torch.no_grad():
        encoded = model.encode_images(regions)
        text = model.encode_text(token_ids, lengths)
        # Direct form: each image alone at its own region count (no padding at all).
        direct = torch.stack(
            [
                model.scorer(encoded[i : i + 1, : counts[i]], text.words, text.mask)[0]
                for i in range(len(counts))
            ]
        )
        images = scorer.precompute_images(encoded, counts)
        captions = scorer.precompute_captions(text)
        grid = scorer.score_grid(images, captions)
        grid_small_blocks = scorer.score_grid(images, captions, memory_budget_bytes=1)
        # Per-item tensors trimmed and re-joined at mixed widths, as the reranker lays them out.
        items = [images.select([i]).trimmed(int(counts[i])) for i in range(len(counts))]
        joined = ImramImagePrecompute.cat(items)
        caption_items = [captions.select([j]) for j in range(len(lengths))]
        one_caption = scorer.score_text_against_images(caption_items[1], joined)[0]
        one_image = scorer.score_image_against_captions(
            items[2], ImramCaptionPrecompute.cat(caption_items)
        )[0]
    assert grid.dtype == torch.float64
    torch.testing.assert_close(grid, direct, atol=ATOL, rtol=0)
    torch.testing.assert_close(grid_small_blocks, direct, atol=ATOL, rtol=0)
    torch.testing.assert_close(one_caption, direct[:, 1], atol=ATOL, rtol=0)
    torch.testing.assert_close(one_image, direct[2], atol=ATOL, rtol=0)


@pytest.mark.parametrize("memory_norm", [False, True])
@pytest.mark.parametrize("embed_size", [8, 64], ids=["wide-context", "narrow-context"])
@pytest.mark.parametrize("block_pairs", [64, 2], ids=["one-block", "blocks-of-2"])
def test_the_inference_path_scores_as_the_autograd_path(
    memory_norm, embed_size, block_pairs, monkeypatch
):
    """Without autograd `score_pairs` takes its in-place path (shared first products, tanh as
    a sigmoid, and for a context short next to d the attended context's Gram form), in blocks
    of pairs on the CPU: padded regions and words on every pair, the query side repeated as a
    view as the reranker lays it out, and every mode give the autograd path's scores.
    embed_size 8 keeps the attended context in both directions; 64 takes the Gram form."""
    monkeypatch.setattr(imram, "CPU_INFERENCE_BLOCK_PAIRS", block_pairs)
    torch.manual_seed(3)
    for mode in ("full", "text", "image"):
        options = ImramOptions(mode=mode, memory_norm=memory_norm)
        config = CampConfig(vocab_size=40, word_dim=16, embed_size=embed_size, img_dim=24)
        model = ImramModel.from_config(config, options).eval()
        scorer = ImramPrecomputedScorer(model.scorer)
        regions, counts, token_ids, lengths = _inputs(seed=5)
        with torch.no_grad():
            images = scorer.precompute_images(model.encode_images(regions), counts)
            captions = scorer.precompute_captions(model.encode_text(token_ids, lengths))
        # Image-IMRAM (regions query words) takes the Gram form at 64, not at 8.
        widest = (captions.words.shape[1], images.regions.shape[1], embed_size, 3)
        assert imram.attends_by_gram(*widest) == (embed_size == 64)
        caption = captions.select([1]).repeat(len(counts))  # one query x 4 images, a view
        assert caption.words.stride(0) == 0
        for pair_images, pair_captions in (
            (images, caption),
            (images.select([0, 1, 2]), captions),
        ):
            with torch.enable_grad():
                reference = scorer.score_pairs(pair_images, pair_captions)
            with torch.inference_mode():
                fast = scorer.score_pairs(pair_images, pair_captions)
            torch.testing.assert_close(fast, reference.detach(), atol=1e-6, rtol=0)


def test_the_checkpointed_training_grid_has_the_gradients_of_the_direct_form():
    regions, counts, token_ids, lengths = _inputs()
    gradients = []
    for chunked in (False, True):
        model = _tiny_imram().train()
        scorer = ImramPrecomputedScorer(model.scorer)
        images = scorer.precompute_images(model.encode_images(regions), counts)
        captions = scorer.precompute_captions(model.encode_text(token_ids, lengths))
        if chunked:
            scores = scorer.score_grid_checkpointed(images, captions, max_pairs=2)
        else:
            scores = model.scorer(images.regions, captions.words, captions.mask, images.mask)
        (scores * torch.arange(scores.numel()).view_as(scores)).sum().backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    # The blocks regroup the memory layers (per-item projections), so rounding differs:
    # per tensor within 1e-5 of its largest entry (seen: 1e-6).
    for name, direct in gradients[0].items():
        error = (gradients[1][name] - direct).abs().max().item()
        assert error <= 1e-5 * direct.abs().max().item() + 1e-6, (name, error)


def test_explanations_are_the_first_steps_attention_over_real_regions():
    model = _tiny_imram()
    regions, counts, token_ids, lengths = _inputs()
    scorer = ImramPrecomputedScorer(model.scorer)
    with torch.no_grad():
        images = scorer.precompute_images(model.encode_images(regions), counts)
        text = model.encode_text(token_ids, lengths)
        caption = scorer.precompute_captions(text).select([0])
        scores, maps = scorer.score_text_against_images(caption, images, explain=True)
        trace = model.scorer.trace_grid(
            images.regions[1:2, :5], text.words[:1, :6], text.mask[:1, :6]
        )
    assert maps.word_region.shape == (4, 1, 6, 9)
    # Rows are distributions over each image's real regions only.
    torch.testing.assert_close(maps.word_region.sum(-1), torch.ones(4, 1, 6))
    assert not maps.word_region[1, 0, :, 5:].any()
    # Image 1 (5 real regions) against caption 0: the first Text-IMRAM step of the trace.
    torch.testing.assert_close(
        maps.word_region[1, 0, :, :5], trace.directions["text"].attention[0, 0, 0]
    )
    # The regions' weights: the words' attention averaged over the caption's real words.
    torch.testing.assert_close(
        maps.region_weights[1, 0, :5], trace.directions["text"].attention[0, 0, 0].mean(0)
    )
    assert not maps.region_weights[1, 0, 5:].any()
    torch.testing.assert_close(maps.region_weights.sum(-1), torch.ones(4, 1))
    assert scores.shape == (4,)


def test_stored_records_round_trip_as_imram_tensors():
    model = _tiny_imram()
    regions, counts, token_ids, lengths = _inputs()
    scorer = ImramPrecomputedScorer(model.scorer)
    with torch.no_grad():
        images = scorer.precompute_images(model.encode_images(regions), counts)
        captions = scorer.precompute_captions(model.encode_text(token_ids, lengths))
        image = images.select([1]).trimmed(5)
        record = image_record(ImageTensors(image, np.zeros((5, 4), np.float32), (64, 48)))
        assert set(record) == {
            "regions",
            "text_context",
            "image_first_query",
            "boxes",
            "image_size",
        }
        assert record["text_context"].shape == (5, 64)  # [R, 2d]
        back = image_tensors(record, torch.device("cpu"), ImramImagePrecompute).precompute
        caption = captions.select([0])
        caption_back = caption_tensors(
            caption_record(caption), torch.device("cpu"), ImramCaptionPrecompute
        )
        assert isinstance(back, ImramImagePrecompute) and int(back.region_counts[0]) == 5
        assert int(caption_back.lengths[0]) == int(lengths[0])
        original = scorer.score_pairs(image, caption)
        stored = scorer.score_pairs(back, caption_back)
    torch.testing.assert_close(stored, original, atol=STORED_ATOL, rtol=0)


# -- the official checkpoint through `camp-search import-checkpoint` ---------------------------
def _vocabulary_json(path, size: int) -> None:
    words = ["<pad>", "<start>", "<end>", "<unk>", *(f"w{i}" for i in range(4, size))]
    path.write_text(
        json.dumps(
            {
                "word2idx": {w: i for i, w in enumerate(words)},
                "idx2word": {str(i): w for i, w in enumerate(words)},
                "idx": len(words),
            }
        )
    )


def test_the_cli_imports_an_official_imram_checkpoint_that_scores_as_the_authors(tmp_path):
    vocab, out = tmp_path / "vocab.json", tmp_path / "imram.pt"
    _vocabulary_json(vocab, 40)
    result = CliRunner().invoke(
        cli,
        [
            "import-checkpoint",
            str(IMRAM_DIR / "imram_dense_checkpoint.pth.tar"),
            "--vocab",
            str(vocab),
            "--out",
            str(out),
            "--extractor",
            "precomputed",
        ],
    )
    assert result.exit_code == 0, result.output
    raw = torch.load(out, weights_only=True)
    assert raw["scorer"]["name"] == "imram" and raw["scorer"]["options"]["mode"] == "full"
    model = RetrievalModel.load(out, device="cpu")
    assert isinstance(model.scorer, ImramPrecomputedScorer)
    assert model.max_caption_tokens == 130  # the official code cuts no caption; we cut at 128
    inputs = torch.load(IMRAM_DIR / "imram_dense_inputs.pt")
    outputs = torch.load(IMRAM_DIR / "imram_dense_outputs.pt")
    ids = [
        row[: int(n)].tolist()
        for row, n in zip(inputs["A_captions"], inputs["A_lengths"], strict=True)
    ]
    features, token_lengths = model.text_features(ids)
    with torch.inference_mode():
        words = model.network.words_from_features(features, token_lengths)
        captions = model.scorer.precompute_captions(words)
        images = model.precompute_images(inputs["A_images"].numpy())
        grid = model.scorer.score_grid(images, captions)
        # The serving path: aligned pairs through `camp_logits` (no special case).
        pairs = model.camp_logits(images.select([3] * 7), ImramCaptionPrecompute.cat(
            [captions.select([j]) for j in range(7)]
        ))  # fmt: skip
    torch.testing.assert_close(grid, outputs["A_scores_full"], atol=ATOL, rtol=0)
    torch.testing.assert_close(pairs, outputs["A_scores_full"][3], atol=ATOL, rtol=0)


def test_a_checkpoint_whose_scorer_record_disagrees_with_its_spec_is_refused(tmp_path):
    network = RetrievalNetwork(
        NetworkSpec(text_encoder="gru", embed_size=16, region_dim=8, word_dim=8, scorer="imram"),
        vocabulary=Vocabulary.build(["a cat"], min_count=1),
    )
    checkpoint = network.to_checkpoint({"version": "t"})
    checkpoint.scorer = "camp"
    with pytest.raises(CheckpointError, match="records scorer 'camp'"):
        RetrievalNetwork.from_checkpoint(checkpoint)


# -- served over HTTP ---------------------------------------------------------------------------
PHOTOS = 5


@pytest.fixture(scope="module", params=["gru", "minilm"])
def imram_server(request, tmp_path_factory, shared_dir):
    """A random-weight IMRAM network (the official GRU text side, or the shipped model's MiniLM
    words; pooled heads, 1280-d grid regions) saved as a checkpoint, loaded back by the service
    from the path in its settings."""
    folder = tmp_path_factory.mktemp("imram")
    photos = coco_photos(shared_dir, PHOTOS)
    texts = [caption for _, captions in coco_photos(shared_dir, 239) for caption in captions]
    torch.manual_seed(0)
    spec = NetworkSpec(
        text_encoder=request.param,
        embed_size=32,
        pooled_dim=16,
        pooled_hidden=32,
        word_dim=16,
        scorer="imram",
        scorer_options={"iteration_steps": 2, "mode": "full"},
    )
    vocabulary = Vocabulary.build(texts, min_count=1) if request.param == "gru" else None
    network = RetrievalNetwork(spec, vocabulary=vocabulary)
    extractor = {"name": "grid", "config": {"fit": "squash"}, "version": ""}
    path = network.to_checkpoint({"version": "imram-test", "extractor": extractor}).save(
        folder / "imram.pt"
    )
    assert load_checkpoint(path).scorer == "imram"
    settings = make_settings(folder / "data", checkpoint=path, batch_max_wait_ms=20)
    app = create_app(settings, extractor=small_extractor())
    server = ServerThread(app, free_port()).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            ids = []
            for image, captions in photos:
                response = client.post(
                    "/v1/images",
                    files={"file": (image.name, image.read_bytes())},
                    data={"captions": captions[:2]},
                )
                assert response.status_code == 201, response.text
                ids.append(response.json()["id"])
            yield app, client, photos, ids
    finally:
        server.stop()


def test_an_imram_checkpoint_is_served_with_ranked_explained_results(imram_server):
    app, client, photos, ids = imram_server
    model = app.state.service.runtime.model
    assert isinstance(model.scorer, ImramPrecomputedScorer)
    on_minilm = isinstance(model.network.camp.text_encoder, ImramMiniLMWordEncoder)
    assert on_minilm == (model.network.spec.text_encoder == "minilm")
    query = photos[0][1][0]
    response = client.post("/v1/search/images", json={"text": query, "limit": 3, "explain": True})
    assert response.status_code == 200, response.text
    hits = response.json()["results"]
    assert len(hits) == 3
    scores = [hit["score"] for hit in hits]
    assert scores == sorted(scores, reverse=True)
    for hit in hits:
        explanation = hit["explanation"]
        regions = len(explanation["boxes"])
        assert len(explanation["word_region"]) == len(explanation["words"])
        for row in explanation["word_region"]:
            assert len(row) == regions and sum(row) == pytest.approx(1.0, abs=1e-4)
        # The regions' weights are the words' attention averaged over the words (the UI's heat
        # map when no word is chosen): a distribution over the regions.
        mean_attention = np.mean(explanation["word_region"], axis=0)
        assert explanation["region_pooling"] == pytest.approx(mean_attention.tolist(), abs=1e-6)
    # The served score is the model's fused IMRAM score of exactly that pair.
    runtime = app.state.service.runtime
    tensors = runtime.pipeline.tensors_of_images([hits[0]["id"]])[hits[0]["id"]]
    assert isinstance(tensors.precompute, ImramImagePrecompute)
    expected = model.rerank_pairs(
        tensors.precompute,
        model.encode_texts([query]).precompute,
        np.float32([hits[0]["shortlist_score"]]),
    )
    assert hits[0]["score"] == pytest.approx(float(expected[0]), abs=1e-5)
    # IMRAM's own score of the pair is a sum of 2K cosines.
    assert abs(hits[0]["explanation"]["camp_score"]) <= 4.0

    by_image = client.post(
        "/v1/search/captions", json={"image_id": ids[1], "limit": 2, "explain": True}
    )
    assert by_image.status_code == 200, by_image.text
    assert len(by_image.json()["results"]) == 2


def test_the_encoder_output_feeds_the_precompute_unchanged():
    """`words_from_features` of the IMRAM network is the l2-normalised bi-GRU output."""
    network = RetrievalNetwork(
        NetworkSpec(text_encoder="gru", embed_size=16, region_dim=8, word_dim=8, scorer="imram"),
        vocabulary=Vocabulary.build(["a cat on a mat"], min_count=1),
    )
    ids, lengths = torch.tensor([[1, 4, 5, 2]]), torch.tensor([4])
    with torch.no_grad():
        text: EncodedText = network.words_from_features(
            network.text_features(ids, lengths), lengths
        )
    torch.testing.assert_close(text.words.norm(dim=-1), torch.ones(1, 4))


def test_evaluate_ranks_a_precomputed_split_by_the_imported_imram_scores(tmp_path):
    """`camp-search evaluate` on an imported official IMRAM checkpoint: the exhaustive matrix
    is IMRAM's (float64 sums as the authors return them) and the metrics rank by it."""
    from model.eval.protocol import retrieval_metrics

    vocab, out = tmp_path / "vocab.json", tmp_path / "imram.pt"
    _vocabulary_json(vocab, 40)
    runner = CliRunner()
    checkpoint = str(IMRAM_DIR / "imram_dense_checkpoint.pth.tar")
    imported = runner.invoke(
        cli, ["import-checkpoint", checkpoint, "--vocab", str(vocab), "--out", str(out)]
    )
    assert imported.exit_code == 0, imported.output
    inputs = torch.load(IMRAM_DIR / "imram_dense_inputs.pt")
    # Two images, five captions each: the 7 captions of batch A and 3 of batch B, as text.
    rows = [
        row[1 : int(n) - 1].tolist()
        for batch in ("A", "B")
        for row, n in zip(inputs[f"{batch}_captions"], inputs[f"{batch}_lengths"], strict=True)
    ][:10]
    folder = tmp_path / "precomp"
    folder.mkdir()
    np.save(folder / "test_ims.npy", inputs["A_images"][:2].numpy())
    (folder / "test_caps.txt").write_text(
        "\n".join(" ".join(f"w{i}" for i in row) for row in rows) + "\n"
    )
    metrics_path, scores_path = tmp_path / "metrics.json", tmp_path / "scores.npz"
    result = runner.invoke(
        cli,
        [
            *("evaluate", "--data", str(folder), "--split", "test", "--checkpoint", str(out)),
            *("--modes", "exhaustive", "--device", "cpu"),
            *("--json", str(metrics_path), "--scores", str(scores_path)),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "IMRAM alone" in result.output
    # The direct form of the parity-checked model on the same inputs.
    model = load_checkpoint(out).build_model()
    padded = torch.zeros(10, max(len(r) for r in rows) + 2, dtype=torch.int64)
    for index, row in enumerate(rows):
        padded[index, : len(row) + 2] = torch.tensor([1, *row, 2])
    lengths = torch.tensor([len(r) + 2 for r in rows])
    with torch.no_grad():
        direct = model(inputs["A_images"][:2], padded, lengths).numpy()
    matrices = np.load(scores_path)
    np.testing.assert_allclose(matrices["camp_scores"], direct, atol=ATOL, rtol=0)
    metrics = json.loads(metrics_path.read_text())
    assert metrics["exhaustive"] == retrieval_metrics(direct.astype(np.float32))


def test_the_heads_recipe_trains_shortlist_heads_for_an_imported_imram(tmp_path):
    """The heads_imported preset on an imported IMRAM: the heads train, IMRAM stays as
    released and keeps its scorer record, and the result searches two-stage with IMRAM."""
    from model.eval.data import load_precomputed
    from model.eval.evaluate_model import evaluate_model
    from model.eval.protocol import retrieval_metrics

    fake = torch.load(PARITY_DIR / "camp_tiny_eval_fake_5N_rows.pt", weights_only=False)
    vocab, imported = tmp_path / "vocab.json", tmp_path / "imram.pt"
    Vocabulary(fake["vocab_words"]).save_json(vocab)
    runner = CliRunner()
    checkpoint = str(IMRAM_DIR / "imram_dense_checkpoint.pth.tar")
    result = runner.invoke(
        cli,
        [
            *("import-checkpoint", checkpoint, "--vocab", str(vocab), "--out", str(imported)),
            *("--extractor", "precomputed"),
        ],
    )
    assert result.exit_code == 0, result.output
    data = tmp_path / "precomp"
    data.mkdir()
    images = fake["image_feats"].numpy()  # 12 images of 36 x 64-d regions
    np.save(data / "train_ims.npy", np.repeat(images, 5, axis=0))
    np.save(data / "dev_ims.npy", images)
    for split in ("train", "dev"):
        (data / f"{split}_caps.txt").write_text("\n".join(fake["captions_txt"]) + "\n")
    preset = Path(__file__).resolve().parents[1] / "model" / "configs"
    config = json.loads((preset / "train_heads_imported.json").read_text())
    config["init"] = {"checkpoint": str(imported)}
    config["data"] = {**config["data"], "root": str(data)}
    config["network"] = {"pooled_dim": 8, "pooled_hidden": 16}
    config["pooled"] = {"epochs": 3, "batch_size": 16, "lr": 0.01}
    config["selection"] = {**config["selection"], "dev_images": 12, "k": 10}
    config["out"] = str(tmp_path / "run")
    (tmp_path / "heads.json").write_text(json.dumps(config))
    result = runner.invoke(cli, ["train", "--config", str(tmp_path / "heads.json")])
    assert result.exit_code == 0, result.output

    before, after = load_checkpoint(imported), load_checkpoint(tmp_path / "run" / "best.pt")
    assert (after.scorer, after.scorer_options) == (before.scorer, before.scorer_options)
    assert after.state_dict.keys() == before.state_dict.keys()
    for key, value in before.state_dict.items():
        assert torch.equal(after.state_dict[key], value), key
    model = RetrievalModel.load(tmp_path / "run" / "best.pt", device="cpu")
    assert model.network.heads is not None and isinstance(model.scorer, ImramPrecomputedScorer)
    dev = load_precomputed(data, "dev")
    metrics = evaluate_model(model, dev, modes=["pooled", "two_stage", "exhaustive"], ks=[5, 12])
    # Ranked by IMRAM alone: every pair scored gives the metrics of IMRAM's direct scores.
    captions = [model.tokenize([text])[0][0] for text in fake["captions_txt"]]
    padded = torch.zeros(len(captions), max(map(len, captions)), dtype=torch.int64)
    for row, ids in enumerate(captions):
        padded[row, : len(ids)] = torch.tensor(ids)
    lengths = torch.tensor([len(ids) for ids in captions])
    with torch.no_grad():
        direct = before.build_model()(torch.from_numpy(images), padded, lengths).numpy()
    assert metrics["exhaustive"] == retrieval_metrics(direct.astype(np.float32))
    assert metrics["two_stage"]["12"]["t2i"] == metrics["exhaustive"]["t2i"]


def _tiny_imram_service_model() -> RetrievalModel:
    """A small IMRAM `RetrievalModel` (random weights) whose fused score counts IMRAM's."""
    torch.manual_seed(0)
    texts = ["a dog runs on the grass", "two people", "a man rides a red bicycle", "a child"]
    spec = NetworkSpec(
        text_encoder="gru", embed_size=16, region_dim=12, word_dim=8, pooled_dim=8,
        pooled_hidden=16, scorer="imram",
    )  # fmt: skip
    network = RetrievalNetwork(spec, vocabulary=Vocabulary.build(texts, min_count=1))
    network.fusion.camp_weight.data.fill_(1.0)
    model = RetrievalModel(
        network, version="imram-tiny", extractor_name="grid", extractor_config={},
        device=torch.device("cpu"),
    )  # fmt: skip
    return model


def test_the_micro_batched_reranker_scores_imram_jobs_of_mixed_widths_as_each_pair_alone():
    from service.search.rerank import PairReranker, RerankJob

    model = _tiny_imram_service_model()
    rng = np.random.default_rng(3)
    images = [
        model.precompute_images(rng.random((1, count, 12), dtype=np.float32))
        for count in (3, 7, 1, 5)
    ]
    captions = [
        model.encode_texts([text]).precompute
        for text in ("a dog runs on the grass", "two people", "a man rides a red bicycle")
    ]
    text_job = RerankJob(
        images=tuple(images),
        captions=(captions[2],),
        shortlist_scores=np.linspace(0.1, 0.4, 4, dtype=np.float32),
    )
    image_job = RerankJob(
        images=(images[1],),
        captions=tuple(captions),
        shortlist_scores=np.float32([0.3, 0.2, 0.1]),
    )
    alone_text = [
        model.rerank_pairs(image, captions[2], text_job.shortlist_scores[k : k + 1])[0]
        for k, image in enumerate(images)
    ]
    alone_image = [
        model.rerank_pairs(images[1], caption, image_job.shortlist_scores[k : k + 1])[0]
        for k, caption in enumerate(captions)
    ]
    per_pair = max(text_job.bytes_per_pair(), image_job.bytes_per_pair())
    for budget in (2**40, 2 * per_pair, per_pair):  # one call, pairs of two, one pair a call
        scores = PairReranker(model, memory_budget_bytes=budget)([text_job, image_job])
        np.testing.assert_allclose(scores[0], alone_text, rtol=0, atol=1e-5)
        np.testing.assert_allclose(scores[1], alone_image, rtol=0, atol=1e-5)
    assert np.ptp(alone_text) > 1e-3, "scores should differ for this check to mean something"
    # Explanations of padded images cover only their own regions, one batched call for all.
    explanations = model.explain_pairs(ImramImagePrecompute.cat(images), captions[0])
    assert [len(e.word_region[0]) for e in explanations] == [3, 7, 1, 5]
    assert [len(e.region_pooling) for e in explanations] == [3, 7, 1, 5]
    for explanation, image in zip(explanations, images, strict=True):
        alone = model.explain_pair(image, captions[0])
        np.testing.assert_allclose(explanation.word_region, alone.word_region, atol=1e-6)
        assert explanation.camp_score == pytest.approx(alone.camp_score, abs=1e-5)

"""The evaluation protocol: hand-computed values, the official code's numbers, two-stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.eval.protocol import (
    average_metrics,
    fold_slices,
    i2t_ranks,
    recall_metrics,
    retrieval_metrics,
    shortlist,
    shortlist_recall,
    t2i_ranks,
    two_stage_metrics,
)


def _hand_matrix() -> np.ndarray:
    """2 images x 10 captions with ranks worked out by hand (see the test below)."""
    s = np.zeros((2, 10))
    # Image 0: its captions 0..4 score 0.1..0.5; caption 7 (image 1's) scores 0.9 -> best own
    # caption (0.5) is beaten by 0.9 only: i2t rank 1.
    s[0, :5] = [0.1, 0.2, 0.3, 0.4, 0.5]
    s[0, 5:] = [0.0, 0.0, 0.9, 0.0, 0.0]
    # Image 1: own caption 9 scores 1.0, the best of the row: i2t rank 0.
    s[1, :5] = [0.3, 0.1, 0.1, 0.1, 0.6]
    s[1, 5:] = [0.2, 0.2, 0.2, 0.2, 1.0]
    return s


def test_ranks_on_a_hand_made_matrix():
    s = _hand_matrix()
    assert i2t_ranks(s).tolist() == [1, 0]
    # t2i: caption j's image among 2 images. Captions 0 (0.1 vs 0.3), 4 (0.5 vs 0.6) lose to
    # image 1; captions 1-3 win; captions 5-8 lose (0 vs 0.2, 0.9 vs 0.2 for caption 7 wins?
    # no: caption 7 belongs to image 1, which scores 0.2 < 0.9 -> rank 1); caption 9 wins.
    assert t2i_ranks(s).tolist() == [1, 0, 0, 0, 1, 0, 0, 1, 0, 0]


def test_metrics_on_a_hand_made_matrix():
    m = retrieval_metrics(_hand_matrix())
    assert m["i2t"] == {"r1": 50.0, "r5": 100.0, "r10": 100.0, "medr": 1.0, "meanr": 1.5}
    assert m["t2i"] == {"r1": 70.0, "r5": 100.0, "r10": 100.0, "medr": 1.0, "meanr": 1.3}
    assert m["rsum"] == pytest.approx(50 + 100 + 100 + 70 + 100 + 100)


def test_recall_metrics_medr_and_meanr_follow_the_official_definition():
    ranks = np.array([0, 1, 2, 9, 10, 30])  # 0-based
    m = recall_metrics(ranks)
    assert m["r1"] == pytest.approx(100 / 6)
    assert m["r5"] == pytest.approx(50.0)
    assert m["r10"] == pytest.approx(400 / 6)
    assert m["medr"] == np.floor(np.median(ranks)) + 1 == 6.0
    assert m["meanr"] == pytest.approx(ranks.mean() + 1)


def test_equals_the_official_evaluation_printout(shared_dir):
    """The official encode_data + i2t/t2i on a fake 12-image split (tiny weights)."""
    payload = torch.load(
        shared_dir / "parity" / "camp_tiny_eval_fake_5N_rows.pt", weights_only=False
    )
    summary = json.loads((shared_dir / "parity" / "camp_tiny_eval_fake_summary.json").read_text())
    printed = summary["5N_rows"]
    scores = payload["score_matrix_caps_x_imgs"].numpy().T  # images x captions
    m = retrieval_metrics(scores)
    for direction in ("i2t", "t2i"):
        got = [m[direction][k] for k in ("r1", "r5", "r10", "medr", "meanr")]
        np.testing.assert_allclose(got, printed[direction], rtol=1e-12)
    assert m["rsum"] == pytest.approx(printed["rsum"])


def test_equals_the_official_evaluation_with_the_imported_tiny_weights(shared_dir):
    """Score the fake split ourselves with the official tiny checkpoint -> same printout."""
    from model.architecture.precompute import PrecomputedScorer
    from model.checkpoints.checkpoint import import_official_checkpoint
    from model.text.vocab import Vocabulary

    parity = shared_dir / "parity"
    payload = torch.load(parity / "camp_tiny_eval_fake_5N_rows.pt", weights_only=False)
    printed = json.loads((parity / "camp_tiny_eval_fake_summary.json").read_text())["5N_rows"]
    vocabulary = Vocabulary(payload["vocab_words"])
    model = import_official_checkpoint(
        parity / "camp_tiny_checkpoint.pth.tar", vocabulary=vocabulary
    ).build_model()
    ids = [vocabulary.encode(c) for c in payload["captions_txt"]]
    lengths = torch.tensor([len(i) for i in ids])
    padded = torch.zeros(len(ids), int(lengths.max()), dtype=torch.int64)
    for row, caption in enumerate(ids):
        padded[row, : len(caption)] = torch.tensor(caption)
    scorer = PrecomputedScorer(model.scorer)
    with torch.no_grad():
        images = scorer.precompute_images(model.encode_images(payload["image_feats"].float()))
        captions = scorer.precompute_captions(model.encode_text(padded, lengths))
        scores = scorer.score_grid(images, captions).double().numpy()
    np.testing.assert_allclose(scores, payload["score_matrix_caps_x_imgs"].numpy().T, atol=1e-5)
    m = retrieval_metrics(scores)
    np.testing.assert_allclose(
        [m["t2i"][k] for k in ("r1", "r5", "r10", "medr", "meanr")], printed["t2i"], rtol=1e-9
    )
    np.testing.assert_allclose(
        [m["i2t"][k] for k in ("r1", "r5", "r10", "medr", "meanr")], printed["i2t"], rtol=1e-9
    )


def test_shortlist_and_recall():
    s = _hand_matrix()
    assert shortlist(s, 2, axis=1).tolist() == [[7, 4], [9, 4]]
    assert shortlist(s, 1, axis=0)[:, 0].tolist() == [1, 0, 0, 0, 1, 1, 1, 0, 1, 1]
    recall = shortlist_recall(s, ks=(1, 2))
    assert recall["i2t"] == {"1": 50.0, "2": 100.0}
    assert recall["t2i"] == {"1": 70.0, "2": 100.0}


def test_two_stage_with_an_oracle_reranker_fixes_everything_inside_k():
    rng = np.random.default_rng(0)
    pooled = rng.standard_normal((20, 100))

    def oracle(images, captions):
        return (captions // 5 == images).astype(np.float32)

    result = two_stage_metrics(pooled, oracle, ks=(5, 100))
    recall = shortlist_recall(pooled, ks=(5,))
    # At K = 5 the oracle puts the ground truth first exactly when the shortlist holds it.
    assert result["5"]["t2i"]["r1"] == pytest.approx(recall["t2i"]["5"])
    assert result["5"]["i2t"]["r1"] == pytest.approx(recall["i2t"]["5"])
    assert result["100"]["t2i"]["r1"] == 100.0 and result["100"]["i2t"]["r1"] == 100.0


def test_two_stage_with_the_pooled_score_changes_nothing():
    rng = np.random.default_rng(1)
    pooled = rng.standard_normal((30, 150))
    result = two_stage_metrics(pooled, lambda i, c: pooled[i, c], ks=(10, 50))
    for k in ("10", "50"):
        assert result[k] == retrieval_metrics(pooled)


def test_two_stage_keeps_the_pooled_order_outside_k():
    """An adversarial reranker only reorders the top K; ranks beyond K stay pooled."""
    rng = np.random.default_rng(2)
    pooled = rng.standard_normal((20, 100))
    result = two_stage_metrics(pooled, lambda i, c: -pooled[i, c], ks=(3,))
    t2i = t2i_ranks(pooled)
    outside = t2i >= 3
    assert result["3"]["t2i"]["r10"] == pytest.approx(100 * (t2i < 10).mean())
    assert outside.any()


def test_coco_folds_and_average():
    assert fold_slices(5000) == [slice(i, i + 1000) for i in range(0, 5000, 1000)]
    a = {"i2t": {"r1": 10.0}, "t2i": {"r1": 20.0}, "rsum": 30.0}
    b = {"i2t": {"r1": 30.0}, "t2i": {"r1": 40.0}, "rsum": 70.0}
    assert average_metrics([a, b]) == {"i2t": {"r1": 20.0}, "t2i": {"r1": 30.0}, "rsum": 50.0}


def test_refuses_a_matrix_that_is_not_n_by_5n():
    with pytest.raises(ValueError, match="5N"):
        retrieval_metrics(np.zeros((3, 10)))


@pytest.fixture
def fake_precomputed(shared_dir, tmp_path):
    """The official fake split written in the precomputed layout (one row per image)."""
    payload = torch.load(
        shared_dir / "parity" / "camp_tiny_eval_fake_5N_rows.pt", weights_only=False
    )
    folder = tmp_path / "precomp"
    folder.mkdir()
    np.save(folder / "test_ims.npy", payload["image_feats"].numpy())
    (folder / "test_caps.txt").write_text("\n".join(payload["captions_txt"]) + "\n")
    return folder, payload


def test_official_checkpoint_evaluates_to_the_official_numbers(shared_dir, fake_precomputed):
    """Imported official weights + vocabulary through RetrievalModel and evaluate_model."""
    from model.checkpoints.checkpoint import import_official_checkpoint
    from model.eval.data import load_precomputed
    from model.eval.evaluate_model import evaluate_model
    from model.retrieval import RetrievalModel
    from model.text.vocab import Vocabulary

    folder, payload = fake_precomputed
    printed = json.loads((shared_dir / "parity" / "camp_tiny_eval_fake_summary.json").read_text())[
        "5N_rows"
    ]
    checkpoint = import_official_checkpoint(
        shared_dir / "parity" / "camp_tiny_checkpoint.pth.tar",
        vocabulary=Vocabulary(payload["vocab_words"]),
    )
    model = RetrievalModel.from_checkpoint(checkpoint, device="cpu")
    result = evaluate_model(model, load_precomputed(folder, "test"), modes=["exhaustive"])
    for direction in ("i2t", "t2i"):
        got = [result["exhaustive"][direction][k] for k in ("r1", "r5", "r10", "medr", "meanr")]
        np.testing.assert_allclose(got, printed[direction], rtol=1e-9)


def test_evaluate_command_writes_the_issue_json(fake_precomputed, tmp_path):
    from typer.testing import CliRunner

    from model.architecture.network import NetworkSpec, RetrievalNetwork
    from model.text.vocab import Vocabulary
    from service.cli.main import app

    folder, payload = fake_precomputed
    torch.manual_seed(0)
    spec = NetworkSpec(
        text_encoder="gru", embed_size=16, region_dim=64, pooled_dim=8, pooled_hidden=16, word_dim=8
    )
    network = RetrievalNetwork(spec, vocabulary=Vocabulary(payload["vocab_words"]))
    checkpoint = network.to_checkpoint({"version": "cli-test"}).save(tmp_path / "m.pt")
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--data",
            str(folder),
            "--split",
            "test",
            "--checkpoint",
            str(checkpoint),
            "--json",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert set(metrics) == {
        "pooled",
        "exhaustive",
        "two_stage",
        "camp_alone",
        "shortlist_recall",
        "timings_s",
    }
    assert set(metrics["two_stage"]) == set(metrics["camp_alone"]["two_stage"])
    assert set(metrics["two_stage"]) == {"10", "50", "100", "200"}
    for m in [metrics["pooled"], metrics["exhaustive"], *metrics["two_stage"].values()]:
        assert set(m) == {"i2t", "t2i", "rsum"}
        assert set(m["i2t"]) == set(m["t2i"]) == {"r1", "r5", "r10", "medr", "meanr"}
    assert set(metrics["shortlist_recall"]["t2i"]) == {"10", "50", "100", "200"}
    # 12 images: K >= 12 reranks everything, so two-stage equals exhaustive.
    assert metrics["two_stage"]["50"] == metrics["exhaustive"]
    assert metrics["shortlist_recall"]["t2i"]["50"] == 100.0
    # CAMP alone: the untrained fusion ranks by the shortlist score only, so CAMP's own ranking
    # must come from its logits, computed here directly on every pair.
    from model.architecture.precompute import CaptionPrecompute
    from model.eval.data import load_precomputed
    from model.retrieval import RetrievalModel

    model = RetrievalModel.load(checkpoint, device="cpu")
    split = load_precomputed(folder, "test")
    images = model.precompute_images(np.asarray(split.images))
    captions = model.encode_texts(split.captions).precompute
    n, m = len(images), len(captions)
    logits = model.camp_logits(
        images.select([i for i in range(n) for _ in range(m)]),
        CaptionPrecompute.cat([captions.select([c]) for _ in range(n) for c in range(m)]),
    )
    expected = retrieval_metrics(logits.reshape(n, m).numpy())
    assert metrics["camp_alone"]["exhaustive"] == expected
    # K >= 60 captions: both directions rerank everything.
    assert metrics["camp_alone"]["two_stage"]["100"] == metrics["camp_alone"]["exhaustive"]
    assert metrics["camp_alone"]["exhaustive"] != metrics["exhaustive"]


def test_evaluate_command_refuses_a_split_that_does_not_exist(tmp_path):
    from typer.testing import CliRunner

    from service.cli.main import app

    result = CliRunner().invoke(app, ["evaluate", "--data", str(tmp_path), "--split", "nope"])
    assert result.exit_code == 2
    assert "nope_ims.npy not found" in " ".join(result.output.split())

"""`camp-search import-checkpoint` and `evaluate` on an official CAMP release: the tiny official
checkpoint with its 40-word vocabulary in both released forms, the extractor it is paired with,
clear refusals of wrong files, and the official evaluation reproduced from the command line."""

from __future__ import annotations

import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_paths import PARITY_DIR
from typer.testing import CliRunner

from model.retrieval import RetrievalModel
from service.cli.main import app

OFFICIAL = PARITY_DIR / "camp_tiny_checkpoint.pth.tar"
FAKE_SPLIT = PARITY_DIR / "camp_tiny_eval_fake_5N_rows.pt"
FAKE_SUMMARY = PARITY_DIR / "camp_tiny_eval_fake_summary.json"
METRIC_KEYS = ("r1", "r5", "r10", "medr", "meanr")


@pytest.fixture(scope="module")
def fake_split() -> dict:
    return torch.load(FAKE_SPLIT, weights_only=False)


@pytest.fixture(scope="module")
def words(fake_split) -> list[str]:
    """The tiny model's 40 words: the reserved four, then w4..w39."""
    words = list(fake_split["vocab_words"])
    assert len(words) == 40 and words[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    return words


def _official_pickle(words: list[str], path, monkeypatch) -> None:
    """A `vocab.Vocabulary` pickle as the authors' `vocab.py` writes it (their class layout)."""
    module = types.ModuleType("vocab")

    class Vocabulary:
        def __init__(self) -> None:
            self.word2idx, self.idx2word, self.idx = {}, {}, 0

        def add_word(self, word: str) -> None:
            self.word2idx[word] = self.idx
            self.idx2word[self.idx] = word
            self.idx += 1

    Vocabulary.__module__, Vocabulary.__qualname__ = "vocab", "Vocabulary"
    module.Vocabulary = Vocabulary
    monkeypatch.setitem(sys.modules, "vocab", module)
    vocabulary = Vocabulary()
    for word in words:
        vocabulary.add_word(word)
    path.write_bytes(pickle.dumps(vocabulary, protocol=2))
    monkeypatch.delitem(sys.modules, "vocab")  # the importer must not need the authors' code


def _scan_json(words: list[str], path) -> None:
    path.write_text(
        json.dumps(
            {
                "word2idx": {w: i for i, w in enumerate(words)},
                "idx2word": {str(i): w for i, w in enumerate(words)},
                "idx": len(words),
            }
        )
    )


@pytest.fixture(params=["official_pickle", "scan_json"])
def vocab_file(request, words, tmp_path, monkeypatch):
    if request.param == "official_pickle":
        path = tmp_path / "f30k_precomp_vocab.pkl"
        _official_pickle(words, path, monkeypatch)
    else:
        path = tmp_path / "f30k_precomp_vocab.json"
        _scan_json(words, path)
    return path


def _invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def _import(checkpoint, vocab, out, *extra: object):
    return _invoke("import-checkpoint", checkpoint, "--vocab", vocab, "--out", out, *extra)


def _camp_scores(model: RetrievalModel, images: torch.Tensor, captions, lengths) -> np.ndarray:
    """Sigmoid CAMP scores [Ni, Nc] through the service's path: per-item precomputes, then the
    pairs, as a search reranks them."""
    ids = [row[: int(n)].tolist() for row, n in zip(captions, lengths, strict=True)]
    features, token_lengths = model.text_features(ids)
    with torch.inference_mode():
        words = model.network.words_from_features(features, token_lengths)
        caption_tensors = model.scorer.precompute_captions(words)
        logits = model.scorer.score_grid(model.precompute_images(images.numpy()), caption_tensors)
    return torch.sigmoid(logits).numpy()


def test_imports_the_official_checkpoint_with_either_vocabulary_and_scores_as_the_authors(
    vocab_file, words, tmp_path
):
    out = tmp_path / "camp_tiny.pt"
    result = _import(OFFICIAL, vocab_file, out, "--extractor", "precomputed")
    assert result.exit_code == 0, result.output
    raw = torch.load(out, weights_only=True)  # our format: no pickled code
    assert raw["vocabulary"] == {"words": words}
    assert raw["metadata"]["extractor"] == {"name": "precomputed", "config": {}, "version": ""}
    assert raw["metadata"]["version"] == "official-camp_tiny_checkpoint"
    assert "pooled_heads" not in raw["extras"]

    model = RetrievalModel.load(out, device="cpu")
    assert model.network.heads is None and model.region_dim == 64
    inputs = torch.load(PARITY_DIR / "camp_tiny_inputs.pt")
    outputs = torch.load(PARITY_DIR / "camp_tiny_outputs.pt")
    for batch in ("A", "B"):
        got = _camp_scores(
            model,
            inputs[f"{batch}_images"],
            inputs[f"{batch}_captions"],
            inputs[f"{batch}_lengths"],
        )
        np.testing.assert_allclose(got, outputs[f"{batch}_scores"].numpy(), atol=1e-5, rtol=0)
    # The vocabulary travelled too: a caption in words encodes to the ids the authors used.
    caption = inputs["A_captions"][6, : int(inputs["A_lengths"][6])].tolist()
    text = " ".join(words[i] for i in caption[1:-1])
    assert model.tokenize([text])[0][0] == caption


def _official_2048(tmp_path) -> Path:
    """The official layout at the released region width: the tiny checkpoint with a 2048-d image
    projection (what every released CAMP model reads from bottom-up-attention regions)."""
    payload = torch.load(OFFICIAL)
    image_part = dict(payload["model"][0])
    image_part["module.fc.weight"] = torch.randn(
        32, 2048, generator=torch.Generator().manual_seed(0)
    )
    path = tmp_path / "camp_butd.pth.tar"
    opt = {**payload["opt"], "img_dim": 2048}
    torch.save({**payload, "model": [image_part, *payload["model"][1:]], "opt": opt}, path)
    return path


def test_a_2048d_release_is_paired_with_the_detectron2_extractor(words, tmp_path):
    from service.runtime.lifecycle import build_extractor
    from service.runtime.settings import Settings

    vocab = tmp_path / "vocab.json"
    _scan_json(words, vocab)
    official = _official_2048(tmp_path)
    out = tmp_path / "camp_butd.pt"
    result = _import(official, vocab, out)  # no --extractor: chosen by the weights' width
    assert result.exit_code == 0, result.output
    model = RetrievalModel.load(out, device="cpu")
    assert (model.extractor_name, model.region_dim) == ("detectron2", 2048)
    assert model.extractor_config == {
        "min_boxes": 36,
        "max_boxes": 36,
        "confidence_threshold": 0.2,
        "nms_threshold": 0.3,
    }
    assert set(model.metadata["extractor"]) == {"name", "config", "version"}
    # Every key is one the extractor's from_config takes today.
    from model.vision.extractors.detectron2 import Detectron2Extractor

    assert set(model.extractor_config) <= set(Detectron2Extractor.CONFIG_KEYS)
    # The service refuses to pair it with the 1280-d grid extractor.
    with pytest.raises(ValueError, match="'detectron2' regions"):
        build_extractor(Settings(extractor="grid"), model)

    adaptive = tmp_path / "camp_butd_adaptive.pt"
    files = ("--detectron2-config", "/models/vg.yaml", "--detectron2-weights", "/models/vg.pkl")
    result = _import(official, vocab, adaptive, "--min-boxes", 10, "--max-boxes", 100, *files)
    assert result.exit_code == 0, result.output
    config = RetrievalModel.load(adaptive, device="cpu").extractor_config
    assert (config["min_boxes"], config["max_boxes"]) == (10, 100)
    assert (config["config_file"], config["weights"]) == ("/models/vg.yaml", "/models/vg.pkl")
    result = _import(official, vocab, adaptive, "--min-boxes", 50, "--max-boxes", 10)
    assert result.exit_code == 2 and "need 1 <= min_boxes <= max_boxes" in result.output


def test_an_extractor_that_does_not_fit_the_weights_is_refused(words, tmp_path):
    vocab = tmp_path / "vocab.json"
    _scan_json(words, vocab)
    out = tmp_path / "m.pt"
    for extractor, width in (("detectron2", 2048), ("grid", 1280)):
        result = _import(OFFICIAL, vocab, out, "--extractor", extractor)
        assert result.exit_code == 2
        message = " ".join(result.output.split())
        assert f"reads 64-d regions but the '{extractor}' extractor makes {width}-d" in message
        assert "--extractor precomputed" in message
        assert not out.exists()
    result = _import(_official_2048(tmp_path), vocab, out, "--extractor", "grid")
    assert result.exit_code == 2 and "use --extractor detectron2" in " ".join(result.output.split())
    result = _import(OFFICIAL, vocab, out, "--extractor", "clip")
    assert result.exit_code == 2 and "unknown extractor 'clip'" in result.output


def _write_bad_inputs(kind: str, words: list[str], tmp_path) -> tuple:
    """(checkpoint, vocabulary) with one thing wrong, named by `kind`."""
    good_vocab = tmp_path / "vocab.json"
    _scan_json(words, good_vocab)
    payload = torch.load(OFFICIAL)
    path = tmp_path / "official.pth.tar"
    if kind == "not_a_checkpoint":
        path.write_text("this is a README, not a checkpoint\n")
    elif kind == "wrong_layout":
        torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, path)
    elif kind == "missing_keys":
        sim = dict(payload["model"][2])
        del sim["module.fc_out.3.weight"]
        torch.save({**payload, "model": [payload["model"][0], payload["model"][1], sim]}, path)
    elif kind == "missing_file":
        path = tmp_path / "nowhere.pth.tar"
    else:
        torch.save(payload, path)
    vocab = tmp_path / "bad_vocab"
    if kind == "vocab_size_mismatch":
        _scan_json(words[:30], vocab)
    elif kind == "vocab_garbage":
        vocab.write_bytes(b"\x00\x01 not a vocabulary \xff\xfe")
    elif kind == "vocab_bad_json":
        vocab.write_text('{"word2idx": {"<pad>": 0, "<start>": 1,')
    elif kind == "vocab_inconsistent":
        data = json.loads(good_vocab.read_text())
        data["idx2word"]["5"] = "zebra"
        vocab.write_text(json.dumps(data))
    elif kind == "vocab_missing":
        vocab = tmp_path / "no_vocab.pkl"
    else:
        vocab = good_vocab
    return path, vocab


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("not_a_checkpoint", "could not be read as a torch file"),
        ("wrong_layout", "is not a CAMP checkpoint: expected {'model': [img_enc, txt_enc, sim]"),
        ("missing_keys", "missing keys ['scorer.score_out.weight']"),
        ("missing_file", "checkpoint file"),
        ("vocab_size_mismatch", "vocabulary has 30 words but the checkpoint embeds 40"),
        ("vocab_garbage", "neither a JSON vocabulary nor a readable vocabulary pickle"),
        ("vocab_bad_json", "is not valid JSON"),
        ("vocab_inconsistent", "idx2word disagrees with word2idx"),
        ("vocab_missing", "vocabulary file"),
    ],
)
def test_a_wrong_file_gets_an_error_naming_what_is_wrong(kind, expected, words, tmp_path):
    checkpoint, vocab = _write_bad_inputs(kind, words, tmp_path)
    out = tmp_path / "out.pt"
    result = _import(checkpoint, vocab, out, "--extractor", "precomputed")
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert "Traceback" not in result.output
    assert expected in " ".join(result.output.split())
    assert not out.exists()


def test_a_malicious_vocabulary_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "vocab.pkl"
    evil.write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    result = _import(OFFICIAL, evil, tmp_path / "out.pt")
    assert result.exit_code == 2
    assert "refusing to load os.system" in " ".join(result.output.split())
    assert not marker.exists()


# -- the official evaluation, from the command line ----------------------------------------------
@pytest.fixture
def imported_tiny(words, tmp_path) -> Path:
    vocab = tmp_path / "vocab.json"
    _scan_json(words, vocab)
    out = tmp_path / "camp_tiny.pt"
    result = _import(OFFICIAL, vocab, out, "--extractor", "precomputed")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("rows", ["5N", "N"])
def test_evaluate_reproduces_the_official_evaluation(rows, imported_tiny, fake_split, tmp_path):
    """The fake 12-image split in the released layout (`test_ims.npy` with each image repeated
    five times) and in ours (one row per image) -> the official printout and score matrix."""
    folder = tmp_path / f"precomp_{rows}"
    folder.mkdir()
    images = fake_split["image_feats"].numpy()
    np.save(folder / "test_ims.npy", np.repeat(images, 5, axis=0) if rows == "5N" else images)
    (folder / "test_caps.txt").write_text("\n".join(fake_split["captions_txt"]) + "\n")
    metrics_path, scores_path = tmp_path / "metrics.json", tmp_path / "scores.npz"
    result = _invoke(
        "evaluate",
        "--data",
        folder,
        "--split",
        "test",
        "--checkpoint",
        imported_tiny,
        "--modes",
        "exhaustive",
        "--device",
        "cpu",
        "--json",
        metrics_path,
        "--scores",
        scores_path,
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(FAKE_SUMMARY.read_text())["5N_rows"]
    metrics = json.loads(metrics_path.read_text())
    exhaustive = metrics["exhaustive"]
    for direction in ("i2t", "t2i"):
        got = [exhaustive[direction][k] for k in METRIC_KEYS]
        np.testing.assert_allclose(got, printed[direction], rtol=1e-12, atol=0)
    assert exhaustive["rsum"] == pytest.approx(printed["rsum"], rel=1e-12)
    # Without shortlist heads the product ranks by CAMP alone.
    assert exhaustive == metrics["camp_alone"]["exhaustive"]
    matrices = np.load(scores_path)
    official = fake_split["score_matrix_caps_x_imgs"].numpy().T  # images x captions
    assert matrices["camp_scores"].shape == official.shape == (12, 60)
    np.testing.assert_allclose(matrices["camp_scores"], official, atol=1e-5, rtol=0)


def test_evaluate_refuses_a_manifest_for_a_precomputed_only_model(imported_tiny, tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"image": "a.jpg", "captions": ["a dog"]}) + "\n")
    result = _invoke(
        "evaluate", "--data", manifest, "--split", "test", "--checkpoint", imported_tiny,
        "--modes", "exhaustive", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "imported for precomputed features" in " ".join(result.output.split())


def test_pair_chunks_shrink_to_the_memory_budget_and_score_the_same(
    imported_tiny, fake_split, monkeypatch
):
    """At the paper's size a pair needs ~2 MiB, so the exhaustive pass scores fewer pairs per
    call; the scores must not depend on the chunking."""
    import model.eval.evaluate_model as evaluate_module
    from model.architecture.precompute import PrecomputedScorer
    from model.eval.data import RetrievalSplit

    model = RetrievalModel.load(imported_tiny, device="cpu")
    split = RetrievalSplit(
        "test", fake_split["image_feats"].numpy(), list(fake_split["captions_txt"]),
        [str(i) for i in range(12)],
    )  # fmt: skip

    def run() -> tuple[dict, dict, list[int]]:
        """(metrics, score matrices, pairs per reranker call)"""
        calls: list[int] = []
        matrices: dict = {}
        metrics = evaluate_module.evaluate_model(
            model, split, modes=["exhaustive"], on_pairs=calls.append, on_scores=matrices.update
        )
        return metrics, matrices, calls

    whole, whole_scores, whole_calls = run()
    assert whole_calls == [720]  # 12 x 60 pairs fit one call at the tiny size
    encoded = evaluate_module.EncodedSplit(model, split)
    longest = max(encoded.captions, key=lambda c: c.words.shape[1])
    per_pair = PrecomputedScorer.bytes_per_pair(encoded.images, longest)
    monkeypatch.setattr(evaluate_module, "PAIR_MEMORY_BYTES", 7 * per_pair + 1)
    chunked, chunked_scores, chunked_calls = run()
    assert max(chunked_calls) == 7 and sum(chunked_calls) == 720
    assert chunked["exhaustive"] == whole["exhaustive"]
    np.testing.assert_allclose(chunked_scores["camp"], whole_scores["camp"], atol=1e-6, rtol=0)


def test_an_imported_model_evaluates_in_every_mode(imported_tiny, fake_split, tmp_path):
    """Without heads the shortlist is the mean of CAMP's own encoder outputs; two-stage reranks
    it by CAMP alone, so with every image in the shortlist t2i is the official ranking."""
    folder = tmp_path / "precomp"
    folder.mkdir()
    np.save(folder / "test_ims.npy", fake_split["image_feats"].numpy())
    (folder / "test_caps.txt").write_text("\n".join(fake_split["captions_txt"]) + "\n")
    out = tmp_path / "metrics.json"
    result = _invoke(
        "evaluate", "--data", folder, "--split", "test", "--checkpoint", imported_tiny,
        "--device", "cpu", "--ks", "5,12", "--json", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert {"pooled", "two_stage", "exhaustive", "shortlist_recall"} <= set(metrics)
    assert metrics["two_stage"]["12"]["t2i"] == metrics["exhaustive"]["t2i"]
    assert metrics["two_stage"]["5"] == metrics["camp_alone"]["two_stage"]["5"]

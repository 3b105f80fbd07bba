"""Precomputed splits whose images have different region counts (padded to the most, counts in
`{split}_region_counts.npy`): they load in both layouts, evaluate as if every image were scored
with only its own regions, and their training means leave the padding out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.architecture.encoders import pad_token_ids
from model.architecture.network import NetworkSpec, RetrievalNetwork
from model.eval.data import DataError, load_precomputed
from model.eval.evaluate_model import EncodedSplit
from model.retrieval import RetrievalModel
from model.text.vocab import Vocabulary
from model.training.features import region_means
from model.training.official import batch_logits

PADDING_VALUE = 3.0  # what padded rows hold on disk: masks must make it irrelevant


@pytest.fixture(scope="module")
def padded_split(shared_dir):
    """The official evaluation's fake split (12 images [36, 64], 60 captions) with each image
    cut to its own count of regions and padded back to 36 with a constant."""
    payload = torch.load(
        shared_dir / "parity" / "camp_tiny_eval_fake_5N_rows.pt", weights_only=False
    )
    images = payload["image_feats"].numpy().copy()
    counts = np.array([36, 5, 17, 1, 36, 9, 28, 12, 3, 33, 20, 7], dtype=np.int64)
    for row, count in enumerate(counts):
        images[row, count:] = PADDING_VALUE
    return images, counts, list(payload["captions_txt"]), payload["vocab_words"]


def _write(folder, images, captions, counts=None, split="test"):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}_ims.npy", images)
    (folder / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
    if counts is not None:
        np.save(folder / f"{split}_region_counts.npy", counts)
    return folder


def test_region_counts_load_in_both_layouts_and_follow_subsets(tmp_path, padded_split) -> None:
    images, counts, captions, _ = padded_split
    n_rows = load_precomputed(_write(tmp_path / "n", images, captions, counts), "test")
    five_n = load_precomputed(
        _write(tmp_path / "5n", np.repeat(images, 5, 0), captions, np.repeat(counts, 5)), "test"
    )
    for split in (n_rows, five_n):
        np.testing.assert_array_equal(split.region_counts, counts)
        np.testing.assert_array_equal(np.asarray(split.images), images)
    assert split.subset(np.array([3, 1])).region_counts.tolist() == [1, 5]
    plain = load_precomputed(_write(tmp_path / "plain", images, captions), "test")
    assert plain.region_counts is None and plain.subset(slice(0, 2)).region_counts is None


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        (np.ones(11, dtype=np.int64), r"one region count per row of the features \(12\)"),
        (np.full(12, 37, dtype=np.int64), r"must lie in \[1, 36\].*37\.\.37"),
        (np.zeros(12, dtype=np.int64), r"must lie in \[1, 36\]"),
        (np.full(12, 2.0), "must hold integers"),
    ],
)
def test_wrong_region_counts_are_refused_with_the_file_named(
    tmp_path, padded_split, counts, message
) -> None:
    images, _, captions, _ = padded_split
    folder = _write(tmp_path, images, captions, counts)
    with pytest.raises(DataError, match=message) as caught:
        load_precomputed(folder, "test")
    assert "test_region_counts.npy" in str(caught.value)


@pytest.fixture(scope="module")
def model(padded_split) -> RetrievalModel:
    torch.manual_seed(0)
    spec = NetworkSpec(
        text_encoder="gru", embed_size=16, region_dim=64, pooled_dim=8, pooled_hidden=16, word_dim=8
    )
    network = RetrievalNetwork(spec, vocabulary=Vocabulary(padded_split[3]))
    with torch.no_grad():  # untrained fusion ranks by the shortlist alone: give CAMP a say
        network.fusion.camp_weight.fill_(1.0)
    return RetrievalModel(
        network,
        version="padded-test",
        extractor_name="grid",
        extractor_config={},
        device=torch.device("cpu"),
    )


def test_a_padded_split_evaluates_as_each_image_scored_alone(tmp_path, padded_split, model) -> None:
    images, counts, captions, _ = padded_split
    split = load_precomputed(_write(tmp_path, images, captions, counts), "test")
    encoded = EncodedSplit(model, split)
    n, m = split.num_images, len(captions)
    image_index, caption_index = np.repeat(np.arange(n), m), np.tile(np.arange(m), n)
    pooled, _ = encoded.subset(slice(0, n))
    got = encoded.score_pairs(image_index, caption_index, pooled[image_index, caption_index])

    alone_vectors = np.concatenate(
        [model.pooled_images(images[i : i + 1, : counts[i]]) for i in range(n)]
    )
    np.testing.assert_allclose(encoded.image_vectors, alone_vectors, rtol=0, atol=1e-6)
    texts = model.encode_texts(captions)
    expected = np.concatenate(
        [
            model.camp_logits(
                model.precompute_images(images[i : i + 1, : counts[i]]).repeat(m),
                texts.precompute,
            ).numpy()
            for i in range(n)
        ]
    )
    np.testing.assert_allclose(got["camp"], expected, rtol=0, atol=1e-5)
    assert np.ptp(expected) > 0.01

    # Without the counts the padding is read as regions, and the scores move.
    unmasked = EncodedSplit(
        model, load_precomputed(_write(tmp_path / "u", images, captions), "test")
    )
    moved = unmasked.score_pairs(image_index, caption_index, pooled[image_index, caption_index])
    assert np.abs(moved["camp"] - expected).max() > 1e-3


def test_training_region_means_leave_the_padding_out(padded_split) -> None:
    images, counts, _, _ = padded_split
    means = region_means(images, counts).numpy()
    expected = np.stack([images[i, : counts[i]].astype(np.float32).mean(0) for i in range(12)])
    np.testing.assert_allclose(means, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(region_means(images).numpy(), images.mean(1, dtype=np.float32))


def test_training_logits_of_a_padded_batch_are_each_image_alone_and_padding_gets_no_gradient(
    padded_split, model
) -> None:
    """The official recipe's differentiable B x B logits (`batch_logits`) with region counts."""
    images, counts, captions, _ = padded_split
    camp = model.network.camp
    token_ids = [model.tokenize([text])[0][0] for text in captions[:6]]
    ids, lengths = pad_token_ids(token_ids)
    regions = torch.from_numpy(images[:6]).float().requires_grad_(True)
    got = batch_logits(camp, regions, ids, lengths, 4, torch.from_numpy(counts[:6]))
    with torch.no_grad():
        expected = torch.cat(
            [
                batch_logits(camp, regions[i : i + 1, : counts[i]], ids, lengths, 36)
                for i in range(6)
            ]
        )
    torch.testing.assert_close(got.detach(), expected, rtol=0, atol=1e-5)
    got.sum().backward()
    padding = torch.arange(images.shape[1])[None, :] >= torch.from_numpy(counts[:6])[:, None]
    assert regions.grad[padding].abs().max() == 0
    assert regions.grad[~padding].abs().max() > 0

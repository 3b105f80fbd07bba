"""Padded regions are masked exactly as padded words are: an image padded to more region slots
scores as it does alone, in the direct form and the precompute split, and no attention map puts
weight on a padded region."""

from __future__ import annotations

import pytest
import torch

from model.architecture.camp import CampModel
from model.architecture.encoders import length_mask
from model.architecture.precompute import ImagePrecompute, PrecomputedScorer

ATOL = 2e-6
LENGTHS = [12, 3, 30, 7]
REAL_REGIONS = [10, 36, 1, 23, 17]  # one image per count; 36 is the padded width
WIDTH = 36


@pytest.fixture(scope="module")
def model(dense_tiny_camp: CampModel) -> CampModel:
    return dense_tiny_camp


@pytest.fixture(scope="module")
def scorer(model: CampModel) -> PrecomputedScorer:
    return PrecomputedScorer(model.scorer)


@pytest.fixture(scope="module")
def data(model: CampModel):
    """Encoded captions, and images each with its own region count (unpadded, [1, R_i, d])."""
    generator = torch.Generator().manual_seed(3)
    config = model.config
    ids = torch.randint(4, config.vocab_size, (len(LENGTHS), max(LENGTHS)), generator=generator)
    with torch.no_grad():
        text = model.encode_text(ids, torch.tensor(LENGTHS))
        alone = [
            model.encode_images(torch.randn(1, count, config.img_dim, generator=generator))
            for count in REAL_REGIONS
        ]
    return text, alone


def _padded(alone: list[torch.Tensor], fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The images as one [N, 36, d] batch, padded rows set to `fill` (masks must hide them)."""
    counts = torch.tensor(REAL_REGIONS)
    batch = torch.full((len(alone), WIDTH, alone[0].shape[-1]), fill)
    for row, image in enumerate(alone):
        batch[row, : image.shape[1]] = image[0]
    return batch, length_mask(counts, WIDTH)


def _scores_alone(model: CampModel, alone, text) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.scorer(image, text.words, text.mask) for image in alone])


@pytest.mark.parametrize("fill", [0.0, 7.5])
def test_direct_form_padded_with_mask_equals_each_image_alone(model, data, fill) -> None:
    text, alone = data
    expected = _scores_alone(model, alone, text)
    batch, mask = _padded(alone, fill)
    with torch.no_grad():
        padded = model.scorer(batch, text.words, text.mask, mask)
    torch.testing.assert_close(padded, expected, rtol=0, atol=ATOL)
    assert expected.std() > 0.02, "scores should be spread out for this check to mean something"
    with torch.no_grad():  # without the mask the padding does change the scores
        unmasked = model.scorer(batch, text.words, text.mask)
    assert (unmasked[0] - expected[0]).abs().max() > 50 * ATOL


def test_an_all_true_mask_changes_nothing(model, data) -> None:
    text, alone = data
    full = alone[1]  # 36 real regions
    with torch.no_grad():
        plain = model.scorer(full, text.words, text.mask)
        masked = model.scorer(full, text.words, text.mask, torch.ones(1, WIDTH, dtype=torch.bool))
    assert torch.equal(plain, masked)


@pytest.mark.parametrize("fill", [0.0, 7.5])
def test_precompute_split_padded_with_counts_equals_each_image_alone(
    model, scorer, data, fill
) -> None:
    text, alone = data
    expected = _scores_alone(model, alone, text)
    batch, _ = _padded(alone, fill)
    captions = scorer.precompute_captions(text)
    with torch.no_grad():
        padded = scorer.precompute_images(batch, torch.tensor(REAL_REGIONS))
        grid = scorer.score_grid(padded, captions)
        # Aligned pairs: image k with caption k % 4, as the reranker lays them out.
        order = torch.arange(len(alone)) % len(LENGTHS)
        pairs = scorer.score_pairs(padded, captions.select(order))
    torch.testing.assert_close(grid, expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(pairs, expected[torch.arange(len(alone)), order], rtol=0, atol=ATOL)


def test_cat_of_images_with_different_counts_pads_and_scores_each_as_alone(
    model, scorer, data
) -> None:
    """Per-item tensors as the service caches them ([1, R_i]), concatenated in one call and
    repeated as views (the query side of photo -> captions)."""
    text, alone = data
    expected = _scores_alone(model, alone, text)
    captions = scorer.precompute_captions(text)
    with torch.no_grad():
        items = [scorer.precompute_images(image) for image in alone]
        joined = ImagePrecompute.cat([items[0], items[1].repeat(2), items[2], items[3], items[4]])
        assert joined.regions.shape[:2] == (6, WIDTH)
        assert joined.region_counts.tolist() == [10, 36, 36, 1, 23, 17]
        for name in ("regions", "gram", "word_message_logits"):  # padding is zero
            padding = ~joined.mask[0]
            assert getattr(joined, name)[0, padding].abs().sum() == 0
        grid = scorer.score_grid(joined, captions)
    rows = torch.tensor([0, 1, 1, 2, 3, 4])
    torch.testing.assert_close(grid, expected[rows], rtol=0, atol=ATOL)


def test_cat_of_padded_batches_keeps_each_rows_count(scorer, data) -> None:
    """Concatenating batches that are padded already re-pads by shape, not by count."""
    _, alone = data
    with torch.no_grad():
        first = ImagePrecompute.cat([scorer.precompute_images(alone[i]) for i in (0, 2)])
        second = ImagePrecompute.cat([scorer.precompute_images(alone[i]) for i in (3, 4)])
        joined = ImagePrecompute.cat([first, second])
        direct = ImagePrecompute.cat([scorer.precompute_images(alone[i]) for i in (0, 2, 3, 4)])
    assert joined.region_counts.tolist() == [10, 1, 23, 17]
    for name in ("regions", "queries", "gram", "word_message_logits"):
        torch.testing.assert_close(getattr(joined, name), getattr(direct, name), rtol=0, atol=0)


def test_explanation_maps_put_no_weight_on_padded_regions(model, scorer, data) -> None:
    text, alone = data
    batch, mask = _padded(alone, 7.5)
    padding = ~mask
    with torch.no_grad():
        trace = model.scorer.forward_with_trace(batch, text.words, text.mask, mask)
        padded = scorer.precompute_images(batch, torch.tensor(REAL_REGIONS))
        _, maps = scorer.score_image_against_captions(
            padded.select([0]), scorer.precompute_captions(text), explain=True
        )
    direct = trace.attention
    on_padding = padding[:, None, None, :]  # the region axis of [Ni, Nc, *, R]
    # words over regions, regions over regions (as keys), pooling over regions
    for weights in (direct.attn_t2v, direct.selfattn_v, direct.pool_attn_v):
        assert (weights * on_padding).abs().max() == 0
        real = (weights * ~on_padding).sum(-1)
        torch.testing.assert_close(real, torch.ones_like(real), rtol=0, atol=1e-5)
    pad0 = padding[0]
    for weights in (maps.attn_t2v, maps.selfattn_v, maps.pool_attn_v):
        assert weights[..., pad0].abs().max() == 0
        real = weights[..., ~pad0].sum(-1)
        torch.testing.assert_close(real, torch.ones_like(real), rtol=0, atol=1e-5)
    # The real regions' weights are those of the image alone.
    with torch.no_grad():
        _, alone_maps = scorer.score_image_against_captions(
            scorer.precompute_images(alone[0]), scorer.precompute_captions(text), explain=True
        )
    torch.testing.assert_close(maps.attn_t2v[..., ~pad0], alone_maps.attn_t2v, rtol=0, atol=ATOL)
    torch.testing.assert_close(
        maps.pool_attn_v[..., ~pad0], alone_maps.pool_attn_v, rtol=0, atol=ATOL
    )


def test_trimmed_narrows_to_the_real_regions(scorer, data) -> None:
    _, alone = data
    with torch.no_grad():
        joined = ImagePrecompute.cat([scorer.precompute_images(alone[i]) for i in (0, 3)])
        single = joined.select([0]).trimmed()
    assert single.regions.shape[1] == 10 and single.gram.shape[1:] == (10, 10)
    torch.testing.assert_close(single.keys, scorer.precompute_images(alone[0]).keys)

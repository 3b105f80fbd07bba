"""The precompute split equals the direct form, whatever the padding, batching or chunking."""

from __future__ import annotations

import pytest
import torch

from model.architecture.camp import CampModel
from model.architecture.encoders import EncodedText
from model.architecture.precompute import CaptionPrecompute, PrecomputedScorer

ATOL = 2e-6
# Lengths count <start>/<end>; 1 and 2 are the shortest a caption can be.
MIXED_LENGTHS = [49, 1, 2, 14, 7, 3, 30, 1, 9, 2]
REGIONS = 36


@pytest.fixture(scope="module")
def model(dense_tiny_camp: CampModel) -> CampModel:
    return dense_tiny_camp


@pytest.fixture(scope="module")
def batch(model: CampModel):
    generator = torch.Generator().manual_seed(1)
    config = model.config
    ids = torch.randint(4, config.vocab_size, (len(MIXED_LENGTHS), 49), generator=generator)
    with torch.no_grad():
        text = model.encode_text(ids, torch.tensor(MIXED_LENGTHS))
        images = model.encode_images(torch.randn(5, REGIONS, config.img_dim, generator=generator))
        direct = model.scorer(images, text.words, text.mask)
    return images, text, direct


@pytest.fixture(scope="module")
def scorer(model: CampModel) -> PrecomputedScorer:
    return PrecomputedScorer(model.scorer)


def test_direct_form_ignores_padding(model, batch):
    images, text, direct = batch
    padded = text.padded_to(model.config.pad_width)
    with torch.no_grad():
        scores = model.scorer(images, padded.words, padded.mask)
    torch.testing.assert_close(scores, direct, rtol=0, atol=ATOL)


def test_grid_equals_direct_with_mixed_lengths(scorer, batch):
    images, text, direct = batch
    with torch.no_grad():
        scores = scorer.score_grid(
            scorer.precompute_images(images), scorer.precompute_captions(text)
        )
    assert scores.shape == direct.shape
    torch.testing.assert_close(scores, direct, rtol=0, atol=ATOL)
    assert direct.std() > 0.02, "scores should be spread out for this check to mean something"


def test_caption_scores_do_not_depend_on_padding_or_batch(scorer, batch, model):
    images, text, _ = batch
    image_pre = scorer.precompute_images(images)
    with torch.no_grad():
        in_batch = scorer.score_grid(image_pre, scorer.precompute_captions(text))
        for index in range(len(MIXED_LENGTHS)):
            alone = text.select(index)
            padded = alone.padded_to(model.config.pad_width)
            for variant in (alone, padded):
                scores = scorer.score_grid(image_pre, scorer.precompute_captions(variant))
                torch.testing.assert_close(scores[:, 0], in_batch[:, index], rtol=0, atol=ATOL)


def test_precompute_trims_to_true_lengths(scorer, batch, model):
    _, text, _ = batch
    precomputed = scorer.precompute_captions(text.padded_to(model.config.pad_width))
    assert precomputed.words.shape[1] == max(MIXED_LENGTHS)
    single = precomputed.select([1])
    assert single.words.shape[1] == 1 and single.region_message_logits.shape[1:] == (1, 1)
    assert precomputed.select([1, 3]).words.shape[1] == 14


def test_chunked_grid_respects_memory_budget(scorer, batch, monkeypatch):
    images, text, direct = batch
    image_pre, caption_pre = scorer.precompute_images(images), scorer.precompute_captions(text)
    per_pair = scorer.bytes_per_pair(image_pre, caption_pre)
    budget = 7 * per_pair
    pairs_per_call = []
    original = scorer._score

    def recording(img, cap, pairing, explain=False):
        pairs_per_call.append(len(img) * len(cap))
        return original(img, cap, pairing, explain)

    monkeypatch.setattr(scorer, "_score", recording)
    with torch.no_grad():
        scores = scorer.score_grid(image_pre, caption_pre, memory_budget_bytes=budget)
    torch.testing.assert_close(scores, direct, rtol=0, atol=ATOL)
    assert len(pairs_per_call) > 1 and max(pairs_per_call) <= 7
    assert sum(pairs_per_call) == len(images) * len(MIXED_LENGTHS)


def test_one_caption_against_k_images(scorer, batch, model):
    images, text, direct = batch
    image_pre, caption_pre = scorer.precompute_images(images), scorer.precompute_captions(text)
    with torch.no_grad():
        trace = model.scorer.forward_with_trace(images, text.words, text.mask)
        for index, length in enumerate(MIXED_LENGTHS):
            scores, maps = scorer.score_text_against_images(
                caption_pre.select([index]), image_pre, explain=True
            )
            torch.testing.assert_close(scores, direct[:, index], rtol=0, atol=ATOL)
            expected = trace.attention
            torch.testing.assert_close(
                maps.attn_t2v[:, 0], expected.attn_t2v[:, index, :length], rtol=0, atol=ATOL
            )
            torch.testing.assert_close(
                maps.attn_v2t[:, 0], expected.attn_v2t[:, index, :, :length], rtol=0, atol=ATOL
            )
            torch.testing.assert_close(
                maps.pool_attn_t[:, 0],
                expected.pool_attn_t[:, index, :, :length],
                rtol=0,
                atol=ATOL,
            )
            torch.testing.assert_close(
                maps.gate_v[:, 0], expected.gate_v[:, index], rtol=0, atol=ATOL
            )


def test_one_image_against_k_captions(scorer, batch, model):
    images, text, direct = batch
    image_pre, caption_pre = scorer.precompute_images(images), scorer.precompute_captions(text)
    with torch.no_grad():
        trace = model.scorer.forward_with_trace(images, text.words, text.mask)
        for index in range(len(images)):
            scores, maps = scorer.score_image_against_captions(
                image_pre.select([index]), caption_pre, explain=True
            )
            torch.testing.assert_close(scores, direct[index], rtol=0, atol=ATOL)
            torch.testing.assert_close(
                maps.pool_attn_v[0], trace.attention.pool_attn_v[index], rtol=0, atol=ATOL
            )
            torch.testing.assert_close(
                maps.selfattn_v[0], trace.attention.selfattn_v[index], rtol=0, atol=ATOL
            )


def test_aligned_pairs_and_recombined_caches(scorer, batch):
    images, text, direct = batch
    image_pre, caption_pre = scorer.precompute_images(images), scorer.precompute_captions(text)
    # Per-caption cache entries (each trimmed to its own length) recombined in a new order.
    order = [3, 1, 0, 4, 2]
    cached = [caption_pre.select([i]) for i in order]
    recombined = CaptionPrecompute.cat(cached)
    assert recombined.words.shape[1] == max(MIXED_LENGTHS[i] for i in order)
    with torch.no_grad():
        pairs = scorer.score_pairs(image_pre, recombined)
    expected = direct[torch.arange(len(images)), torch.tensor(order)]
    torch.testing.assert_close(pairs, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("layout", ["caption_repeated", "image_repeated", "both_per_pair"])
def test_inference_pairs_equal_direct_in_every_layout(scorer, batch, model, layout):
    """The inference path folds a repeated side into one matrix product and skips masks where
    nothing is padded: each layout, with padded regions and captions, equals the direct form."""
    images, text, _ = batch
    counts = torch.tensor([36, 5, 20, 1, 33])
    region_mask = torch.arange(REGIONS)[None, :] < counts[:, None]
    with torch.no_grad():
        direct = model.scorer(images, text.words, text.mask, region_mask)  # [5, 10]
        image_pre = scorer.precompute_images(images, counts)
        caption_pre = scorer.precompute_captions(text)
        if layout == "caption_repeated":
            caption = caption_pre.select([3])
            got = scorer.score_pairs(image_pre, caption.repeat(len(images)), trim=False)
            expected = direct[:, 3]
        elif layout == "image_repeated":
            got = scorer.score_pairs(image_pre.select([2]).repeat(len(text.lengths)), caption_pre)
            expected = direct[2]
        else:
            order = torch.tensor([4, 0, 9, 1, 6])
            got = scorer.score_pairs(image_pre, caption_pre.select(order))
            expected = direct[torch.arange(len(images)), order]
        grad_path = None
        with torch.enable_grad():
            if layout == "caption_repeated":
                grad_path = scorer.score_pairs(image_pre, caption.repeat(len(images)))
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    if grad_path is not None:  # the autograd path (training) gives the same scores
        torch.testing.assert_close(grad_path.detach(), got, rtol=0, atol=ATOL)


def test_float64_matches_direct_tightly(model, batch):
    images, text, _ = batch
    model64 = CampModel.from_config(model.config)
    model64.load_state_dict(model.state_dict())
    model64 = model64.double().eval()
    scorer = PrecomputedScorer(model64.scorer)
    text64 = EncodedText(text.words.double(), text.lengths)
    with torch.no_grad():
        direct = model64.scorer(images.double(), text64.words, text64.mask)
        split = scorer.score_grid(
            scorer.precompute_images(images.double()), scorer.precompute_captions(text64)
        )
    assert split.dtype == torch.float32  # the grid is returned as float32 scores
    torch.testing.assert_close(split.double(), direct, rtol=0, atol=1e-7)


def test_bfloat16_autocast_runs_close_to_fp32(scorer, batch):
    images, text, direct = batch
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = scorer.score_grid(
            scorer.precompute_images(images), scorer.precompute_captions(text)
        )
    assert torch.isfinite(scores).all()
    assert (scores - direct).abs().max() < 0.05


@pytest.mark.slow
def test_thousand_images_by_five_thousand_captions_in_bounded_memory(model, scorer):
    """The evaluation's shape at tiny width; a sample of entries is checked directly."""
    generator = torch.Generator().manual_seed(2)
    config = model.config
    lengths = torch.randint(3, 20, (5000,), generator=generator)
    ids = torch.randint(4, config.vocab_size, (5000, 19), generator=generator)
    with torch.no_grad():
        text = model.encode_text(ids, lengths)
        images = model.encode_images(
            torch.randn(1000, REGIONS, config.img_dim, generator=generator)
        )
        grid = scorer.score_grid(
            scorer.precompute_images(images),
            scorer.precompute_captions(text),
            memory_budget_bytes=64 * 2**20,
        )
        rows, cols = torch.arange(0, 1000, 97), torch.arange(0, 5000, 389)
        sample = model.scorer(images[rows], text.words[cols], text.mask[cols])
    assert grid.shape == (1000, 5000)
    torch.testing.assert_close(grid[rows][:, cols], sample, rtol=0, atol=ATOL)

"""Rerank tensors stored in float16 at ingest rank real shortlists as fp32 recomputation does.

The shipped default model and the real grid extractor on coco-mini photos (tests/
rerank_support.py): every job of both directions is scored once with fp32 tensors computed
from the region features (what a search did before tensors were stored) and once with the
stored side's tensors round-tripped through their float16 records (images for text -> images,
captions for image -> captions). Stated tolerance: the final orders are identical, and every
fused score (spanning about -5..25) is within STORED_MAX_SCORE_DIFF (0.002; measured ~4e-4).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from rerank_support import coco_shortlists, rerank_jobs

from index.codec import decode_arrays, encode_arrays
from model.architecture.precompute import CaptionPrecompute, ImagePrecompute
from model.retrieval import CAMP_CHECKPOINT, RetrievalModel
from service.search.rerank import PairReranker, RerankJob
from service.search.stored_tensors import (
    ImageTensors,
    TensorOverflowError,
    caption_record,
    caption_tensors,
    caption_tensors_many,
    image_record,
    image_tensors,
    image_tensors_many,
)

STORED_MAX_SCORE_DIFF = 0.002


@pytest.fixture(scope="module")
def model() -> RetrievalModel:
    """The shipped CAMP model: these checks name CAMP's stored tensors (IMRAM's records go
    through the same code: tests/test_imram_reranker.py)."""
    return RetrievalModel.load(CAMP_CHECKPOINT, device="cpu")


@pytest.fixture(scope="module")
def jobs(shared_dir, model) -> list[RerankJob]:
    return rerank_jobs(model, coco_shortlists(shared_dir))


def _through_storage_image(model: RetrievalModel, image: ImagePrecompute) -> ImagePrecompute:
    regions = int(image.region_counts[0])
    tensors = ImageTensors(image, np.zeros((regions, 4), np.float32), (640, 480))
    stored = decode_arrays(encode_arrays(image_record(tensors)))  # the bytes LMDB keeps
    return image_tensors(stored, model.device).precompute


def _through_storage_caption(model: RetrievalModel, caption: CaptionPrecompute):
    stored = decode_arrays(encode_arrays(caption_record(caption)))
    return caption_tensors(stored, model.device)


def test_float16_stored_tensors_keep_the_final_ranking_of_real_shortlists(model, jobs) -> None:
    stored_jobs = [
        RerankJob(
            images=tuple(_through_storage_image(model, i) for i in job.images)
            if len(job.images) > 1
            else job.images,  # the query side is computed per search, in fp32
            captions=tuple(_through_storage_caption(model, c) for c in job.captions)
            if len(job.captions) > 1
            else job.captions,
            shortlist_scores=job.shortlist_scores,
        )
        for job in jobs
    ]
    reranker = PairReranker(model)
    fp32 = reranker(jobs)
    stored = reranker(stored_jobs)
    for reference, got in zip(fp32, stored, strict=True):
        np.testing.assert_array_equal(
            np.argsort(-reference, kind="stable"), np.argsort(-got, kind="stable")
        )
    worst = max(float(np.abs(a - b).max()) for a, b in zip(fp32, stored, strict=True))
    assert worst < STORED_MAX_SCORE_DIFF
    assert worst > 0, "float16 storage should round somewhere (the check has teeth)"
    # The orders are far from trivial: real shortlists, scores spread well beyond the tolerance.
    assert min(float(s.max() - s.min()) for s in fp32) > 100 * STORED_MAX_SCORE_DIFF


def test_records_are_trimmed_float16_with_the_geometry(model, jobs) -> None:
    image = jobs[0].images[0]
    boxes = np.random.default_rng(0).random((49, 4)).astype(np.float32)
    record = image_record(ImageTensors(image, boxes, (640, 480)))
    assert record["regions"].dtype == np.float16 and record["gram"].shape == (49, 49)
    restored = image_tensors(record, model.device)
    assert restored.image_size == (640, 480)
    np.testing.assert_array_equal(restored.boxes, boxes)
    assert restored.precompute.region_counts.tolist() == [49]
    caption = jobs[0].captions[0]
    words = int(caption.lengths[0])
    assert caption_record(caption)["words"].shape == (words, 128)
    assert caption_tensors(caption_record(caption), model.device).lengths.tolist() == [words]
    # Shipped model, 49 grid regions: ~71 KiB an image; ~1.3 KiB a caption word (README).
    assert len(encode_arrays(record)) < 74_000


def test_padded_images_store_only_their_own_regions(model, jobs) -> None:
    image = jobs[0].images[0]
    fewer = replace(image.trimmed(30), region_counts=torch.tensor([30]))  # a detector's 30 boxes
    padded = ImagePrecompute.cat([fewer, image]).select([0])  # padded to 49 in a batch
    assert padded.regions.shape[1] == 49
    record = image_record(ImageTensors(padded, np.zeros((30, 4), np.float32), (1, 1)))
    assert record["regions"].shape == (30, 128) and record["word_message_logits"].shape == (30, 30)
    np.testing.assert_array_equal(record["gram"], fewer.gram[0].numpy().astype(np.float16))


def test_a_tensor_that_overflows_float16_is_refused(model, jobs) -> None:
    caption = jobs[0].captions[0]
    huge = CaptionPrecompute(
        **{name: getattr(caption, name) for name in ("words", "lengths", "queries", "keys")},
        region_message_logits=caption.region_message_logits,
        gram=caption.gram * 1e6,
        fusion_self=caption.fusion_self,
        fusion_for_regions=caption.fusion_for_regions,
    )
    with pytest.raises(TensorOverflowError):
        caption_record(huge)


def test_records_decoded_together_equal_each_decoded_alone(model, jobs) -> None:
    """A search decodes its records together: the same values, in the records' order, for
    images of several region counts and captions of several lengths, each item's tensors in
    memory of their own (the cache keeps items one by one: a row of a batch would pin it)."""
    rng = np.random.default_rng(1)
    images = []
    for regions in (49, 12, 49, 30, 12):
        features = rng.standard_normal((1, 49, model.region_dim)).astype(np.float16)
        image = model.precompute_images(features, np.array([regions])).trimmed(regions)
        images.append(ImageTensors(image, rng.random((regions, 4)).astype(np.float32), (64, 48)))
    image_records = {
        7 - n: decode_arrays(encode_arrays(image_record(i))) for n, i in enumerate(images)
    }
    together = image_tensors_many(image_records, model.device)
    assert list(together) == list(image_records)
    for item_id, record in image_records.items():
        decoded = together[item_id]
        np.testing.assert_array_equal(decoded.boxes, record["boxes"])
        assert decoded.image_size == (64, 48)
        assert decoded.precompute.region_counts.tolist() == [record["regions"].shape[0]]
        _assert_record_values(decoded.precompute, record)
    texts = ["a dog", "two dogs run on the grass", "a cat", "a red bus on a street"]
    encoded = model.encode_texts(texts).precompute
    caption_records = {
        n: decode_arrays(encode_arrays(caption_record(encoded.select([n]))))
        for n in range(len(texts))
    }
    together_captions = caption_tensors_many(caption_records, model.device)
    assert list(together_captions) == list(caption_records)
    for item_id, record in caption_records.items():
        assert together_captions[item_id].lengths.tolist() == [record["words"].shape[0]]
        _assert_record_values(together_captions[item_id], record)


def _assert_record_values(decoded, record) -> None:
    """Every stored array of `record`, widened to float32, is the decoded item's tensor [1, ...],
    which holds exactly its own elements."""
    for name, array in record.items():
        if name in ("boxes", "image_size"):
            continue
        tensor = getattr(decoded, name)
        assert tensor.dtype == torch.float32 and tensor.shape == (1, *array.shape)
        np.testing.assert_array_equal(tensor[0].cpu().numpy(), array.astype(np.float32))
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()

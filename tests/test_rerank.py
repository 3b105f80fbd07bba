"""The batched second stage: jobs of per-item tensors score like one direct call, however the
worker has to chunk them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.architecture.precompute import CaptionPrecompute, ImagePrecompute
from service.search.rerank import PairReranker, RerankJob

CAPTIONS = [
    "a dog runs on the grass",
    "two people",
    "a man in a red shirt rides a bicycle down a busy street",
    "a child",
    "a brown dog jumps over a fence in the yard",
]


@pytest.fixture(scope="module")
def items(tiny_retrieval_model):
    """Per-item tensors as the service caches them: one image / one caption each."""
    model = tiny_retrieval_model
    regions = np.random.default_rng(0).standard_normal((len(CAPTIONS), 4, model.region_dim))
    images = [model.precompute_images(regions[i : i + 1].astype(np.float32)) for i in range(5)]
    captions = [model.encode_texts([text]).precompute for text in CAPTIONS]
    return images, captions


def test_chunked_jobs_score_like_one_direct_call(tiny_retrieval_model, items) -> None:
    model = tiny_retrieval_model
    images, captions = items
    shortlist = np.linspace(0.1, 0.5, len(CAPTIONS), dtype=np.float32)
    text_query = RerankJob(
        images=tuple(images), captions=(captions[2],), shortlist_scores=shortlist
    )
    image_query = RerankJob(
        images=(images[1],), captions=tuple(captions), shortlist_scores=shortlist[::-1].copy()
    )
    expected_text = model.rerank_pairs(
        ImagePrecompute.cat(images), captions[2].select([0] * len(images)), shortlist
    )
    expected_image = model.rerank_pairs(
        images[1].select([0] * len(captions)),
        CaptionPrecompute.cat(captions),
        shortlist[::-1].copy(),
    )
    per_pair = max(text_query.bytes_per_pair(), image_query.bytes_per_pair())
    # 10 pairs in all: one call; chunks of 2 pairs (splitting a job); one pair per call.
    for budget, expected_calls in ((2**40, 1), (2 * per_pair, 5), (per_pair, 10)):
        counting = _CountingModel(model)
        scores = PairReranker(counting, memory_budget_bytes=budget)([text_query, image_query])
        np.testing.assert_allclose(scores[0], expected_text, atol=1e-5)
        np.testing.assert_allclose(scores[1], expected_image, atol=1e-5)
        assert counting.calls == expected_calls


def test_a_job_holds_the_cached_items_not_copies(items) -> None:
    images, captions = items
    job = RerankJob(
        images=tuple(images), captions=(captions[0],), shortlist_scores=np.zeros(5, np.float32)
    )
    assert all(held is cached for held, cached in zip(job.images, images, strict=True))
    assert job.images[2].regions.data_ptr() == images[2].regions.data_ptr()


def test_malformed_jobs_are_refused(items) -> None:
    images, captions = items
    scores = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="one side must have length 1"):
        RerankJob(images=tuple(images), captions=tuple(captions[:2]), shortlist_scores=scores)
    with pytest.raises(ValueError, match="per-item"):
        RerankJob(
            images=(ImagePrecompute.cat(images),), captions=(captions[0],), shortlist_scores=scores
        )
    with pytest.raises(ValueError, match="at least one candidate"):
        RerankJob(images=(images[0],), captions=(captions[0],), shortlist_scores=scores[:0])


class _CountingModel:
    """The real model's `rerank_pairs`, counted."""

    def __init__(self, model) -> None:
        self.model = model
        self.calls = 0

    def rerank_pairs(self, *args):
        self.calls += 1
        return self.model.rerank_pairs(*args)


def test_the_hot_path_reads_back_from_the_device_once_per_model_call(
    tiny_retrieval_model, items, monkeypatch
) -> None:
    """No per-item host synchronisation: while the reranker scores 2 jobs in 5 calls, the only
    tensor-to-host reads are one `.cpu()` + `.numpy()` of each call's scores (on a GPU these
    are the syncs; tests/test_gpu.py counts them with CUDA's sync debug mode)."""
    images, captions = items
    shortlist = np.linspace(0.1, 0.5, len(CAPTIONS), dtype=np.float32)
    jobs = [
        RerankJob(images=tuple(images), captions=(captions[2],), shortlist_scores=shortlist),
        RerankJob(images=(images[1],), captions=tuple(captions), shortlist_scores=shortlist),
    ]
    per_pair = max(job.bytes_per_pair() for job in jobs)
    reads: dict[str, int] = {}
    for name in ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads[_name] = reads.get(_name, 0) + 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counting = _CountingModel(tiny_retrieval_model)
    PairReranker(counting, memory_budget_bytes=2 * per_pair)(jobs)
    monkeypatch.undo()
    assert counting.calls == 5
    assert reads == {"cpu": 5, "numpy": 5}

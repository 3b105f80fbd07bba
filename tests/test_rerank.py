"""The batched second stage: jobs of per-item tensors score like one direct call, however the
worker has to chunk them."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from model.architecture.precompute import CaptionPrecompute, ImagePrecompute, PrecomputedScorer
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
    reads = _count_host_reads(monkeypatch)
    counting = _CountingModel(tiny_retrieval_model)
    PairReranker(counting, memory_budget_bytes=2 * per_pair)(jobs)
    monkeypatch.undo()
    assert counting.calls == 5
    assert reads == {"cpu": 5, "numpy": 5}


def _count_host_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts, by method, of tensor-to-host reads from now until `monkeypatch.undo()`."""
    reads: dict[str, int] = {}
    for name in ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads[_name] = reads.get(_name, 0) + 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


MIXED_COUNTS = [3, 7, 1, 5, 7]


@pytest.fixture(scope="module")
def mixed_items(tiny_retrieval_model):
    """Per-item image tensors with different region counts, as a detector's boxes give them."""
    model = tiny_retrieval_model
    rng = np.random.default_rng(1)
    regions = [
        rng.standard_normal((1, count, model.region_dim)).astype(np.float32)
        for count in MIXED_COUNTS
    ]
    return [model.precompute_images(r) for r in regions]


def test_jobs_of_mixed_region_counts_share_one_call_and_score_each_image_as_alone(
    tiny_retrieval_model, items, mixed_items, monkeypatch
) -> None:
    """Both directions, images of 1..7 regions in one job and in one model call: every score
    equals that image reranked alone, and the host still reads back only the call's scores."""
    model = tiny_retrieval_model
    images = mixed_items
    _, captions = items
    shortlist = np.linspace(0.1, 0.5, len(MIXED_COUNTS), dtype=np.float32)
    text_query = RerankJob(
        images=tuple(images), captions=(captions[2],), shortlist_scores=shortlist
    )
    image_query = RerankJob(
        images=(images[2],), captions=tuple(captions), shortlist_scores=shortlist[::-1].copy()
    )
    alone_text = [
        model.rerank_pairs(image, captions[2], shortlist[k : k + 1])[0]
        for k, image in enumerate(images)
    ]
    alone_image = [
        model.rerank_pairs(images[2], caption, shortlist[::-1][k : k + 1].copy())[0]
        for k, caption in enumerate(captions)
    ]
    reads = _count_host_reads(monkeypatch)
    counting = _CountingModel(model)
    scores = PairReranker(counting, memory_budget_bytes=2**40)([text_query, image_query])
    monkeypatch.undo()
    assert counting.calls == 1
    assert reads == {"cpu": 1, "numpy": 1}
    np.testing.assert_allclose(scores[0], alone_text, rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores[1], alone_image, rtol=0, atol=1e-5)
    assert np.ptp(scores[0]) > 0.01, "scores should differ for this check to mean something"


def test_chunks_are_reckoned_at_the_widest_padded_pair(tiny_retrieval_model, mixed_items) -> None:
    """A budget of two pairs at the widest image (7 regions) is two pairs a call, even where a
    chunk's own images are narrower: padding makes every pair as wide as the widest."""
    model = tiny_retrieval_model
    images = mixed_items
    caption = model.encode_texts(["a dog runs on the grass"]).precompute
    job = RerankJob(
        images=tuple(images), captions=(caption,), shortlist_scores=np.zeros(5, np.float32)
    )
    widest = PrecomputedScorer.bytes_per_pair(images[1], caption)
    assert job.bytes_per_pair() == widest > PrecomputedScorer.bytes_per_pair(images[0], caption)
    counting = _CountingModel(model)
    PairReranker(counting, memory_budget_bytes=2 * widest + 1)([job])
    assert counting.calls == 3  # 5 pairs, 2 a call


def test_explanations_of_a_padded_image_cover_only_its_real_regions(
    tiny_retrieval_model, mixed_items
) -> None:
    model = tiny_retrieval_model
    images = mixed_items
    caption = model.encode_texts(["a dog runs on the grass"]).precompute
    padded = ImagePrecompute.cat(images).select([0])  # 3 regions padded to 7
    assert padded.regions.shape[1] == 7
    explained = model.explain_pair(padded, caption)
    alone = model.explain_pair(images[0], caption)
    assert len(explained.region_pooling) == 3
    assert all(len(row) == 3 for row in explained.word_region)
    np.testing.assert_allclose(explained.word_region, alone.word_region, atol=1e-6)
    np.testing.assert_allclose(explained.region_pooling, alone.region_pooling, atol=1e-6)
    np.testing.assert_allclose(explained.camp_score, alone.camp_score, atol=1e-6)


def test_explanations_of_all_hits_come_from_one_batched_call_and_match_each_alone(
    tiny_retrieval_model, items, mixed_items
) -> None:
    """Text -> images: one caption x K images of mixed region counts; image -> captions: one
    image x K captions of different lengths. Each explanation equals the pair's own."""
    model = tiny_retrieval_model
    images, captions = items
    query = captions[2]
    batched = model.explain_pairs(ImagePrecompute.cat(mixed_items), query)
    assert [len(e.region_pooling) for e in batched] == [
        int(image.region_counts[0]) for image in mixed_items
    ]
    for image, explained in zip(mixed_items, batched, strict=True):
        alone = model.explain_pair(image, query)
        np.testing.assert_allclose(explained.word_region, alone.word_region, atol=1e-6)
        np.testing.assert_allclose(explained.region_pooling, alone.region_pooling, atol=1e-6)
        np.testing.assert_allclose(explained.word_pooling, alone.word_pooling, atol=1e-6)
        assert explained.camp_score == pytest.approx(alone.camp_score, abs=1e-6)

    batched = model.explain_pairs(images[0], CaptionPrecompute.cat(captions))
    for caption, explained in zip(captions, batched, strict=True):
        alone = model.explain_pair(images[0], caption)
        assert len(explained.word_pooling) == int(caption.lengths[0])
        np.testing.assert_allclose(explained.word_region, alone.word_region, atol=1e-6)
        np.testing.assert_allclose(explained.word_pooling, alone.word_pooling, atol=1e-6)
        assert explained.camp_score == pytest.approx(alone.camp_score, abs=1e-6)
    with pytest.raises(ValueError, match="one caption x K images"):
        model.explain_pairs(ImagePrecompute.cat(images[:2]), CaptionPrecompute.cat(captions[:2]))


def test_pairs_of_very_different_widths_are_scored_in_groups_like_one_call(
    tiny_retrieval_model, items
) -> None:
    """One image x 23 captions: 20 of a few words and 3 of about twenty. The short ones are not
    padded to the long ones' width: two calls (narrow, wide), each pair scored as in one call."""
    model = tiny_retrieval_model
    images, _ = items
    long_text = " ".join([CAPTIONS[2], CAPTIONS[4]])
    texts = [CAPTIONS[1]] * 20 + [long_text, CAPTIONS[2] + " " + CAPTIONS[0], long_text]
    captions = [model.encode_texts([text]).precompute for text in texts]
    widths = sorted({caption.words.shape[1] for caption in captions})
    assert widths[-1] > 2 * widths[0]  # the check has teeth: widths of different doublings
    order = np.random.default_rng(3).permutation(len(texts))  # long ones anywhere in the job
    captions = [captions[i] for i in order]
    shortlist = np.linspace(0.5, 0.1, len(texts), dtype=np.float32)
    job = RerankJob(images=(images[0],), captions=tuple(captions), shortlist_scores=shortlist)
    expected = model.rerank_pairs(
        images[0].select([0] * len(captions)), CaptionPrecompute.cat(captions), shortlist
    )
    counting = _CountingModel(model)
    scores = PairReranker(counting, memory_budget_bytes=2**40)([job])
    np.testing.assert_allclose(scores[0], expected, atol=1e-5)
    assert counting.calls == 2
    small = RerankJob(  # few pairs: one call whatever their widths
        images=(images[0],), captions=tuple(captions[:5]), shortlist_scores=shortlist[:5]
    )
    counting.calls = 0
    PairReranker(counting, memory_budget_bytes=2**40)([small])
    assert counting.calls == 1


class _ThreadRecordingModel(_CountingModel):
    """The real model's `rerank_pairs`, with the pairs each thread scored."""

    def __init__(self, model, fail_on_thread: str | None = None) -> None:
        super().__init__(model)
        self.device = model.device
        self.pairs_by_thread: dict[str, int] = {}
        self.call_sizes: list[int] = []
        self.fail_on_thread = fail_on_thread

    def rerank_pairs(self, images, captions, shortlist):
        name = threading.current_thread().name
        if self.fail_on_thread and name.startswith(self.fail_on_thread):
            raise RuntimeError("this part failed")
        self.pairs_by_thread[name] = self.pairs_by_thread.get(name, 0) + len(shortlist)
        self.call_sizes.append(len(shortlist))
        return super().rerank_pairs(images, captions, shortlist)


def test_worker_threads_split_a_call_into_parts_that_score_like_one_thread(
    tiny_retrieval_model, items
) -> None:
    """`workers=2` on the CPU: a text search's 100 pairs are scored as two parts of 50 at once,
    one on the calling thread and one on the reranker's; an image search's captions of two
    widths as one part per width group; every score equal to the one-thread call's."""
    model = tiny_retrieval_model
    images, _ = items
    captions = [
        model.encode_texts([text]).precompute
        for text in [CAPTIONS[1]] * 40 + [" ".join([CAPTIONS[2], CAPTIONS[4]])] * 40
    ]
    shortlist = np.linspace(0.5, 0.1, 100, dtype=np.float32)
    text_job = RerankJob(
        images=tuple(images[i % 5] for i in range(100)),
        captions=(captions[0],),
        shortlist_scores=shortlist,
    )
    image_job = RerankJob(
        images=(images[0],), captions=tuple(captions), shortlist_scores=shortlist[:80]
    )
    expected = PairReranker(model, memory_budget_bytes=2**40)([text_job, image_job])
    for jobs, parts in (([text_job], [50, 50]), ([image_job], [40, 40])):
        recording = _ThreadRecordingModel(model)
        scores = PairReranker(recording, memory_budget_bytes=2**40, workers=2)(jobs)
        reference = expected[0] if jobs[0] is text_job else expected[1]
        np.testing.assert_array_equal(scores[0], reference)
        assert sorted(recording.pairs_by_thread.values()) == parts
        assert any(name.startswith("rerank-part") for name in recording.pairs_by_thread)
    # Concurrent searches' 300 pairs: parts of at most 64, still scored like one call.
    many = [text_job, image_job, text_job]
    recording = _ThreadRecordingModel(model)
    scores = PairReranker(recording, memory_budget_bytes=2**40, workers=2)(many)
    for got, want in zip(scores, [expected[0], expected[1], expected[0]], strict=True):
        np.testing.assert_array_equal(got, want)
    # the short captions of all three jobs are one width group: 240 pairs in 4 parts of 60
    assert sorted(recording.call_sizes) == [40, 60, 60, 60, 60]
    few = RerankJob(images=tuple(images), captions=(captions[0],), shortlist_scores=shortlist[:5])
    recording = _ThreadRecordingModel(model)
    PairReranker(recording, memory_budget_bytes=2**40, workers=2)([few])
    assert list(recording.pairs_by_thread.values()) == [5]  # too few pairs to split


def test_a_failing_part_fails_the_call_after_every_part_has_ended(
    tiny_retrieval_model, items
) -> None:
    images, captions = items
    shortlist = np.linspace(0.5, 0.1, 100, dtype=np.float32)
    job = RerankJob(
        images=tuple(images[i % 5] for i in range(100)),
        captions=(captions[0],),
        shortlist_scores=shortlist,
    )
    for failing in ("rerank-part", threading.current_thread().name):
        recording = _ThreadRecordingModel(tiny_retrieval_model, fail_on_thread=failing)
        with pytest.raises(RuntimeError, match="this part failed"):
            PairReranker(recording, memory_budget_bytes=2**40, workers=2)([job])
        assert list(recording.pairs_by_thread.values()) == [50]  # the other part finished

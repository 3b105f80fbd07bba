"""Precision settings keep the fp32 ranking of real shortlists: the reranker's bf16 autocast,
and a query's text encoder with bf16 linear layers (`query_precision`, at the end).

CPU autocast in bf16 runs the same code path as CUDA's (matmuls in bf16; softmaxes, norms and
the fused score in fp32), so this check runs in CI; tests/test_gpu.py repeats it on a GPU.
Stated tolerance: every fused score within BF16_MAX_SCORE_DIFF (0.05, on scores spanning about
-5..25) of fp32's, and two candidates swap places only when their fp32 scores are closer than
BF16_ORDER_TOLERANCE (0.05).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rerank_support import (
    BF16_MAX_SCORE_DIFF,
    BF16_ORDER_TOLERANCE,
    IMAGE_SHORTLIST,
    PHOTOS,
    TEXT_SHORTLIST,
    coco_shortlists,
    max_abs_diff,
    order_violations,
    rerank,
)

from model.devices import has_native_bf16
from model.retrieval import RetrievalModel
from service.search.rerank import PairReranker, RerankJob


@pytest.fixture(scope="module")
def shortlists(shared_dir):
    return coco_shortlists(shared_dir)


@pytest.fixture(scope="module")
def fp32_scores(shortlists):
    return rerank(RetrievalModel.load(device="cpu"), shortlists)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_keeps_the_fp32_ranking_of_real_shortlists(
    shortlists, fp32_scores, precision
) -> None:
    """Measured: bf16 moves scores by at most ~0.016, fp16 by ~0.0015; both held to bf16's
    tolerance."""
    model = RetrievalModel.load(device="cpu", precision=precision)
    half_scores = rerank(model, shortlists)
    assert [len(s) for s in fp32_scores] == [TEXT_SHORTLIST] * PHOTOS + [IMAGE_SHORTLIST] * PHOTOS
    assert max_abs_diff(fp32_scores, half_scores) < BF16_MAX_SCORE_DIFF
    assert order_violations(fp32_scores, half_scores, BF16_ORDER_TOLERANCE) == []
    # The check has teeth: the reranked orders are far from trivial and bf16 really ran.
    spans = [float(s.max() - s.min()) for s in fp32_scores]
    assert min(spans) > 20 * BF16_ORDER_TOLERANCE
    assert max_abs_diff(fp32_scores, half_scores) > 1e-4, "autocast should round somewhere"


def test_fp32_setting_runs_without_autocast(shortlists, fp32_scores) -> None:
    """fp32 is plain float32 arithmetic: scores repeat exactly, and no autocast is entered."""
    model = RetrievalModel.load(device="cpu", precision="fp32")
    with model.autocast():
        assert not torch.is_autocast_enabled("cpu")
    again = rerank(model, shortlists)
    for first, second in zip(fp32_scores, again, strict=True):
        np.testing.assert_array_equal(first, second)


def test_bf16_autocast_is_entered_on_the_models_device() -> None:
    model = RetrievalModel.load(device="cpu", precision="bf16")
    with model.autocast():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        RetrievalModel.load(device="cpu", precision="fp8")  # type: ignore[arg-type]


# A search query's text encoder in bf16 (`query_precision`): the same real captions, as queries
# over the real photos, keep their fp32 ranking in both stages.
QUERY_BF16_MAX_COSINE_DIFF = 0.01  # shortlist cosines span about -0.2..0.8
QUERY_BF16_COSINE_ORDER_TOLERANCE = 0.005
QUERY_BF16_MAX_SCORE_DIFF = 0.1


def query_scores(model: RetrievalModel, data) -> tuple[np.ndarray, np.ndarray]:
    """Every caption as a text query against every photo: pooled cosines [C, N] and fused
    rerank scores [C, N] (each query's shortlist is all N photos)."""
    images = model.precompute_images(data.regions)
    pooled_images = model.pooled_images(data.regions)
    queries = model.encode_texts(data.captions, query=True)
    cosines = queries.pooled @ pooled_images.T
    jobs = [
        RerankJob(
            images=tuple(images.select([i]) for i in range(len(images))),
            captions=(queries.precompute.select([row]),),
            shortlist_scores=cosines[row].astype(np.float32),
        )
        for row in range(len(data.captions))
    ]
    return cosines, np.stack(PairReranker(model)(jobs))


def test_bf16_queries_keep_the_fp32_ranking_of_real_searches(shortlists) -> None:
    """Measured on 100 coco captions x 20 photos (fused scores span about 2..19): cosines move
    by at most 0.002, fused scores by at most 0.077 (median 0.01); only pairs closer than 0.03
    change order. Whole-network bf16 (residual stream and norms too) moved them further (at most
    0.118, median 0.020)."""
    fp32 = RetrievalModel.load(device="cpu")
    bf16 = RetrievalModel.load(device="cpu", query_precision="bf16")
    assert (fp32.query_precision, bf16.query_precision) == ("fp32", "bf16")
    fp32_cosines, fp32_fused = query_scores(fp32, shortlists)
    bf16_cosines, bf16_fused = query_scores(bf16, shortlists)
    assert np.abs(fp32_cosines - bf16_cosines).max() < QUERY_BF16_MAX_COSINE_DIFF
    assert np.abs(fp32_fused - bf16_fused).max() < QUERY_BF16_MAX_SCORE_DIFF
    shortlist = order_violations(
        list(fp32_cosines), list(bf16_cosines), QUERY_BF16_COSINE_ORDER_TOLERANCE
    )
    assert shortlist == []
    assert order_violations(list(fp32_fused), list(bf16_fused), BF16_ORDER_TOLERANCE) == []
    # The check has teeth: bf16 really ran, and stored captions are not affected by it.
    assert np.abs(fp32_cosines - bf16_cosines).max() > 1e-4
    stored_fp32, stored_bf16 = (
        m.encode_texts(shortlists.captions[:5]).pooled for m in (fp32, bf16)
    )
    np.testing.assert_array_equal(stored_fp32, stored_bf16)
    # The bf16 copy shares the backbone's other tensors (the embedding table) instead of
    # holding a second fp32 copy, and leaves the backbone's own linear layers fp32.
    original, low = bf16.network.camp.text_encoder.backbone.bert, bf16._query_backbone.bert
    assert low.embeddings.word_embeddings.weight is original.embeddings.word_embeddings.weight
    assert type(original.encoder.layer[0].attention.self.query) is torch.nn.Linear
    assert low.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16


def test_query_precision_auto_follows_the_hardware_and_unknown_values_are_refused() -> None:
    model = RetrievalModel.load(device="cpu", query_precision="auto")
    expected = "bf16" if has_native_bf16(torch.device("cpu")) else "fp32"
    assert model.query_precision == expected
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        RetrievalModel.load(device="cpu", query_precision="fp16")  # type: ignore[arg-type]

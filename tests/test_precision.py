"""The reranker's precision setting: bf16 autocast keeps the fp32 ranking of real shortlists.

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

from model.retrieval import RetrievalModel


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

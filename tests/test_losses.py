"""Losses on hand-made score matrices, and on the official score matrix of the parity files."""

from __future__ import annotations

import math

import pytest
import torch
from shared_paths import PARITY_DIR

from model.training.losses import BCE_EPS, bce_hardest_negative_loss, bce_mean_loss, vse_hinge_loss


def test_bce_hardest_negative_by_hand():
    scores = torch.tensor([[0.9, 0.2, 0.6], [0.4, 0.8, 0.1], [0.3, 0.7, 0.5]])
    # Hardest negative caption per image (row max off-diagonal): 0.6, 0.4, 0.7.
    # Hardest negative image per caption (column max off-diagonal): 0.4, 0.7, 0.6.
    log = math.log
    expected = -(
        2 * (log(0.9) + log(0.8) + log(0.5))
        + log(1 - 0.6) + log(1 - 0.4) + log(1 - 0.7)
        + log(1 - 0.4) + log(1 - 0.7) + log(1 - 0.6)
    )  # fmt: skip
    assert bce_hardest_negative_loss(scores).item() == pytest.approx(expected, rel=1e-6)


def test_bce_clamps_saturated_scores():
    scores = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss = bce_hardest_negative_loss(scores)
    assert torch.isfinite(loss)
    # Each saturated term contributes -log(eps) (up to float32 rounding of 1 - eps).
    assert loss.item() == pytest.approx(-4 * math.log(BCE_EPS), rel=1e-3)


def test_bce_mean_by_hand():
    scores = torch.tensor([[0.9, 0.2], [0.4, 0.8]])
    log = math.log
    positives = (log(0.9) + log(0.8)) / 2
    negatives = (log(1 - 0.2) + log(1 - 0.4)) / 4  # mean over all B² entries, diagonal zero
    assert bce_mean_loss(scores).item() == pytest.approx(-(positives + negatives), rel=1e-6)


def test_vse_hinge_max_violation_and_sum_by_hand():
    scores = torch.tensor([[0.5, 0.45, 0.1], [0.2, 0.6, 0.55], [0.3, 0.0, 0.9]])
    # Caption retrieval (rows): image 0: 0.2+0.45-0.5=0.15, 0.2+0.1-0.5<0; image 1: 0.2+0.2-0.6=0,
    # 0.2+0.55-0.6=0.15; image 2: 0.2+0.3-0.9<0 and 0.2-0.9<0.
    # Image retrieval (columns): caption 0: 0.2+0.2-0.5<0, 0.2+0.3-0.5=0; caption 1:
    # 0.2+0.45-0.6=0.05, 0.2+0.0-0.6<0; caption 2: 0.2+0.1-0.9<0, 0.2+0.55-0.9<0.
    assert vse_hinge_loss(scores).item() == pytest.approx(0.15 + 0.15 + 0.05, abs=1e-6)
    assert vse_hinge_loss(scores, max_violation=False).item() == pytest.approx(0.35, abs=1e-6)
    assert vse_hinge_loss(scores, margin=0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_losses_have_gradients_only_through_hardest_negatives():
    scores = torch.tensor([[0.9, 0.2, 0.6], [0.4, 0.8, 0.1], [0.3, 0.7, 0.5]], requires_grad=True)
    bce_hardest_negative_loss(scores).backward()
    # (1, 2) = 0.1 is the hardest negative of neither its row nor its column.
    assert scores.grad[1, 2] == 0 and scores.grad[0, 1] == 0
    assert scores.grad[0, 2] != 0 and scores.grad[2, 1] != 0


@pytest.mark.parametrize("loss", [bce_hardest_negative_loss, bce_mean_loss, vse_hinge_loss])
def test_losses_refuse_non_square_matrices(loss):
    with pytest.raises(ValueError, match="square"):
        loss(torch.rand(3, 4))


@pytest.mark.parametrize("variant", ["dense", "tiny"])
def test_official_score_matrix_gives_official_losses(variant):
    outputs = torch.load(PARITY_DIR / f"camp_{variant}_outputs.pt")
    scores = outputs["B_scores"]
    torch.testing.assert_close(
        bce_hardest_negative_loss(scores), outputs["B_loss_bce_hardest"], rtol=1e-5, atol=0
    )
    torch.testing.assert_close(bce_mean_loss(scores), outputs["B_loss_bce_mean"], rtol=1e-5, atol=0)

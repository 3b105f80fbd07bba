"""The bottom-up-attention post-processing that does not need detectron2, and the clear
failure when detectron2 is missing."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from model.vision.extractors.detectron2 import (
    ADAPTIVE_MAX_BOXES,
    ADAPTIVE_MIN_BOXES,
    DEFAULT_NUM_BOXES,
    POOLED_FEATURE_DIM,
    Detectron2Extractor,
    Detectron2Unavailable,
    box_iou,
    check_pooled_features,
    max_class_confidence,
    nms,
    normalise_boxes,
    select_boxes,
)

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None


def test_box_iou_known_values() -> None:
    a = np.array([[0, 0, 10, 10]], dtype=np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [3, 3, 3, 3]], dtype=np.float32)
    np.testing.assert_allclose(box_iou(a, b)[0], [1.0, 50 / 150, 0.0, 0.0])


def test_nms_keeps_the_best_of_each_overlapping_group_in_score_order() -> None:
    boxes = np.array(
        [[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 9], [51, 50, 61, 60]],
        dtype=np.float32,
    )
    scores = np.array([0.6, 0.9, 0.5, 0.3, 0.8], dtype=np.float32)
    np.testing.assert_array_equal(nms(boxes, scores, iou_threshold=0.3), [1, 4])
    # a box whose IoU equals the threshold survives (suppression needs IoU > threshold)
    pair = np.array([[0, 0, 10, 10], [0, 0, 10, 5]], dtype=np.float32)  # IoU exactly 0.5
    np.testing.assert_array_equal(nms(pair, np.array([0.9, 0.8]), iou_threshold=0.5), [0, 1])
    np.testing.assert_array_equal(nms(pair, np.array([0.9, 0.8]), iou_threshold=0.49), [0])
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.3).shape == (0,)


def butd_reference_confidence(
    boxes: np.ndarray, scores_with_bg: np.ndarray, threshold: float
) -> np.ndarray:
    """The loop of bottom-up-attention's generate_tsv.py, written out literally."""
    max_conf = np.zeros(boxes.shape[0])
    for cls_ind in range(1, scores_with_bg.shape[1]):
        cls_scores = scores_with_bg[:, cls_ind]
        keep = nms(boxes, cls_scores, threshold)
        max_conf[keep] = np.where(
            cls_scores[keep] > max_conf[keep], cls_scores[keep], max_conf[keep]
        )
    return max_conf


def test_max_class_confidence_matches_the_butd_loop() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 80, (60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 40, (60, 2))], axis=1).astype(np.float32)
    logits = rng.normal(0, 2, (60, 9))
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ours = max_class_confidence(boxes, scores[:, 1:].astype(np.float32), 0.3)
    np.testing.assert_allclose(ours, butd_reference_confidence(boxes, scores, 0.3), rtol=1e-6)


def test_max_class_confidence_by_hand_and_with_per_class_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [40, 40, 50, 50]], dtype=np.float32)
    scores = np.array([[0.7, 0.1], [0.2, 0.6], [0.05, 0.05]], dtype=np.float32)
    # class 0: box 0 (0.7) suppresses box 1; class 1: box 1 (0.6) suppresses box 0
    np.testing.assert_allclose(max_class_confidence(boxes, scores, 0.3), [0.7, 0.6, 0.05])
    per_class = np.stack([boxes, boxes + np.array([0, 0, 0, 0], dtype=np.float32)], axis=1)
    np.testing.assert_allclose(max_class_confidence(per_class, scores, 0.3), [0.7, 0.6, 0.05])
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        max_class_confidence(boxes, scores[:2], 0.3)


def test_select_boxes_follows_the_butd_rule() -> None:
    confidence = np.array([0.1, 0.9, 0.25, 0.05, 0.5, 0.19], dtype=np.float32)
    # 3 pass 0.2; within [2, 5] -> those 3, most confident first
    np.testing.assert_array_equal(
        select_boxes(confidence, confidence_threshold=0.2, min_boxes=2, max_boxes=5), [1, 4, 2]
    )
    # fewer than min pass -> topped up by confidence
    np.testing.assert_array_equal(
        select_boxes(confidence, confidence_threshold=0.6, min_boxes=3, max_boxes=5), [1, 4, 2]
    )
    # more than max pass -> cut by confidence
    np.testing.assert_array_equal(
        select_boxes(confidence, confidence_threshold=0.0, min_boxes=1, max_boxes=2), [1, 4]
    )
    # fewer candidates than min_boxes -> all of them
    assert len(select_boxes(confidence, min_boxes=10, max_boxes=100)) == 6
    with pytest.raises(ValueError, match="min_boxes <= max_boxes"):
        select_boxes(confidence, min_boxes=5, max_boxes=4)


def test_select_boxes_defaults_give_36_fixed_and_10_to_100_adaptive() -> None:
    confidence = np.linspace(0, 1, 300, dtype=np.float32)
    assert len(select_boxes(confidence)) == DEFAULT_NUM_BOXES == 36
    adaptive = {"min_boxes": ADAPTIVE_MIN_BOXES, "max_boxes": ADAPTIVE_MAX_BOXES}
    assert len(select_boxes(confidence, **adaptive)) == 100  # 240 pass 0.2 -> capped
    assert len(select_boxes(confidence * 0.1, **adaptive)) == 10  # none pass -> floor
    middle = np.where(np.arange(300) < 50, 0.5, 0.01).astype(np.float32)
    assert len(select_boxes(middle, **adaptive)) == 50


def test_normalise_boxes_clips_to_the_image() -> None:
    boxes = np.array([[0, 0, 320, 240], [-5, 10, 700, 250]], dtype=np.float64)
    out = normalise_boxes(boxes, (640, 480))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0, 0, 0.5, 0.5], [0, 10 / 480, 1, 250 / 480]], rtol=1e-6)


def test_check_pooled_features_shapes() -> None:
    good = np.ones((36, POOLED_FEATURE_DIM), dtype=np.float16)
    assert check_pooled_features(good, 36).dtype == np.float32
    with pytest.raises(ValueError, match=r"\[36, 2048\]"):
        check_pooled_features(np.ones((36, 1024)), 36)
    with pytest.raises(ValueError, match=r"\[10, 2048\]"):
        check_pooled_features(good, 10)
    bad = good.astype(np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        check_pooled_features(bad, 36)


@pytest.mark.skipif(HAS_DETECTRON2, reason="checks the message shown when detectron2 is missing")
def test_missing_detectron2_says_how_to_install_it(tmp_path) -> None:
    weights, config = tmp_path / "w.pkl", tmp_path / "c.yaml"
    with pytest.raises(Detectron2Unavailable) as info:
        Detectron2Extractor(weights=weights, config_file=config, device="cpu")
    message = str(info.value)
    assert "pip install 'git+https://github.com/facebookresearch/detectron2.git'" in message
    assert "bottom-up-attention" in message and "'grid'" in message
    assert isinstance(info.value, ImportError)


def test_detectron2_settings_are_validated_before_importing_it() -> None:
    with pytest.raises(ValueError, match="min_boxes <= max_boxes"):
        Detectron2Extractor(weights="w", config_file="c", min_boxes=50, max_boxes=10, device="cpu")
    with pytest.raises(ValueError, match="needs weights, config_file"):
        Detectron2Extractor.from_config({})

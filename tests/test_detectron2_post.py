"""The bottom-up-attention post-processing that does not need detectron2, and the clear
failure when detectron2 is missing."""

from __future__ import annotations

import importlib.util
import types

import numpy as np
import pytest
import torch
from PIL import Image

from model.vision.extractors import InvalidExtractorConfig, check_extractor_config
from model.vision.extractors.detectron2 import (
    ADAPTIVE_MAX_BOXES,
    ADAPTIVE_MIN_BOXES,
    DEFAULT_NUM_BOXES,
    INSTALL_HINT,
    POOLED_FEATURE_DIM,
    VERSION,
    Detectron2Extractor,
    Detectron2Unavailable,
    box_iou,
    butd_version,
    check_pooled_features,
    class_nms_keep,
    detected_regions,
    max_class_confidence,
    nms,
    normalise_boxes,
    object_class_scores,
    select_boxes,
    whole_image_box,
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
    """The loop of bottom-up-attention's generate_tsv.py, written out literally (over the
    object columns of detectron2's order: background last)."""
    max_conf = np.zeros(boxes.shape[0])
    for cls_ind in range(scores_with_bg.shape[1] - 1):
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
    ours = max_class_confidence(boxes, scores[:, :-1].astype(np.float32), 0.3)
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


def random_boxes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Crowded boxes (many overlaps around the threshold), some of them degenerate."""
    xy = rng.uniform(0, 60, (*shape, 2))
    size = rng.uniform(0, 40, (*shape, 2)) * (rng.random((*shape, 1)) > 0.05)
    return np.concatenate([xy, xy + size], axis=-1).astype(np.float32)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("per_class_boxes", [False, True])
def test_batched_class_nms_keeps_what_greedy_nms_keeps_class_by_class(
    seed: int, per_class_boxes: bool
) -> None:
    rng = np.random.default_rng(seed)
    num_boxes, num_classes = int(rng.integers(1, 90)), int(rng.integers(1, 40))
    shape = (num_boxes, num_classes) if per_class_boxes else (num_boxes,)
    boxes = random_boxes(rng, shape)
    scores = rng.random((num_boxes, num_classes)).astype(np.float32)
    if seed % 3 == 0:  # many ties: the stable order must match too
        scores = np.round(scores * 4) / 4
    threshold = float(rng.choice([0.3, 0.5, 0.7]))
    kept = class_nms_keep(boxes, scores, threshold)
    assert kept.shape == (num_boxes, num_classes)
    for c in range(num_classes):
        class_boxes = boxes[:, c] if per_class_boxes else boxes
        reference = nms(class_boxes, scores[:, c], threshold)
        np.testing.assert_array_equal(np.flatnonzero(kept[:, c]), np.sort(reference))


def test_batched_class_nms_at_the_butd_size_matches_the_reference_loop() -> None:
    rng = np.random.default_rng(7)
    boxes = random_boxes(rng, (300,))
    logits = rng.normal(0, 3, (300, 1601))
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ours = max_class_confidence(boxes, object_class_scores(scores).astype(np.float32), 0.3)
    reference = butd_reference_confidence(boxes, scores.astype(np.float32), 0.3)
    np.testing.assert_array_equal(ours, reference.astype(np.float32))
    assert max_class_confidence(np.zeros((0, 4)), np.zeros((0, 5)), 0.3).shape == (0,)


def test_the_background_is_the_last_score_column() -> None:
    boxes = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], dtype=np.float32)
    # columns: two object classes, then the background. Box 0 is background-sure; chosen by
    # the background column (the old bug) it would win, chosen by objects box 1 does.
    scores = np.array(
        [[0.04, 0.04, 0.92], [0.80, 0.10, 0.10], [0.05, 0.55, 0.40]], dtype=np.float32
    )
    np.testing.assert_array_equal(object_class_scores(scores), scores[:, :2])
    pooled = np.arange(3, dtype=np.float32)[:, None].repeat(POOLED_FEATURE_DIM, 1)
    kept_boxes, features = detected_regions(
        boxes, scores, pooled, (50, 10), min_boxes=1, max_boxes=2, confidence_threshold=0.5
    )
    np.testing.assert_array_equal(features[:, 0], [1, 2])  # box 1 (0.80), box 2 (0.55)
    np.testing.assert_allclose(kept_boxes, [[0.4, 0, 0.6, 1], [0.8, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"\[N, C\+1\]"):
        object_class_scores(scores[:, :1])


def test_a_photo_without_proposals_gets_the_whole_image() -> None:
    box = whole_image_box((640, 480))
    np.testing.assert_array_equal(box, [[0, 0, 640, 480]])
    scores = np.array([[0.01, 0.01, 0.98]], dtype=np.float32)  # nothing above threshold
    pooled = np.ones((1, POOLED_FEATURE_DIM), dtype=np.float32)
    kept_boxes, features = detected_regions(box, scores, pooled, (640, 480), min_boxes=10)
    np.testing.assert_array_equal(kept_boxes, [[0, 0, 1, 1]])
    assert features.shape == (1, POOLED_FEATURE_DIM)


def test_the_version_names_every_setting_that_changes_features() -> None:
    settings = {
        "min_boxes": 10,
        "max_boxes": 100,
        "confidence_threshold": 0.2,
        "nms_threshold": 0.3,
        "weights": "/models/faster_rcnn_from_caffe.pkl",
    }
    version = butd_version(**settings)
    assert version == "butd-r101-vg-10-100-c0.2-n0.3-faster_rcnn_from_caffe-v2"
    assert VERSION == "2"
    for key, other in (("max_boxes", 36), ("confidence_threshold", 0.3), ("weights", "w.pth")):
        assert butd_version(**{**settings, key: other}) != version


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
    weights.write_bytes(b"weights")
    config.write_text("MODEL: {}\n")
    with pytest.raises(Detectron2Unavailable) as info:
        Detectron2Extractor(weights=weights, config_file=config, device="cpu")
    message = str(info.value)
    assert "pip install 'git+https://github.com/facebookresearch/detectron2.git'" in message
    assert "bottom-up-attention" in message and "'grid'" in message
    assert "CAMPSEARCH_DETECTRON2_CONFIG" in message and "CAMPSEARCH_DETECTRON2_WEIGHTS" in message
    assert isinstance(info.value, ImportError)


def test_a_missing_config_or_weights_file_is_named_with_its_setting(tmp_path) -> None:
    config = tmp_path / "butd.yaml"
    with pytest.raises(Detectron2Unavailable, match="CAMPSEARCH_DETECTRON2_CONFIG") as info:
        Detectron2Extractor(weights=tmp_path / "w.pth", config_file=config, device="cpu")
    assert str(config) in str(info.value)
    config.write_text("MODEL: {}\n")
    with pytest.raises(Detectron2Unavailable, match=r"weights .*w\.pth.* does not exist"):
        Detectron2Extractor(weights=tmp_path / "w.pth", config_file=config, device="cpu")


def test_detectron2_settings_are_validated_before_importing_it() -> None:
    with pytest.raises(ValueError, match="min_boxes <= max_boxes"):
        Detectron2Extractor(weights="w", config_file="c", min_boxes=50, max_boxes=10, device="cpu")
    with pytest.raises(ValueError, match="needs weights, config_file"):
        Detectron2Extractor.from_config({})
    with pytest.raises(InvalidExtractorConfig, match="needs config_file") as info:
        check_extractor_config("detectron2", {"weights": "w.pth", "max_boxes": 100})
    assert INSTALL_HINT in str(info.value)
    with pytest.raises(InvalidExtractorConfig, match=r"unknown setting.*max_box"):
        check_extractor_config("detectron2", {"weights": "w", "config_file": "c", "max_box": 9})
    check_extractor_config("detectron2", {"weights": "w", "config_file": "c", "max_boxes": 100})


class FakeBoxes:
    """detectron2's `Boxes` as the extractor uses it: `.tensor` [N, 4] and `len`."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __len__(self) -> int:
        return len(self.tensor)


class FakeDetector(torch.nn.Module):
    """The parts of a detectron2 GeneralizedRCNN + Res5ROIHeads the extractor calls, so its
    batching runs without detectron2: proposals are given per image (in resized pixels), a
    box's pooled feature is one-hot at its class (each box less sure than the one before), and
    logits follow the features."""

    def __init__(self, proposals_per_image: list[np.ndarray]) -> None:
        super().__init__()
        self.proposals_per_image = proposals_per_image
        self.backbone_batches: list[tuple[int, ...]] = []
        self.roi_heads = self
        self.in_features = ["res4"]
        self.box_predictor = self._predict

    def preprocess_image(self, inputs: list[dict[str, torch.Tensor]]) -> types.SimpleNamespace:
        height = max(item["image"].shape[1] for item in inputs)
        width = max(item["image"].shape[2] for item in inputs)
        padded = torch.zeros(len(inputs), 3, height, width)
        for index, item in enumerate(inputs):
            padded[index, :, : item["image"].shape[1], : item["image"].shape[2]] = item["image"]
        sizes = [tuple(item["image"].shape[1:]) for item in inputs]
        return types.SimpleNamespace(tensor=padded, image_sizes=sizes)

    def backbone(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        self.backbone_batches.append(tuple(tensor.shape))
        return {"res4": tensor}

    def proposal_generator(self, batch, features, targets) -> tuple[list, dict]:
        proposals = [
            types.SimpleNamespace(proposal_boxes=FakeBoxes(torch.from_numpy(boxes)))
            for boxes in self.proposals_per_image
        ]
        return proposals, {}

    def _shared_roi_transform(self, features, boxes: list[FakeBoxes]) -> torch.Tensor:
        count = sum(len(b) for b in boxes)
        out = torch.zeros(count, POOLED_FEATURE_DIM, 2, 2)
        boxes_index = torch.arange(count)
        strength = (1.0 - 0.1 * boxes_index)[:, None, None]
        out[boxes_index, boxes_index % 1600] = strength  # box i: class i, less sure
        return out

    def _predict(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pooled[:, :1601] * 12.0, torch.zeros(len(pooled), 4)


def test_images_go_through_the_detector_as_one_batch(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # first photo: three boxes far apart; second photo: the detector proposes nothing
    far_apart = np.array([[0, 0, 100, 100], [200, 0, 300, 100], [0, 200, 100, 300]], "float32")
    detector = FakeDetector([far_apart, np.zeros((0, 4), dtype=np.float32)])
    monkeypatch.setattr(
        Detectron2Extractor, "_build_model", lambda self: (detector, "BGR", FakeBoxes)
    )
    extractor = Detectron2Extractor(
        weights="w.pth", config_file="c.yaml", min_boxes=1, max_boxes=10, device="cpu"
    )
    photos = [Image.new("RGB", (60, 40), "red"), Image.new("RGB", (30, 50), "blue")]
    first, second = extractor.extract(photos)
    # one backbone call for both photos, resized (900 x 600, 600 x 1000) and padded together
    assert detector.backbone_batches == [(2, 3, 1000, 900)]
    # 60 x 40 is scaled by 15 (short edge 600): boxes back in original pixels, normalised
    np.testing.assert_allclose(first.boxes, far_apart / 15 / [60, 40, 60, 40], rtol=1e-6)
    assert first.features.shape == (3, POOLED_FEATURE_DIM) and first.extractor_version.endswith(
        "-v2"
    )
    # nothing proposed: the whole photo is its one region
    np.testing.assert_array_equal(second.boxes, [[0, 0, 1, 1]])
    assert second.features.shape == (1, POOLED_FEATURE_DIM)

"""The bottom-up-attention Faster R-CNN extractor (ResNet-101 C4, Visual Genome 1600 classes),
the detector SCAN, CAMP and IMRAM features come from: 2048-d mean-pooled res5 box features.

detectron2 is not on PyPI and is imported only when an extractor is built. Everything that
does not need it (per-class NMS, the box-selection rule of the original
`generate_tsv.py`, box normalisation, feature shape checks) is a plain numpy function here
with its own tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.devices import DEVICE_AUTO
from model.types import RegionFeatures
from model.vision.extractors.base import (
    InvalidExtractorConfig,
    RegionExtractor,
    check_config_keys,
    register_extractor,
)

POOLED_FEATURE_DIM = 2048
NUM_VG_CLASSES = 1600  # object classes, background excluded
DEFAULT_NUM_BOXES = 36  # fixed count of the released SCAN/CAMP features
ADAPTIVE_MIN_BOXES = 10  # the adaptive 10-100 setting of bottom-up attention
ADAPTIVE_MAX_BOXES = 100
DEFAULT_CONFIDENCE_THRESHOLD = 0.2
DEFAULT_NMS_THRESHOLD = 0.3
DEFAULT_BATCH_SIZE = 4
TEST_SHORT_EDGE = 600  # BUTD test-time resizing
TEST_MAX_SIZE = 1000
VERSION = "1"

INSTALL_HINT = (
    "the 'detectron2' extractor needs detectron2, which is not on PyPI. Install it from source "
    "(pip install 'git+https://github.com/facebookresearch/detectron2.git', matching your torch "
    "and CUDA; the Visual Genome config uses keys of the bottom-up-attention fork, "
    "pip install 'git+https://github.com/airsplay/py-bottom-up-attention.git'), then pass its "
    "config 'VG-Detection/faster_rcnn_R_101_C4_caffe.yaml' as config_file and the Visual Genome "
    "weights ('faster_rcnn_from_caffe.pkl') as weights. Or use the embedded 'grid' extractor."
)


class Detectron2Unavailable(ImportError):
    """detectron2 (or the bottom-up-attention weights/config) is not installed."""


# --- post-processing: plain numpy -----------------------------------------------------------


def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU [N, M] of (x0, y0, x1, y1) boxes [N, 4] and [M, 4]; 0 where a union is empty."""
    x0 = np.maximum(boxes[:, None, 0], others[None, :, 0])
    y0 = np.maximum(boxes[:, None, 1], others[None, :, 1])
    x1 = np.minimum(boxes[:, None, 2], others[None, :, 2])
    y1 = np.minimum(boxes[:, None, 3], others[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_b = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter, dtype=np.float64), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression: indices of kept boxes, highest score first. A box is
    dropped when its IoU with a kept, higher-scoring box exceeds `iou_threshold`."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        overlaps = box_iou(boxes[best : best + 1], boxes[rest])[0]
        order = rest[overlaps <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def max_class_confidence(
    boxes: np.ndarray, class_scores: np.ndarray, nms_threshold: float = DEFAULT_NMS_THRESHOLD
) -> np.ndarray:
    """Per-box confidence [N] as bottom-up attention defines it: for each object class, NMS
    over that class's scores; a box's confidence is its highest score in a class where it
    survived NMS (0 if it survived in none).

    boxes: [N, 4] shared by all classes (the original uses the proposals) or [N, C, 4] per
    class. class_scores: [N, C] softmax scores, background column removed.
    """
    if class_scores.ndim != 2 or class_scores.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"class_scores must be [N, C] with N = {boxes.shape[0]}, got {class_scores.shape}"
        )
    per_class = boxes.ndim == 3
    if per_class and boxes.shape[1] != class_scores.shape[1]:
        raise ValueError(f"per-class boxes {boxes.shape} do not match scores {class_scores.shape}")
    confidence = np.zeros(class_scores.shape[0], dtype=np.float32)
    for c in range(class_scores.shape[1]):
        scores = class_scores[:, c]
        keep = nms(boxes[:, c] if per_class else boxes, scores, nms_threshold)
        confidence[keep] = np.maximum(confidence[keep], scores[keep])
    return confidence


def select_boxes(
    confidence: np.ndarray,
    *,
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    min_boxes: int = DEFAULT_NUM_BOXES,
    max_boxes: int = DEFAULT_NUM_BOXES,
) -> np.ndarray:
    """Indices of the boxes to keep, most confident first: those with confidence >=
    threshold, topped up to `min_boxes` or cut to `max_boxes` by confidence. With fewer than
    `min_boxes` candidates, all of them are returned."""
    if not 1 <= min_boxes <= max_boxes:
        raise ValueError(f"need 1 <= min_boxes <= max_boxes, got {min_boxes}, {max_boxes}")
    order = np.argsort(-confidence, kind="stable")
    passing = int((confidence >= confidence_threshold).sum())
    count = min(max(passing, min_boxes), max_boxes, confidence.shape[0])
    return order[:count]


def normalise_boxes(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Pixel boxes [R, 4] of an image of (width, height) -> float32 [0, 1] boxes, clipped."""
    width, height = image_size
    scale = np.array([width, height, width, height], dtype=np.float32)
    return np.clip(np.asarray(boxes, dtype=np.float32) / scale, 0.0, 1.0)


def check_pooled_features(features: np.ndarray, num_boxes: int) -> np.ndarray:
    """Check pooled box features are [num_boxes, 2048] and finite; return them as float32."""
    if features.shape != (num_boxes, POOLED_FEATURE_DIM):
        raise ValueError(
            f"pooled box features must be [{num_boxes}, {POOLED_FEATURE_DIM}] (one mean-pooled "
            f"res5 vector per kept box), got {tuple(features.shape)}"
        )
    if not np.isfinite(features).all():
        raise ValueError("pooled box features contain NaN or inf")
    return np.asarray(features, dtype=np.float32)


# --- the extractor --------------------------------------------------------------------------


@register_extractor("detectron2")
class Detectron2Extractor(RegionExtractor):
    """Bottom-up-attention boxes and their 2048-d features.

    Defaults give the fixed 36 boxes of the released SCAN/CAMP features; min_boxes=10,
    max_boxes=100 gives the adaptive setting. Construction fails with Detectron2Unavailable
    (saying what to install) when detectron2, the config or the weights are missing.
    """

    CONFIG_KEYS = (
        "weights",
        "config_file",
        "min_boxes",
        "max_boxes",
        "confidence_threshold",
        "nms_threshold",
        "batch_size",
        "device",
    )

    def __init__(
        self,
        *,
        weights: str | Path,
        config_file: str | Path,
        min_boxes: int = DEFAULT_NUM_BOXES,
        max_boxes: int = DEFAULT_NUM_BOXES,
        confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
        nms_threshold: float = DEFAULT_NMS_THRESHOLD,
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str | torch.device = DEVICE_AUTO,
    ) -> None:
        super().__init__(batch_size=batch_size, device=device)
        if not 1 <= min_boxes <= max_boxes:
            raise InvalidExtractorConfig(
                f"need 1 <= min_boxes <= max_boxes, got {min_boxes}, {max_boxes}"
            )
        if not 0.0 <= confidence_threshold <= 1.0 or not 0.0 < nms_threshold <= 1.0:
            raise InvalidExtractorConfig(
                "confidence_threshold must be in [0, 1], nms_threshold in (0, 1]"
            )
        self.min_boxes, self.max_boxes = min_boxes, max_boxes
        self.confidence_threshold = confidence_threshold
        self.nms_threshold = nms_threshold
        self.weights, self.config_file = Path(weights), Path(config_file)
        self._model = self._build_model()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Detectron2Extractor:
        check_config_keys(config, cls.CONFIG_KEYS, "detectron2")
        missing = [key for key in ("weights", "config_file") if not config.get(key)]
        if missing:
            raise InvalidExtractorConfig(
                f"the 'detectron2' extractor needs {', '.join(missing)}; {INSTALL_HINT}"
            )
        return cls(**dict(config))

    @property
    def version(self) -> str:
        return (
            f"butd-r101-vg-{self.min_boxes}-{self.max_boxes}-c{self.confidence_threshold:g}"
            f"-n{self.nms_threshold:g}-{self.weights.stem}-v{VERSION}"
        )

    @property
    def feature_dim(self) -> int:
        return POOLED_FEATURE_DIM

    @property
    def num_regions(self) -> int:
        return self.max_boxes

    def _build_model(self) -> Any:
        try:
            from detectron2.checkpoint import DetectionCheckpointer
            from detectron2.config import get_cfg
            from detectron2.modeling import build_model
        except ImportError as exc:
            raise Detectron2Unavailable(INSTALL_HINT) from exc
        for path, what in ((self.config_file, "config_file"), (self.weights, "weights")):
            if not path.is_file():
                raise Detectron2Unavailable(f"{what} {str(path)!r} does not exist; {INSTALL_HINT}")
        cfg = get_cfg()
        cfg.merge_from_file(str(self.config_file))
        cfg.MODEL.WEIGHTS = str(self.weights)
        cfg.MODEL.DEVICE = str(self.device)
        model = build_model(cfg)
        DetectionCheckpointer(model).load(str(self.weights))
        return model.eval()

    @torch.inference_mode()
    def _extract_batch(self, images: Sequence[Image.Image]) -> list[RegionFeatures]:
        return [self._extract_one(image) for image in images]

    def _extract_one(self, image: Image.Image) -> RegionFeatures:
        """Proposals -> res5 box features (mean-pooled) -> class scores -> BUTD selection,
        as the bottom-up-attention `generate_tsv.py` does it (boxes are the proposals)."""
        model = self._model
        width, height = image.size
        scale = min(TEST_SHORT_EDGE / min(width, height), TEST_MAX_SIZE / max(width, height))
        resized = image.resize(
            (round(width * scale), round(height * scale)), Image.Resampling.BILINEAR
        )
        bgr = torch.from_numpy(np.asarray(resized)[:, :, ::-1].copy()).permute(2, 0, 1)
        batch = model.preprocess_image([{"image": bgr.to(self.device)}])  # normalised, padded
        features = model.backbone(batch.tensor)
        proposals, _ = model.proposal_generator(batch, features, None)
        proposal_boxes = [proposals[0].proposal_boxes]
        in_features = [features[name] for name in model.roi_heads.in_features]
        box_features = model.roi_heads._shared_roi_transform(in_features, proposal_boxes)
        pooled = box_features.mean(dim=(2, 3))  # [N, 2048]
        logits, _ = model.roi_heads.box_predictor(pooled)
        class_scores = torch.softmax(logits, dim=-1)[:, 1:]  # background is column 0
        boxes_px = proposal_boxes[0].tensor / scale
        boxes_np = boxes_px.cpu().numpy()
        confidence = max_class_confidence(
            boxes_np, class_scores.float().cpu().numpy(), self.nms_threshold
        )
        keep = select_boxes(
            confidence,
            confidence_threshold=self.confidence_threshold,
            min_boxes=self.min_boxes,
            max_boxes=self.max_boxes,
        )
        return RegionFeatures(
            boxes=normalise_boxes(boxes_np[keep], (width, height)),
            features=check_pooled_features(pooled[keep].float().cpu().numpy(), len(keep)),
            image_size=(width, height),
            extractor=self.name,
            extractor_version=self.version,
        )

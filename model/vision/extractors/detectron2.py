"""The bottom-up-attention Faster R-CNN extractor (ResNet-101 C4, Visual Genome 1600 classes),
the detector SCAN, CAMP and IMRAM features come from: 2048-d mean-pooled res5 box features.

detectron2 is not on PyPI and is imported only when an extractor is built. Everything that
does not need it (class-wise NMS of all classes in one batched pass, the box-selection rule of
the original `generate_tsv.py`, box normalisation, feature shape checks) is a plain numpy
function here with its own tests.

The config and weights follow upstream detectron2's conventions: the box predictor's scores
are [N, C+1] with the background LAST. The Caffe original put it first; detectron2's
checkpointer moves that row to the end itself when it loads Caffe2-format weights (a `.pkl`
without `__author__`, `c2_model_loading.py`), and weights in detectron2's own format must
already have it last. A list of photos runs through the
backbone, the RPN and the res5 head as one padded batch of `batch_size`.
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
VERSION = "2"  # 2: background is the last score column; batched images

INSTALL_HINT = (
    "the 'detectron2' extractor needs detectron2, which is not on PyPI. Install it from source "
    "(pip install 'git+https://github.com/facebookresearch/detectron2.git', matching your torch "
    "and CUDA), then give the bottom-up-attention config (a yaml in upstream detectron2 keys: "
    "ResNet-101 C4, 1600 Visual Genome classes + background, res5 box head) as config_file and "
    "its Visual Genome weights as weights: settings CAMPSEARCH_DETECTRON2_CONFIG and "
    "CAMPSEARCH_DETECTRON2_WEIGHTS, or extract's --config-file and --weights. Or use the "
    "embedded 'grid' extractor."
)


class Detectron2Unavailable(ImportError):
    """detectron2 (or the bottom-up-attention weights/config) is not installed."""


# --- post-processing: plain numpy -----------------------------------------------------------


def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU [..., N, M] of (x0, y0, x1, y1) boxes [..., N, 4] and [..., M, 4] (leading dims
    broadcast); 0 where a union is empty."""
    x0 = np.maximum(boxes[..., :, None, 0], others[..., None, :, 0])
    y0 = np.maximum(boxes[..., :, None, 1], others[..., None, :, 1])
    x1 = np.minimum(boxes[..., :, None, 2], others[..., None, :, 2])
    y1 = np.minimum(boxes[..., :, None, 3], others[..., None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    area_b = (others[..., 2] - others[..., 0]) * (others[..., 3] - others[..., 1])
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter, dtype=np.float64), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression: indices of kept boxes, highest score first. A box is
    dropped when its IoU with a kept, higher-scoring box exceeds `iou_threshold`. The
    reference that `class_nms_keep` reproduces for all classes at once."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        overlaps = box_iou(boxes[best : best + 1], boxes[rest])[0]
        order = rest[overlaps <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def class_nms_keep(boxes: np.ndarray, class_scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS of every class at once: bool [N, C], True where box n survives class c's NMS.

    The same kept sets as `nms` run class by class (same IoU arithmetic, same stable order by
    descending score), but one pass over score ranks handles all C classes together: at rank
    k each class looks at its k-th best box, keeps it unless a box it kept earlier overlaps
    it, and a kept box marks what it overlaps. N steps of [C, N] array work instead of C
    Python-level NMS calls (1,600 for Visual Genome).

    boxes: [N, 4] shared by all classes (the proposals) or [N, C, 4] per class.
    """
    num_boxes, num_classes = class_scores.shape
    if boxes.ndim == 2:
        overlapping = box_iou(boxes, boxes) > iou_threshold  # [N, N], shared by every class
    else:
        per_class = np.ascontiguousarray(boxes.transpose(1, 0, 2))  # [C, N, 4]
        overlapping = box_iou(per_class, per_class) > iou_threshold  # [C, N, N]
    order = np.argsort(-class_scores.T, axis=1, kind="stable")  # [C, N], best first
    classes = np.arange(num_classes)
    kept = np.zeros((num_classes, num_boxes), dtype=bool)
    suppressed = np.zeros((num_classes, num_boxes), dtype=bool)
    for rank in range(num_boxes):
        candidate = order[:, rank]  # each class's box at this rank
        survives = ~suppressed[classes, candidate]
        kept[classes, candidate] = survives
        rows = overlapping[candidate] if boxes.ndim == 2 else overlapping[classes, candidate]
        suppressed |= rows & survives[:, None]
    return kept.T


def max_class_confidence(
    boxes: np.ndarray, class_scores: np.ndarray, nms_threshold: float = DEFAULT_NMS_THRESHOLD
) -> np.ndarray:
    """Per-box confidence [N] as bottom-up attention defines it: for each object class, NMS
    over that class's scores; a box's confidence is its highest score in a class where it
    survived NMS (0 if it survived in none).

    boxes: [N, 4] shared by all classes (the original uses the proposals) or [N, C, 4] per
    class. class_scores: [N, C] softmax scores of the object classes, background removed
    (`object_class_scores`).
    """
    if class_scores.ndim != 2 or class_scores.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"class_scores must be [N, C] with N = {boxes.shape[0]}, got {class_scores.shape}"
        )
    if boxes.ndim == 3 and boxes.shape[1] != class_scores.shape[1]:
        raise ValueError(f"per-class boxes {boxes.shape} do not match scores {class_scores.shape}")
    if class_scores.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    kept = class_nms_keep(boxes, class_scores, nms_threshold)
    return np.where(kept, class_scores, 0).max(axis=1).astype(np.float32)


def object_class_scores(scores_with_background: np.ndarray) -> np.ndarray:
    """[N, C+1] softmax scores as detectron2's FastRCNNOutputLayers gives them -> [N, C].

    detectron2 puts the background LAST (index C); the Caffe original put it first. Boxes
    must be chosen by object confidence, never by the background's."""
    if scores_with_background.ndim != 2 or scores_with_background.shape[1] < 2:
        raise ValueError(
            "scores must be [N, C+1] (object classes then background), "
            f"got {scores_with_background.shape}"
        )
    return scores_with_background[:, :-1]


def whole_image_box(image_size: tuple[int, int]) -> np.ndarray:
    """float32 [1, 4]: the box of a whole (width, height) image, the one region a photo gets
    when the detector proposes nothing at all."""
    width, height = image_size
    return np.array([[0.0, 0.0, float(width), float(height)]], dtype=np.float32)


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


def detected_regions(
    boxes_px: np.ndarray,
    scores_with_background: np.ndarray,
    pooled: np.ndarray,
    image_size: tuple[int, int],
    *,
    min_boxes: int = DEFAULT_NUM_BOXES,
    max_boxes: int = DEFAULT_NUM_BOXES,
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
    nms_threshold: float = DEFAULT_NMS_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray]:
    """One image's detections -> (normalised boxes [R, 4], features [R, 2048]), as the
    bottom-up-attention `generate_tsv.py` chooses them: boxes are the proposals (pixels of the
    original image), confidence per box from class-wise NMS of the object scores
    (`scores_with_background` [N, C+1], detectron2's order), then `select_boxes`."""
    confidence = max_class_confidence(
        boxes_px, object_class_scores(scores_with_background), nms_threshold
    )
    keep = select_boxes(
        confidence,
        confidence_threshold=confidence_threshold,
        min_boxes=min_boxes,
        max_boxes=max_boxes,
    )
    return (
        normalise_boxes(boxes_px[keep], image_size),
        check_pooled_features(pooled[keep], len(keep)),
    )


def butd_version(
    *,
    min_boxes: int,
    max_boxes: int,
    confidence_threshold: float,
    nms_threshold: float,
    weights: str | Path,
) -> str:
    """The extractor version for these settings (features differ whenever it does); a
    checkpoint records it so a service can tell whether it extracts what the model saw."""
    return (
        f"butd-r101-vg-{min_boxes}-{max_boxes}-c{confidence_threshold:g}"
        f"-n{nms_threshold:g}-{Path(weights).stem}-v{VERSION}"
    )


def butd_input_scale(image_size: tuple[int, int]) -> float:
    """BUTD test-time resizing: shorter side to 600 px unless the longer would pass 1000."""
    width, height = image_size
    return min(TEST_SHORT_EDGE / min(width, height), TEST_MAX_SIZE / max(width, height))


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
    REQUIRED_KEYS = ("weights", "config_file")

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
        self._model, self._input_format, self._boxes_type = self._build_model()

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        super().check_config(config)
        missing = [key for key in cls.REQUIRED_KEYS if not config.get(key)]
        if missing:
            raise InvalidExtractorConfig(
                f"the 'detectron2' extractor needs {', '.join(missing)}; {INSTALL_HINT}"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Detectron2Extractor:
        cls.check_config(config)
        return cls(**dict(config))

    @property
    def version(self) -> str:
        return butd_version(
            min_boxes=self.min_boxes,
            max_boxes=self.max_boxes,
            confidence_threshold=self.confidence_threshold,
            nms_threshold=self.nms_threshold,
            weights=self.weights,
        )

    @property
    def feature_dim(self) -> int:
        return POOLED_FEATURE_DIM

    @property
    def num_regions(self) -> int:
        return self.max_boxes

    def _build_model(self) -> tuple[Any, str, Any]:
        """(model in eval mode, its input channel order, detectron2's Boxes type). The files
        are checked first so a wrong path is named even where detectron2 is missing."""
        for path, what, setting in (
            (self.config_file, "config_file", "CAMPSEARCH_DETECTRON2_CONFIG"),
            (self.weights, "weights", "CAMPSEARCH_DETECTRON2_WEIGHTS"),
        ):
            if not path.is_file():
                raise Detectron2Unavailable(
                    f"the detectron2 {what} {str(path)!r} does not exist (set {setting} or the "
                    f"extract command's --{what.replace('_', '-')}); {INSTALL_HINT}"
                )
        try:
            from detectron2.checkpoint import DetectionCheckpointer
            from detectron2.config import get_cfg
            from detectron2.modeling import build_model
            from detectron2.structures import Boxes
        except ImportError as exc:
            raise Detectron2Unavailable(INSTALL_HINT) from exc
        cfg = get_cfg()
        cfg.merge_from_file(str(self.config_file))
        cfg.MODEL.WEIGHTS = str(self.weights)
        cfg.MODEL.DEVICE = str(self.device)
        model = build_model(cfg)
        DetectionCheckpointer(model).load(str(self.weights))
        return model.eval(), str(cfg.INPUT.FORMAT), Boxes

    def _network_input(self, image: Image.Image) -> tuple[dict[str, torch.Tensor], float]:
        """The resized [3, H, W] uint8 tensor in the config's channel order, and its scale."""
        scale = butd_input_scale(image.size)
        width, height = image.size
        resized = image.resize(
            (round(width * scale), round(height * scale)), Image.Resampling.BILINEAR
        )
        pixels = np.asarray(resized)
        if self._input_format == "BGR":
            pixels = pixels[:, :, ::-1]
        tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
        return {"image": tensor.to(self.device)}, scale

    @torch.inference_mode()
    def _extract_batch(self, images: Sequence[Image.Image]) -> list[RegionFeatures]:
        """One detectron2 batch: backbone, proposals and res5 box features for all `images`
        together, then each image's BUTD selection (boxes are the proposals, as in
        `generate_tsv.py`)."""
        model = self._model
        inputs, scales = zip(*(self._network_input(image) for image in images), strict=True)
        batch = model.preprocess_image(list(inputs))  # normalised, padded to one tensor
        features = model.backbone(batch.tensor)
        proposals, _ = model.proposal_generator(batch, features, None)
        proposal_boxes = []
        for instances, (height, width) in zip(proposals, batch.image_sizes, strict=True):
            boxes = instances.proposal_boxes
            if len(boxes) == 0:  # nothing proposed: the whole image is the one region
                whole = torch.from_numpy(whole_image_box((width, height)))
                boxes = self._boxes_type(whole.to(self.device))
            proposal_boxes.append(boxes)
        in_features = [features[name] for name in model.roi_heads.in_features]
        box_features = model.roi_heads._shared_roi_transform(in_features, proposal_boxes)
        pooled = box_features.mean(dim=(2, 3))  # [sum of N, 2048]
        logits, _ = model.roi_heads.box_predictor(pooled)
        scores = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        pooled_np = pooled.float().cpu().numpy()
        results: list[RegionFeatures] = []
        start = 0
        for image, boxes, scale in zip(images, proposal_boxes, scales, strict=True):
            stop = start + len(boxes)
            kept_boxes, kept_features = detected_regions(
                boxes.tensor.float().cpu().numpy() / scale,
                scores[start:stop],
                pooled_np[start:stop],
                image.size,
                min_boxes=self.min_boxes,
                max_boxes=self.max_boxes,
                confidence_threshold=self.confidence_threshold,
                nms_threshold=self.nms_threshold,
            )
            results.append(
                RegionFeatures(
                    boxes=kept_boxes,
                    features=kept_features,
                    image_size=image.size,
                    extractor=self.name,
                    extractor_version=self.version,
                )
            )
            start = stop
        return results

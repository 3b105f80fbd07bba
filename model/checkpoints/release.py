"""An official CAMP or IMRAM release (weights + vocabulary file) turned into one servable
checkpoint.

`import_official_checkpoint` (checkpoint.py) maps the weights; this adds what the service needs
and the release does not say: the vocabulary from its own file, and which region extractor
made the features the weights expect. Without that record the service would fall back to the
1280-d grid extractor and feed a 2048-d bottom-up-attention model the wrong regions
(docs/ARCHITECTURE.md, Data formats: checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model.checkpoints.checkpoint import CampCheckpoint, CheckpointError, import_official_checkpoint
from model.text.vocab import Vocabulary, VocabularyError, load_vocabulary
from model.vision.extractors.detectron2 import (
    DEFAULT_CONFIDENCE_THRESHOLD,
    DEFAULT_NMS_THRESHOLD,
    DEFAULT_NUM_BOXES,
    POOLED_FEATURE_DIM,
)
from model.vision.extractors.grid import HEAD_CHANNELS

# Extractors a release can be paired with, by the width of the region features they make.
# "precomputed": features made elsewhere (the released .npy files); such a model evaluates on
# precomputed folders but cannot ingest photos.
EXTRACTOR_FEATURE_DIMS = {"detectron2": POOLED_FEATURE_DIM, "grid": HEAD_CHANNELS}
PRECOMPUTED = "precomputed"
EXTRACTOR_CHOICES = (*EXTRACTOR_FEATURE_DIMS, PRECOMPUTED)
GRID_CONFIG = {"fit": "squash"}


def extractor_metadata(
    name: str,
    img_dim: int,
    *,
    min_boxes: int = DEFAULT_NUM_BOXES,
    max_boxes: int = DEFAULT_NUM_BOXES,
    detectron2_files: Mapping[str, str | Path | None] | None = None,
) -> dict[str, Any]:
    """The checkpoint's extractor record `{"name", "config", "version"}` for a model reading
    `img_dim`-d regions.

    `config` holds only keys the extractor's `from_config` takes: for detectron2 the box
    settings of the features (36 fixed boxes in the released SCAN/CAMP features) and, when
    given, its `config_file` and `weights` paths (the serving machine's settings may name
    others). `version` is "" because a release does not say which extractor build made its
    features. Refuses an extractor whose features are not `img_dim` wide: every ingest would
    fail.
    """
    if name not in EXTRACTOR_CHOICES:
        raise CheckpointError(f"unknown extractor {name!r}; choose one of {EXTRACTOR_CHOICES}")
    if name == PRECOMPUTED:
        return {"name": name, "config": {}, "version": ""}
    width = EXTRACTOR_FEATURE_DIMS[name]
    if width != img_dim:
        raise CheckpointError(
            f"the checkpoint reads {img_dim}-d regions but the {name!r} extractor makes "
            f"{width}-d ones; use --extractor {default_extractor(img_dim)}"
        )
    if name == "grid":
        return {"name": name, "config": dict(GRID_CONFIG), "version": ""}
    if not 1 <= min_boxes <= max_boxes:
        raise CheckpointError(f"need 1 <= min_boxes <= max_boxes, got {min_boxes}, {max_boxes}")
    files = {k: str(v) for k, v in (detectron2_files or {}).items() if v is not None}
    config = {
        **files,
        "min_boxes": min_boxes,
        "max_boxes": max_boxes,
        "confidence_threshold": DEFAULT_CONFIDENCE_THRESHOLD,
        "nms_threshold": DEFAULT_NMS_THRESHOLD,
    }
    return {"name": name, "config": config, "version": ""}


def default_extractor(img_dim: int) -> str:
    """The extractor whose features are `img_dim` wide, else "precomputed"."""
    fitting = [n for n, d in EXTRACTOR_FEATURE_DIMS.items() if d == img_dim]
    return fitting[0] if fitting else PRECOMPUTED


def read_vocabulary(path: str | Path) -> Vocabulary:
    """The official pickle (restricted unpickler) or a JSON vocabulary (ours or SCAN's)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"vocabulary file {path} not found")
    try:
        return load_vocabulary(path)
    except VocabularyError as exc:
        raise CheckpointError(f"vocabulary {path}: {exc}") from exc


def import_release(
    checkpoint_path: str | Path,
    vocabulary_path: str | Path,
    *,
    extractor: str | None = None,
    version: str | None = None,
    min_boxes: int = DEFAULT_NUM_BOXES,
    max_boxes: int = DEFAULT_NUM_BOXES,
    detectron2_files: Mapping[str, str | Path | None] | None = None,
) -> CampCheckpoint:
    """An official `*.pth.tar` and its vocabulary as our checkpoint, with extractor metadata.

    `extractor` None picks the one whose features fit the weights (2048-d: detectron2).
    Raises CheckpointError naming what is wrong: an unreadable or foreign file, missing or
    misshapen weights, a vocabulary whose size is not the embedding's, an extractor that does
    not fit.
    """
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise CheckpointError(f"checkpoint file {checkpoint_path} not found")
    vocabulary = read_vocabulary(vocabulary_path)
    checkpoint = import_official_checkpoint(checkpoint_path, vocabulary=vocabulary)
    img_dim = checkpoint.config.img_dim
    name = extractor or default_extractor(img_dim)
    checkpoint.metadata |= {
        "version": version or f"official-{checkpoint_path.name.split('.')[0]}",
        "extractor": extractor_metadata(
            name,
            img_dim,
            min_boxes=min_boxes,
            max_boxes=max_boxes,
            detectron2_files=detectron2_files,
        ),
        "imported_from": {
            "checkpoint": checkpoint_path.name,
            "vocabulary": Path(vocabulary_path).name,
        },
    }
    return checkpoint

"""The one record of an image's regions: extractor -> store and cache -> reranker -> explanation.

numpy only (no torch, nothing of `index` or `service`): the storage layer imports this module,
so the record the extractor validates is the record the corpus and the upload cache hand back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

FEATURE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
BOX_DTYPE = np.dtype(np.float32)
STORED_FEATURE_DTYPE = np.dtype(np.float16)
IMAGE_SIZE_DTYPE = np.dtype(np.int32)
BOX_TOLERANCE = 1e-4  # normalised boxes may overshoot [0, 1] by float rounding only


class InvalidRegionFeatures(ValueError):
    """A RegionFeatures was built from arrays of the wrong shape, dtype or range."""


def region_counts_problem(counts: np.ndarray, width: int) -> str | None:
    """Why `counts` [N] cannot be the real region counts of rows padded to `width` regions
    (integers in [1, width]), or None when they can. Callers add where the counts came from."""
    counts = np.asarray(counts)
    if not np.issubdtype(counts.dtype, np.integer):
        return f"region counts must hold integers, got {counts.dtype}"
    if counts.size and (counts.min() < 1 or counts.max() > width):
        return (
            f"region counts must lie in [1, {width}] (the padded width), got "
            f"{counts.min()}..{counts.max()}"
        )
    return None


@dataclass(frozen=True, eq=False)
class RegionFeatures:
    """Regions of one image.

    boxes: float32 [R, 4], (x0, y0, x1, y1) normalised by the image's width and height, so
        0 <= x0 <= x1 <= 1 (multiply by image_size to get pixels).
    features: float16 or float32 [R, D], one row per box, same order.
    image_size: (width, height) in pixels of the decoded, EXIF-rotated image.
    extractor, extractor_version: who made them; caches key on both (see `namespace`).

    The arrays are made read-only so a cached record cannot be changed in place. Built by an
    extractor it is validated; read back from the store or the cache (`from_stored`) it is not
    validated again: it was checked when it was written.
    """

    boxes: np.ndarray
    features: np.ndarray
    image_size: tuple[int, int]
    extractor: str
    extractor_version: str

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes)
        features = np.asarray(self.features)
        if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise InvalidRegionFeatures(
                f"features must be [R, D] with R, D > 0, got {features.shape}"
            )
        if features.dtype not in FEATURE_DTYPES:
            raise InvalidRegionFeatures(
                f"features must be float16 or float32, got {features.dtype}"
            )
        if boxes.shape != (features.shape[0], 4):
            raise InvalidRegionFeatures(
                f"boxes must be [R, 4] with R = {features.shape[0]} (one per feature row), "
                f"got {boxes.shape}"
            )
        boxes = boxes.astype(BOX_DTYPE, copy=False)
        if not np.isfinite(boxes).all() or not np.isfinite(features).all():
            raise InvalidRegionFeatures("boxes and features must be finite (no NaN or inf)")
        if (boxes < -BOX_TOLERANCE).any() or (boxes > 1 + BOX_TOLERANCE).any():
            raise InvalidRegionFeatures("boxes must be normalised to [0, 1] by the image size")
        if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
            raise InvalidRegionFeatures("boxes must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1")
        if len(self.image_size) != 2 or min(int(v) for v in self.image_size) <= 0:
            raise InvalidRegionFeatures(
                f"image_size must be (width, height) > 0, got {self.image_size}"
            )
        width, height = (int(v) for v in self.image_size)
        if not self.extractor or not self.extractor_version:
            raise InvalidRegionFeatures("extractor and extractor_version must be non-empty")
        boxes = np.array(boxes, copy=True) if boxes.flags.writeable else boxes
        features = np.array(features, copy=True) if features.flags.writeable else features
        boxes.flags.writeable = False
        features.flags.writeable = False
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "image_size", (width, height))

    @classmethod
    def from_stored(
        cls, arrays: Mapping[str, np.ndarray], extractor: str, extractor_version: str
    ) -> RegionFeatures:
        """The record of arrays laid out by `stored_region_arrays` (a feature store or cache
        entry), without re-validating or copying them: a search reads a hundred at a time."""
        record = object.__new__(cls)
        width, height = (int(v) for v in arrays["image_size"])
        for name, value in (
            ("boxes", arrays["boxes"]),
            ("features", arrays["features"]),
            ("image_size", (width, height)),
            ("extractor", extractor),
            ("extractor_version", extractor_version),
        ):
            object.__setattr__(record, name, value)
        return record

    def stored_arrays(self) -> dict[str, np.ndarray]:
        """The named arrays the feature store and the cache keep (see `stored_region_arrays`)."""
        return stored_region_arrays(self.features, self.boxes, self.image_size)

    @property
    def num_regions(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def namespace(self) -> str:
        """`{extractor}@{version}`: the cache/store key prefix; features from different
        extractors or versions must never be mixed."""
        return extractor_namespace(self.extractor, self.extractor_version)

    def boxes_in_pixels(self) -> np.ndarray:
        """float32 [R, 4] boxes in pixel coordinates of the decoded image."""
        width, height = self.image_size
        return self.boxes * np.array([width, height, width, height], dtype=BOX_DTYPE)

    def astype(self, dtype: np.dtype | type) -> RegionFeatures:
        """Same record with features cast to float16 or float32 (storage uses float16)."""
        dtype = np.dtype(dtype)
        if dtype not in FEATURE_DTYPES:
            raise InvalidRegionFeatures(f"features must be float16 or float32, got {dtype}")
        if dtype == self.features.dtype:
            return self
        return replace(self, features=self.features.astype(dtype))

    def to_float16(self) -> RegionFeatures:
        return self.astype(np.float16)

    def to_float32(self) -> RegionFeatures:
        return self.astype(np.float32)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RegionFeatures):
            return NotImplemented
        return (
            self.image_size == other.image_size
            and self.extractor == other.extractor
            and self.extractor_version == other.extractor_version
            and self.features.dtype == other.features.dtype
            and np.array_equal(self.boxes, other.boxes)
            and np.array_equal(self.features, other.features)
        )

    __hash__ = None  # type: ignore[assignment]  # arrays: equality by value, not hashable


def extractor_namespace(extractor: str, version: str) -> str:
    """Key prefix for features of one extractor version, e.g. "grid@effnet-lite0-squash-1"."""
    return f"{extractor}@{version}"


def stored_region_arrays(
    features: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int]
) -> dict[str, np.ndarray]:
    """The stored layout of a region record, in this key order (the bytes index/codec.py writes
    depend on it): float16 features [R, D], float32 boxes [R, 4], int32 (width, height)."""
    return {
        "features": np.asarray(features, dtype=STORED_FEATURE_DTYPE),
        "boxes": np.asarray(boxes, dtype=BOX_DTYPE),
        "image_size": np.asarray(image_size, dtype=IMAGE_SIZE_DTYPE),
    }

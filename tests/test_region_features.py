"""RegionFeatures: validation, immutability, dtype conversion, cache namespace."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from model.types import InvalidRegionFeatures, RegionFeatures


def make(r: int = 3, d: int = 8, **overrides) -> RegionFeatures:
    fields = {
        "boxes": np.tile(np.array([[0.0, 0.0, 0.5, 0.5]], dtype=np.float32), (r, 1)),
        "features": np.arange(r * d, dtype=np.float32).reshape(r, d),
        "image_size": (640, 480),
        "extractor": "grid",
        "extractor_version": "v1",
    }
    fields.update(overrides)
    return RegionFeatures(**fields)


def test_valid_record_and_helpers() -> None:
    record = make()
    assert (record.num_regions, record.feature_dim) == (3, 8)
    assert record.namespace == "grid@v1"
    np.testing.assert_allclose(record.boxes_in_pixels()[0], [0, 0, 320, 240])
    half = record.to_float16()
    assert half.features.dtype == np.float16 and half.boxes.dtype == np.float32
    assert half.to_float32().features.dtype == np.float32
    assert record.astype(np.float32) is record
    assert record == make() and record != half


def test_arrays_are_read_only_copies() -> None:
    features = np.zeros((2, 4), dtype=np.float32)
    record = make(r=2, d=4, features=features)
    features[0, 0] = 5.0
    assert record.features[0, 0] == 0.0
    with pytest.raises(ValueError, match="read-only"):
        record.features[0, 0] = 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"features": np.zeros((3,), dtype=np.float32)}, r"\[R, D\]"),
        ({"features": np.zeros((3, 8), dtype=np.float64)}, "float16 or float32"),
        ({"boxes": np.zeros((2, 4), dtype=np.float32)}, "one per feature row"),
        ({"boxes": np.full((3, 4), 1.5, dtype=np.float32)}, "normalised"),
        ({"boxes": np.tile(np.array([[0.5, 0, 0.2, 1]], dtype=np.float32), (3, 1))}, "x0 <= x1"),
        ({"features": np.full((3, 8), np.nan, dtype=np.float32)}, "finite"),
        ({"image_size": (0, 10)}, "image_size"),
        ({"image_size": (10,)}, "image_size"),
        ({"extractor_version": ""}, "non-empty"),
    ],
)
def test_invalid_records_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(InvalidRegionFeatures, match=message):
        make(**overrides)


def test_types_module_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, model.types; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

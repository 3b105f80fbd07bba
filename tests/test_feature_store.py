"""The LMDB feature store and its byte format."""

from __future__ import annotations

import numpy as np
import pytest

from index.codec import decode_arrays, encode_arrays
from index.errors import InvalidRecordError, StorageFullError
from index.feature_store import FeatureStore


def _region(rng: np.random.Generator, regions: int = 49, dim: int = 1280) -> dict[str, np.ndarray]:
    return {
        "features": rng.standard_normal((regions, dim)).astype(np.float16),
        "boxes": rng.random((regions, 4), dtype=np.float32),
        "image_size": np.array([640, 480], dtype=np.int32),
    }


def test_codec_round_trip_is_compact_and_exact():
    rng = np.random.default_rng(0)
    record = _region(rng)
    encoded = encode_arrays(record)
    data_bytes = sum(array.nbytes for array in record.values())
    assert data_bytes < len(encoded) < data_bytes + 64  # header is tiny, no pickle
    decoded = decode_arrays(encoded)
    for name, array in record.items():
        assert decoded[name].dtype == array.dtype
        np.testing.assert_array_equal(decoded[name], array)
    assert not decoded["features"].flags.writeable


def test_codec_refuses_bad_input():
    with pytest.raises(InvalidRecordError):
        encode_arrays({"x": np.array(["text"])})
    encoded = encode_arrays({"x": np.zeros(10, np.float32)})
    with pytest.raises(InvalidRecordError):
        decode_arrays(encoded[:-4])
    with pytest.raises(InvalidRecordError):
        decode_arrays(b"pickle" + encoded)


def test_batch_put_get_delete_and_namespaces(tmp_path):
    rng = np.random.default_rng(1)
    records = {i: _region(rng, dim=32) for i in range(1, 21)}
    with FeatureStore(tmp_path / "f") as store:
        store.put_many("regions:grid:v1", records)
        store.put_many("regions:grid:v2", {1: _region(rng, dim=8)})
        got = store.get_many("regions:grid:v1", [3, 7, 999])
        assert sorted(got) == [3, 7]
        np.testing.assert_array_equal(got[7]["features"], records[7]["features"])
        assert store.get_many("regions:grid:v2", [1])[1]["features"].shape == (49, 8)
        assert store.count("regions:grid:v1") == 20
        assert store.namespaces() == ["regions:grid:v1", "regions:grid:v2"]
        store.delete_many("regions:grid:v1", [3, 4, 12345])
        assert store.ids("regions:grid:v1").tolist() == [i for i in range(1, 21) if i not in (3, 4)]
        assert store.get_many("absent:namespace", [1]) == {}
        with pytest.raises(ValueError):
            store.put_many("bad namespace with spaces", records)


def test_durable_across_reopen(tmp_path):
    rng = np.random.default_rng(2)
    record = _region(rng, dim=16)
    with FeatureStore(tmp_path / "f") as store:
        store.write(
            puts={"regions:a:1": {5: record}, "pooled:images:m": {5: {"vector": np.ones(4)}}}
        )
    with FeatureStore(tmp_path / "f") as store:
        np.testing.assert_array_equal(
            store.get_many("regions:a:1", [5])[5]["boxes"], record["boxes"]
        )
        assert store.count("pooled:images:m") == 1


def test_map_grows_when_full(tmp_path):
    rng = np.random.default_rng(3)
    with FeatureStore(tmp_path / "f", map_size=256 * 1024) as store:
        for start in range(0, 40, 10):  # 40 x 125 KB = 5 MB through a 256 KB map
            store.put_many("regions:g:1", {i: _region(rng) for i in range(start, start + 10)})
        assert store.count("regions:g:1") == 40
        assert store.size_bytes() > 40 * 125_000


def test_maximum_size_is_a_typed_storage_full_error(tmp_path):
    rng = np.random.default_rng(4)
    with FeatureStore(tmp_path / "f", map_size=256 * 1024, max_map_size=1024 * 1024) as store:
        with pytest.raises(StorageFullError, match="maximum size"):
            store.put_many("regions:g:1", {i: _region(rng) for i in range(20)})
        assert store.count("regions:g:1") == 0  # all or nothing

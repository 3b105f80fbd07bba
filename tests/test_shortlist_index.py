"""The FAISS shortlist index: exactness, factories, training, deletes, persistence."""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from index.errors import CorruptIndexError, DimensionError, IndexMismatchError
from index.shortlist import (
    FLAT,
    SMALL_SEARCH_ROWS,
    ShortlistIndex,
    choose_factory,
    l2_normalised,
    search_threads,
)

DIM = 32


def _clustered(count: int, seed: int = 0, clusters: int = 40) -> np.ndarray:
    """Unit vectors around `clusters` centres, like real embeddings (IVF has structure to use)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM))
    points = centres[rng.integers(0, clusters, count)] + 0.3 * rng.standard_normal((count, DIM))
    return l2_normalised(points, DIM)


def _exact(data: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = l2_normalised(queries, DIM) @ data.T
    return ids[np.argsort(-scores, axis=1)[:, :k]]


def test_flat_matches_exact_search_in_batch():
    data = _clustered(2000)
    ids = np.arange(1000, 3000, dtype=np.int64)
    index = ShortlistIndex(DIM)
    index.add(ids, data * 3.0)  # any scale: vectors are normalised on the way in
    queries = _clustered(7, seed=1)
    scores, found = index.search(queries, 10)
    assert found.shape == scores.shape == (7, 10)
    np.testing.assert_array_equal(found, _exact(data, ids, queries, 10))
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    assert len(index) == 2000 and 1500 in index and 5 not in index


@pytest.mark.parametrize("factory", ["IVF16,Flat", "HNSW16", "IVF16_HNSW8,Flat", "IVF8,PQ16x4"])
def test_approximate_factories_train_and_recall(factory):
    data = _clustered(3000)
    ids = np.arange(3000, dtype=np.int64)
    index = ShortlistIndex(DIM, factory, nprobe=8, ef_search=64)
    index.add(ids[:100], data[:100])
    if factory.startswith("IVF"):
        assert not index.is_trained  # buffered exactly until there is enough to train on
        _, found = index.search(data[:3], 1)
        assert found[:, 0].tolist() == [0, 1, 2]
    index.add(ids[100:], data[100:])
    assert index.is_trained and len(index) == 3000
    queries = _clustered(50, seed=2)
    _, found = index.search(queries, 10)
    expected = _exact(data, ids, queries, 10)
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, expected, strict=True)])
    assert recall > (0.3 if "PQ" in factory else 0.9)  # PQ16x4: 8 bytes a vector, lossy


@pytest.mark.parametrize("factory", [FLAT, "IVF16,Flat", "HNSW16"])
def test_deletes_keep_ids_stable(factory):
    data = _clustered(1000)
    ids = np.arange(10, 1010, dtype=np.int64)
    index = ShortlistIndex(DIM, factory, nprobe=16, ef_search=128)
    index.add(ids, data)
    removed = ids[::3]
    assert index.remove(np.append(removed, 99_999)) == len(removed)
    assert len(index) == 1000 - len(removed)
    live = np.setdiff1d(ids, removed)
    _, found = index.search(data[:50], 5)
    assert not np.isin(found, removed).any()
    hits = found[:, 0][np.isin(ids[:50], live)]
    np.testing.assert_array_equal(hits, ids[:50][np.isin(ids[:50], live)])
    index.add(removed[:5], data[::3][:5])  # re-adding a deleted id works
    assert int(removed[0]) in index


def test_refuses_bad_input():
    index = ShortlistIndex(DIM)
    with pytest.raises(DimensionError):
        index.add([1], np.ones((1, DIM + 1)))
    with pytest.raises(DimensionError):
        index.add([1], np.zeros((1, DIM)))
    index.add([1], np.ones((1, DIM)))
    with pytest.raises(ValueError, match="already"):
        index.add([1], np.ones((1, DIM)))
    with pytest.raises(ValueError, match="factory"):
        ShortlistIndex(DIM, "NotAFactory")
    scores, found = index.search(np.ones(DIM), 3)
    assert found.tolist() == [[1, -1, -1]] and np.isneginf(scores[0, 1:]).all()


@pytest.mark.parametrize("factory", [FLAT, "IVF16,Flat", "HNSW16"])
def test_save_and_load_give_the_same_results(tmp_path, factory):
    data = _clustered(1500)
    index = ShortlistIndex(DIM, factory)
    index.add(np.arange(1500), data)
    index.remove([0, 1, 2])
    index.save(tmp_path / "i.faiss", meta={"model_version": "m1"})
    loaded, meta = ShortlistIndex.load(tmp_path / "i.faiss", dim=DIM, factory=factory)
    assert meta == {"model_version": "m1"}
    queries = _clustered(20, seed=3)
    for original, restored in zip(
        index.search(queries, 10), loaded.search(queries, 10), strict=True
    ):
        np.testing.assert_array_equal(original, restored)
    assert loaded.ids().tolist() == list(range(3, 1500))
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_truncated_and_mismatched_files_are_refused(tmp_path):
    index = ShortlistIndex(DIM)
    index.add(np.arange(100), _clustered(100))
    path = tmp_path / "i.faiss"
    index.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptIndexError, match="truncated"):
        ShortlistIndex.load(path)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CorruptIndexError, match="checksum"):
        ShortlistIndex.load(path)
    path.write_bytes(b"")
    with pytest.raises(CorruptIndexError):
        ShortlistIndex.load(path)
    path.write_bytes(data)
    with pytest.raises(IndexMismatchError):
        ShortlistIndex.load(path, dim=DIM * 2)
    with pytest.raises(IndexMismatchError):
        ShortlistIndex.load(path, factory="HNSW32")


def test_choose_factory_by_corpus_size():
    assert choose_factory(1_000, 256) == FLAT
    assert choose_factory(100_000, 256) == "IVF1024,Flat"
    assert choose_factory(1_000_000, 256) == "IVF4096,Flat"
    assert choose_factory(50_000_000, 256) == "IVF32768_HNSW32,PQ32"
    for size in (60_000, 3_000_000, 20_000_000):
        ShortlistIndex(256, choose_factory(size, 256))  # every choice is a valid factory


def test_small_searches_run_on_one_openmp_thread_of_the_caller_only():
    """A search of a few queries uses one OpenMP thread on the searching thread (waking a
    second costs more than it saves), a large batch all of them; other threads keep theirs,
    and the results are exact either way."""
    data = _clustered(3000)
    ids = np.arange(3000, dtype=np.int64)
    index = ShortlistIndex(DIM)
    index.add(ids, data)
    everyone = faiss.omp_get_max_threads()
    seen: dict[int, tuple[int, np.ndarray]] = {}

    def search(rows: int) -> None:
        queries = _clustered(rows, seed=rows)
        found = index.search(queries, 10)[1]
        np.testing.assert_array_equal(found, _exact(data, ids, queries, 10))
        seen[rows] = (faiss.omp_get_max_threads(), found)

    for rows in (1, SMALL_SEARCH_ROWS - 1, SMALL_SEARCH_ROWS):
        worker = threading.Thread(target=search, args=(rows,))
        worker.start()
        worker.join()
    assert seen[1][0] == seen[SMALL_SEARCH_ROWS - 1][0] == search_threads(1) == 1
    assert seen[SMALL_SEARCH_ROWS][0] == search_threads(SMALL_SEARCH_ROWS) == everyone
    assert faiss.omp_get_max_threads() == everyone  # this thread's setting is untouched

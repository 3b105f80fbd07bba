"""The corpus: ingest order, deletes, persistence, and the recovery rule on start."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from index.corpus import (
    STORE_DIR,
    Corpus,
    NewCaption,
    pooled_namespace,
    regions_namespace,
    rerank_namespace,
)
from index.errors import DimensionError, NotFoundError
from index.feature_store import FeatureStore

DIM = 16
OPTIONS = {"dim": DIM, "extractor": "grid", "extractor_version": "v1", "model_version": "m1"}


def _tensors(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    return {"regions": rng.standard_normal((rows, 8)).astype(np.float16)}


def _add(
    corpus: Corpus, n: int, rng: np.random.Generator, captions: int = 2, *, tensors: bool = False
):
    """Image `n` with its captions; `tensors`: with rerank tensors for it and each caption."""
    return corpus.add_image(
        f"{'tensors' if tensors else 'image'}-{n}".encode() * 10,
        width=64,
        height=48,
        region_features=rng.standard_normal((49, 24)),
        region_boxes=rng.random((49, 4)),
        pooled=rng.standard_normal(DIM),
        captions=[
            NewCaption(
                f"caption {n}.{c}",
                [1, 4 + c, 2],
                rng.standard_normal(DIM),
                _tensors(rng, 3) if tensors else None,
            )
            for c in range(captions)
        ],
        extension=".jpg",
        rerank=_tensors(rng, 49) if tensors else None,
    )


@pytest.fixture
def filled(tmp_path):
    rng = np.random.default_rng(0)
    corpus = Corpus.open(tmp_path / "data", **OPTIONS)
    added = [_add(corpus, n, rng) for n in range(30)]
    yield corpus, added
    corpus.close()


def test_add_search_and_fetch_features(filled):
    corpus, added = filled
    first = added[0]
    assert first.created and (corpus.data_dir / first.image.stored_path).read_bytes()
    vector = corpus.store.get_many(pooled_namespace("images", "m1"), [first.image.id])
    _, ids = corpus.search_images(vector[first.image.id]["vector"], 5)
    assert ids[0, 0] == first.image.id
    regions = corpus.get_region_features([first.image.id, 10_000])
    assert list(regions) == [first.image.id]
    assert regions[first.image.id].features.dtype == np.float16
    assert regions[first.image.id].features.shape == (49, 24)
    assert regions[first.image.id].image_size == (64, 48)
    assert len(corpus.indexes["captions"]) == 60


def test_dedupe_by_content(filled):
    corpus, added = filled
    again = _add(corpus, 0, np.random.default_rng(9))
    assert not again.created and again.image == added[0].image
    assert corpus.catalog.count_images() == 30


def test_refuses_bad_arrays_before_writing_anything(filled):
    corpus, _ = filled
    with pytest.raises(DimensionError):
        corpus.add_image(b"x", width=1, height=1, region_features=np.ones((3, 4)),
                         region_boxes=np.ones((2, 4)), pooled=np.ones(DIM))  # fmt: skip
    with pytest.raises(DimensionError):
        corpus.add_caption("t", [1, 2], np.ones(DIM + 1))
    with pytest.raises(NotFoundError):
        corpus.add_caption("t", [1, 2], np.ones(DIM), image_id=10_000)
    assert corpus.catalog.count_images() == 30 and corpus.catalog.count_captions() == 60


def test_delete_image_removes_everything(filled):
    corpus, added = filled
    victim = added[3]
    caption_ids = [c.id for c in victim.captions]
    corpus.get_region_features([victim.image.id])  # now cached too
    assert corpus.delete_image(victim.image.id)
    assert not corpus.delete_image(victim.image.id)
    assert corpus.get_image(victim.image.id) is None
    assert victim.image.id not in corpus.indexes["images"]
    assert not any(c in corpus.indexes["captions"] for c in caption_ids)
    assert corpus.get_region_features([victim.image.id]) == {}
    assert not (corpus.data_dir / victim.image.stored_path).exists()
    free = corpus.add_caption("free caption", [1, 9, 2], np.ones(DIM))
    assert free.image_id is None and corpus.delete_caption(free.id)
    assert free.id not in corpus.indexes["captions"]


def test_save_reopen_same_results(tmp_path, filled, caplog):
    corpus, _ = filled
    queries = np.random.default_rng(5).standard_normal((4, DIM))
    before = corpus.search_images(queries, 10), corpus.search_captions(queries, 10)
    corpus.close()
    with caplog.at_level(logging.WARNING, logger="index"):
        reopened = Corpus.open(tmp_path / "data", **OPTIONS)
    assert not caplog.records  # nothing to repair
    after = reopened.search_images(queries, 10), reopened.search_captions(queries, 10)
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old[1], new[1])
        np.testing.assert_allclose(old[0], new[0])
    reopened.close()


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "delete"])
def test_damaged_index_file_is_rebuilt_with_a_log_line(tmp_path, filled, caplog, damage):
    corpus, _ = filled
    queries = np.random.default_rng(6).standard_normal((4, DIM))
    expected = corpus.search_images(queries, 10)[1]
    corpus.close()
    path = tmp_path / "data" / "index" / "images.faiss"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 100])
    elif damage == "corrupt":
        path.write_bytes(data[:-50] + bytes(50))
    else:
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="index"):
        reopened = Corpus.open(tmp_path / "data", **OPTIONS)
    assert any("rebuilding the images index" in r.getMessage() for r in caplog.records)
    assert "images" in reopened.recovery.rebuilt
    np.testing.assert_array_equal(reopened.search_images(queries, 10)[1], expected)
    reopened.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="index"):
        Corpus.open(tmp_path / "data", **OPTIONS).close()  # the repair was saved
    assert not caplog.records


def test_stale_index_is_reconciled_with_the_catalog(tmp_path, caplog):
    rng = np.random.default_rng(1)
    corpus = Corpus.open(tmp_path / "data", **OPTIONS)
    added = [_add(corpus, n, rng) for n in range(10)]
    corpus.save()
    late = [_add(corpus, n, rng) for n in range(10, 13)]  # acknowledged, not in the saved index
    corpus.delete_image(added[0].image.id)
    corpus.store.close()
    corpus.catalog.close()  # a crash: no final save
    with caplog.at_level(logging.WARNING, logger="index"):
        reopened = Corpus.open(tmp_path / "data", **OPTIONS)
    assert any("stale" in r.getMessage() for r in caplog.records)
    assert reopened.recovery.reconciled["images"] == (3, 1)
    expected = set(reopened.catalog.image_ids().tolist())
    assert set(reopened.indexes["images"].ids().tolist()) == expected
    assert all(a.image.id in expected for a in late)
    reopened.close()


def test_orphans_of_a_crash_before_commit_are_collected(tmp_path, caplog):
    rng = np.random.default_rng(2)
    Corpus.open(tmp_path / "data", **OPTIONS).close()
    with FeatureStore(tmp_path / "data" / STORE_DIR) as store:  # features written, no commit
        store.put_many(regions_namespace("grid", "v1"), {777: {"features": np.ones((2, 2))}})
        store.put_many(pooled_namespace("images", "m1"), {777: {"vector": rng.random(DIM)}})
    orphan_file = tmp_path / "data" / "images" / "ab" / ("ab" * 32)
    orphan_file.parent.mkdir(parents=True)
    orphan_file.write_bytes(b"never acknowledged")
    with caplog.at_level(logging.WARNING, logger="index"):
        corpus = Corpus.open(tmp_path / "data", **OPTIONS)
    assert corpus.recovery.orphan_features == 2 and corpus.recovery.orphan_files == 1
    assert corpus.get_region_features([777]) == {} and not orphan_file.exists()
    assert len(corpus.indexes["images"]) == 0
    corpus.close()


def test_auto_factory_and_model_version_change_rebuild(tmp_path, caplog):
    rng = np.random.default_rng(3)
    with Corpus.open(tmp_path / "data", **{**OPTIONS, "image_factory": "auto"}) as corpus:
        _add(corpus, 0, rng)
        assert corpus.indexes["images"].factory == "Flat"
    with caplog.at_level(logging.WARNING, logger="index"):
        corpus = Corpus.open(tmp_path / "data", **{**OPTIONS, "model_version": "m2"})
    assert "built for model 'm1'" in corpus.recovery.rebuilt["images"]
    assert corpus.recovery.missing_pooled == {"images": 1, "captions": 2}
    corpus.close()


def test_rerank_tensors_are_stored_read_and_deleted_with_their_items(tmp_path):
    rng = np.random.default_rng(5)
    with Corpus.open(tmp_path / "data", **OPTIONS, tensor_version="m1+abc") as corpus:
        added = [_add(corpus, n, rng, tensors=True) for n in range(3)]
        image = added[0].image.id
        caption = added[0].captions[0].id
        stored = corpus.get_rerank_tensors("images", [image, 10_000])
        assert list(stored) == [image] and stored[image]["regions"].shape == (49, 8)
        assert stored[image]["regions"].dtype == np.float16
        assert list(corpus.get_rerank_tensors("captions", [caption])) == [caption]
        extra = corpus.add_captions(
            [NewCaption("late", [1, 9, 2], rng.standard_normal(DIM), _tensors(rng, 2))],
            image_id=image,
        )
        assert list(corpus.get_rerank_tensors("captions", [extra[0].id])) == [extra[0].id]
        assert corpus.ids_without_rerank_tensors("images").size == 0
        assert corpus.ids_without_rerank_tensors("captions").size == 0
        assert corpus.delete_image(image)
        assert corpus.get_rerank_tensors("images", [image]) == {}
        assert corpus.get_rerank_tensors("captions", [caption, extra[0].id]) == {}
        assert corpus.delete_caption(added[1].captions[0].id)
        assert corpus.get_rerank_tensors("captions", [added[1].captions[0].id]) == {}


def test_orphan_rerank_tensors_of_a_crash_before_commit_are_collected(tmp_path):
    rng = np.random.default_rng(6)
    Corpus.open(tmp_path / "data", **OPTIONS).close()
    with FeatureStore(tmp_path / "data" / STORE_DIR) as store:  # written, never committed
        store.write(
            {
                rerank_namespace("images", "m1"): {777: _tensors(rng, 49)},
                rerank_namespace("images", "an-old-model"): {778: _tensors(rng, 49)},
                rerank_namespace("captions", "m1"): {779: _tensors(rng, 3)},
            }
        )
    corpus = Corpus.open(tmp_path / "data", **OPTIONS)
    assert corpus.recovery.orphan_features == 3
    assert corpus.store.ids(rerank_namespace("images", "an-old-model")).size == 0
    assert corpus.get_rerank_tensors("images", [777]) == {}
    assert corpus.get_rerank_tensors("captions", [779]) == {}
    corpus.close()


def test_a_new_tensor_version_sees_none_and_stores_only_items_that_exist(tmp_path):
    rng = np.random.default_rng(7)
    with Corpus.open(tmp_path / "data", **OPTIONS, tensor_version="m1+old") as corpus:
        added = [_add(corpus, n, rng, tensors=True) for n in range(3)]
    ids = [a.image.id for a in added]
    with Corpus.open(tmp_path / "data", **OPTIONS, tensor_version="m1+new") as corpus:
        assert corpus.get_rerank_tensors("images", ids) == {}  # never another model's
        assert corpus.ids_without_rerank_tensors("images").tolist() == ids
        assert corpus.ids_without_rerank_tensors("captions").size == 6
        assert corpus.ids_with_region_features(ids).tolist() == ids
        corpus.delete_image(ids[1])
        stored = corpus.put_rerank_tensors("images", {i: _tensors(rng, 49) for i in ids})
        assert stored == 2  # the deleted image gets nothing that no catalog row owns
        assert sorted(corpus.get_rerank_tensors("images", ids)) == [ids[0], ids[2]]
        assert corpus.ids_without_rerank_tensors("images").size == 0


def test_without_keeping_region_features_only_the_tensors_are_stored(tmp_path):
    rng = np.random.default_rng(8)
    options = {**OPTIONS, "keep_region_features": False}
    with Corpus.open(tmp_path / "data", **options) as corpus:
        with_tensors = _add(corpus, 0, rng, tensors=True).image.id
        without = _add(corpus, 1, rng).image.id  # no tensors: its features stay
        assert corpus.get_region_features([with_tensors, without]).keys() == {without}
        assert corpus.ids_with_region_features([with_tensors, without]).tolist() == [without]
        assert list(corpus.get_rerank_tensors("images", [with_tensors])) == [with_tensors]
        assert corpus.get_pooled("images", [with_tensors])[with_tensors].shape == (DIM,)
    kept = {**OPTIONS, "tensor_version": "m1+t"}
    with Corpus.open(tmp_path / "other", **kept) as corpus:
        image = _add(corpus, 0, rng, tensors=True).image.id
        assert corpus.drop_region_features() == 1
        assert corpus.get_region_features([image]) == {}
        assert list(corpus.get_rerank_tensors("images", [image])) == [image]


def test_rerank_tensors_are_read_through_redis_per_tensor_version(tmp_path, redis_server):
    """Reads go cache-first (a value only in Redis is served), keyed by the tensor version, and a
    delete drops the cached copy too."""
    from index.cache import RedisFeatureCache, cache_key, cache_keyspace
    from index.codec import encode_arrays

    rng = np.random.default_rng(9)
    cache = RedisFeatureCache(redis_server.url, ttl_s=60)
    corpus = Corpus.open(tmp_path / "data", **OPTIONS, cache=cache, tensor_version="m1+abc")
    image = _add(corpus, 0, rng, tensors=True).image.id
    stored = corpus.get_rerank_tensors("images", [image])[image]  # miss, written back
    keyspace = cache_keyspace("rerank-images", "m1+abc")
    client = redis_server.client()
    assert client.get(cache_key(keyspace, image)) == encode_arrays(stored)
    marker = {"regions": np.full((2, 8), 3, np.float16)}
    cache.set_many(keyspace, {image: encode_arrays(marker)})
    np.testing.assert_array_equal(
        corpus.get_rerank_tensors("images", [image])[image]["regions"], marker["regions"]
    )
    assert corpus.delete_image(image)
    assert client.get(cache_key(keyspace, image)) is None
    corpus.close()
    cache.close()

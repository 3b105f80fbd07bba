"""Rerank tensors through the whole service: stored at ingest, read (never rebuilt) by
searches, rebuilt in the background after a model change with progress on /readyz and
/metrics, and a model change refused when region features were dropped.

The real stack (app, pipeline, batchers, corpus on disk, grid extractor) around the small
random-weight model, with real coco-mini photos.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from service_support import (
    coco_photos,
    make_settings,
    retrained,
    running_client,
    upload_coco_photos,
)

from index.corpus import rerank_namespace
from service.api.app import create_app
from service.search.pipeline import SearchPipeline
from service.search.tensor_rebuild import TensorRebuild

PHOTOS = 4
CAPTIONS = 2
REBUILD_WAIT_S = 60.0


def _ingest(client, shared_dir) -> list[int]:
    return upload_coco_photos(client, shared_dir, PHOTOS, CAPTIONS)


def _forbid_computing(monkeypatch) -> None:
    """Make any on-the-fly tensor computation of a search fail loudly."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("a search rebuilt rerank tensors that are stored")

    monkeypatch.setattr(SearchPipeline, "computed_image_tensors", refuse)
    monkeypatch.setattr(SearchPipeline, "computed_caption_tensors", refuse)


def _searches(client, photo_id: int, text: str) -> tuple[dict, dict]:
    images = client.post("/v1/search/images", json={"text": text, "explain": True})
    captions = client.post("/v1/search/captions", json={"image_id": photo_id, "explain": True})
    assert images.status_code == 200 and captions.status_code == 200
    return images.json(), captions.json()


def _scores(body: dict) -> dict[int, float]:
    return {hit["id"]: hit["score"] for hit in body["results"]}


@pytest.fixture
def settings_without_caches(tmp_path):
    """No in-process tensor LRU: every search reads its candidates' tensors from storage."""
    return make_settings(tmp_path / "data", image_cache_mib=0, caption_cache_mib=0)


def test_searches_read_stored_tensors_and_never_rebuild_them(
    settings_without_caches, tiny_retrieval_model, small_grid_extractor, shared_dir, monkeypatch
) -> None:
    app = create_app(
        settings_without_caches, model=tiny_retrieval_model, extractor=small_grid_extractor
    )
    with running_client(app) as client:
        ids = _ingest(client, shared_dir)
        corpus = app.state.service.runtime.corpus
        version = tiny_retrieval_model.tensor_version
        assert corpus.store.ids(rerank_namespace("images", version)).tolist() == ids
        assert corpus.store.count(rerank_namespace("captions", version)) == PHOTOS * CAPTIONS
        text = coco_photos(shared_dir, 1)[0][1][0]
        _forbid_computing(monkeypatch)
        images, captions = _searches(client, ids[0], text)
        assert len(images["results"]) == PHOTOS and len(captions["results"]) == PHOTOS * CAPTIONS
        assert all(hit["explanation"]["word_region"] for hit in images["results"])
        assert all(len(hit["explanation"]["boxes"]) == 4 for hit in captions["results"])
        metrics = client.get("/metrics").text
        assert 'campsearch_precompute_cache_lookups_total{kind="image",result="stored"}' in metrics
        assert 'result="miss"' not in metrics


def test_a_model_change_rebuilds_in_the_background_and_searches_meanwhile_are_right(
    settings_without_caches, tiny_retrieval_model, small_grid_extractor, shared_dir, monkeypatch
) -> None:
    app = create_app(
        settings_without_caches, model=tiny_retrieval_model, extractor=small_grid_extractor
    )
    with running_client(app) as client:
        ids = _ingest(client, shared_dir)
    text = coco_photos(shared_dir, 1)[0][1][0]

    new_model = retrained(tiny_retrieval_model)
    assert new_model.tensor_version != tiny_retrieval_model.tensor_version
    held = monkeypatch.setattr  # hold the rebuild until the searches below ran without it
    real_start = TensorRebuild.start
    held(TensorRebuild, "start", lambda self: None)
    app = create_app(settings_without_caches, model=new_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        runtime = app.state.service.runtime
        ready = client.get("/readyz").json()
        rebuild = next(c for c in ready["components"] if c["name"] == "rerank_tensors")
        total = PHOTOS * CAPTIONS
        assert rebuild == {
            "name": "rerank_tensors",
            "ok": True,
            "detail": f"rebuilding (images 0/{PHOTOS}, captions 0/{total})",
        }
        assert ready["status"] == "ready"
        gauges = client.get("/metrics").text
        assert (
            f'campsearch_rerank_tensor_rebuild_items{{kind="images",state="total"}} {PHOTOS}.0'
            in gauges
        )
        # Meanwhile searches compute the new model's tensors on the fly: the new model's
        # scores, never the old tensors'.
        on_the_fly = _searches(client, ids[0], text)
        query = new_model.encode_texts([text])
        first = on_the_fly[0]["results"][0]
        tensors = runtime.pipeline.computed_image_tensors(
            runtime.corpus.get_region_features([first["id"]])
        )[first["id"]]
        expected = new_model.rerank_pairs(
            tensors.precompute, query.precompute, np.float32([first["shortlist_score"]])
        )
        assert first["score"] == pytest.approx(float(expected[0]), abs=1e-5)

        real_start(runtime.rebuild)
        deadline = time.monotonic() + REBUILD_WAIT_S
        while runtime.rebuild.running and time.monotonic() < deadline:
            time.sleep(0.05)
        progress = runtime.rebuild.progress()
        assert (progress["images"].done, progress["captions"].done) == (PHOTOS, total)
        ready = client.get("/readyz").json()
        rebuild = next(c for c in ready["components"] if c["name"] == "rerank_tensors")
        assert rebuild["detail"] == f"complete (images {PHOTOS}/{PHOTOS}, captions {total}/{total})"
        assert runtime.corpus.ids_without_rerank_tensors("images").size == 0
        assert runtime.corpus.ids_without_rerank_tensors("captions").size == 0

        _forbid_computing(monkeypatch)
        stored = _searches(client, ids[0], text)
        for before, after in zip(on_the_fly, stored, strict=True):
            assert list(_scores(before)) == list(_scores(after))  # same ranking
            for hit_id, score in _scores(after).items():
                assert score == pytest.approx(_scores(before)[hit_id], abs=2e-3)


def test_without_region_features_or_photos_a_model_change_is_refused_at_start(
    tmp_path, tiny_retrieval_model, small_grid_extractor, shared_dir, monkeypatch
) -> None:
    """Dropped region features are re-extracted from the stored photos after a model change
    (tests/test_region_rebuild.py); with the photo files gone too nothing can be rebuilt."""
    settings = make_settings(tmp_path / "data", keep_region_features=False)
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        ids = _ingest(client, shared_dir)
        corpus = app.state.service.runtime.corpus
        assert corpus.get_region_features(ids) == {}  # only the tensors are kept
        _forbid_computing(monkeypatch)
        _searches(client, ids[0], coco_photos(shared_dir, 1)[0][1][0])
        described = client.get(f"/v1/images/{ids[0]}").json()
        assert described["regions"] == 4
        for image_id in ids:
            corpus.stored_file(image_id)[1].unlink()
    monkeypatch.undo()

    app = create_app(
        settings, model=retrained(tiny_retrieval_model), extractor=small_grid_extractor
    )
    with running_client(app) as client:
        assert app.state.service.phase == "failed"
        detail = client.get("/readyz").json()["components"][0]["detail"]
        assert "CAMPSEARCH_KEEP_REGION_FEATURES=false" in detail
        assert "no stored photo to extract them from" in detail
        assert "camp-search ingest" in detail and f"{PHOTOS} images" in detail

    # The model they were stored with still serves (the lock was released on refusal).
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        assert client.get("/readyz").status_code == 200

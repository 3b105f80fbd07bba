"""Both search directions over HTTP with the real pipeline (small random-weight model)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from service_support import coco_photos, make_settings, png_bytes, running_client

from service.api.app import create_app

PHOTOS = 6


@pytest.fixture(scope="module")
def app_and_photos(tmp_path_factory, tiny_retrieval_model, small_grid_extractor, shared_dir):
    settings = make_settings(tmp_path_factory.mktemp("search") / "data", batch_max_wait_ms=50)
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    photos = coco_photos(shared_dir, PHOTOS)
    with running_client(app) as client:
        ids = []
        for path, captions in photos:
            response = client.post(
                "/v1/images", files={"file": (path.name, path.read_bytes())},
                data={"captions": captions[:2]},
            )  # fmt: skip
            assert response.status_code == 201
            ids.append(response.json()["id"])
        yield app, client, photos, ids


def test_text_search_reranks_the_shortlist_best_first(app_and_photos) -> None:
    app, client, photos, ids = app_and_photos
    response = client.post("/v1/search/images", json={"text": photos[0][1][0], "limit": 4})
    assert response.status_code == 200
    body = response.json()
    hits = body["results"]
    assert len(hits) == 4
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    for hit in hits:
        assert hit["id"] in ids and hit["url"] == f"/v1/images/{hit['id']}/file"
        assert len(hit["captions"]) == 2 and hit["explanation"] is None
    assert set(body["timings_ms"]) >= {"encode", "shortlist", "features", "rerank", "total"}
    assert body["timings_ms"]["rerank"] > 0

    # The reranked score is the model's fused score of exactly that pair.
    runtime = app.state.service.runtime
    model = runtime.model
    query = model.encode_texts([photos[0][1][0]])
    tensors = runtime.pipeline.tensors_of_images([hits[0]["id"]])[hits[0]["id"]]
    expected = model.rerank_pairs(
        tensors.precompute, query.precompute, np.float32([hits[0]["shortlist_score"]])
    )
    assert hits[0]["score"] == pytest.approx(float(expected[0]), abs=1e-5)


def test_without_rerank_the_shortlist_order_is_kept(app_and_photos) -> None:
    _, client, photos, _ = app_and_photos
    body = client.post(
        "/v1/search/images", json={"text": photos[1][1][0], "rerank": False, "limit": 5}
    ).json()
    hits = body["results"]
    assert [h["shortlist_rank"] for h in hits] == list(range(5))
    assert all(h["score"] == h["shortlist_score"] for h in hits)
    assert body["timings_ms"]["rerank"] == 0


def test_limit_and_min_score(app_and_photos) -> None:
    _, client, photos, _ = app_and_photos
    everything = client.post(
        "/v1/search/images", json={"text": photos[2][1][0], "limit": 20}
    ).json()["results"]
    assert len(everything) == PHOTOS  # the corpus is smaller than the limit
    threshold = everything[2]["score"]
    kept = client.post(
        "/v1/search/images", json={"text": photos[2][1][0], "min_score": threshold}
    ).json()["results"]
    assert [h["id"] for h in kept] == [h["id"] for h in everything if h["score"] >= threshold]
    assert len(kept) >= 3


def test_explanations_cover_words_regions_and_pooling(app_and_photos) -> None:
    _, client, _, _ = app_and_photos
    hits = client.post(
        "/v1/search/images", json={"text": "a man riding a horse", "limit": 2, "explain": True}
    ).json()["results"]
    for hit in hits:
        explanation = hit["explanation"]
        regions = len(explanation["boxes"])
        assert regions == 4
        assert explanation["words"][1:-1] == ["a", "man", "riding", "a", "horse"]
        assert len(explanation["word_region"]) == len(explanation["words"])
        for row in explanation["word_region"]:
            assert len(row) == regions and sum(row) == pytest.approx(1.0, abs=1e-4)
        assert sum(explanation["region_pooling"]) == pytest.approx(1.0, abs=1e-4)
        assert len(explanation["word_pooling"]) == len(explanation["words"])
        assert all(0.0 <= v <= 1.0 for box in explanation["boxes"] for v in box)
        assert 0.0 < explanation["camp_score"] < 1.0


def test_caption_search_by_id_and_by_upload_agree(app_and_photos) -> None:
    _, client, photos, ids = app_and_photos
    by_id = client.post("/v1/search/captions", json={"image_id": ids[3], "limit": 5}).json()
    path = photos[3][0]
    by_upload = client.post(
        "/v1/search/captions", files={"file": ("q.jpg", path.read_bytes())}, data={"limit": "5"}
    ).json()
    assert [h["id"] for h in by_upload["results"]] == [h["id"] for h in by_id["results"]]
    for hit in by_id["results"]:
        assert hit["image_id"] in ids and hit["text"]
    scores = [h["score"] for h in by_id["results"]]
    assert scores == sorted(scores, reverse=True)
    explained = client.post(
        "/v1/search/captions", json={"image_id": ids[3], "limit": 2, "explain": True}
    ).json()["results"]
    assert all(len(h["explanation"]["boxes"]) == 4 for h in explained)


def test_uploads_reuse_region_features_by_sha256(app_and_photos) -> None:
    app, client, photos, _ = app_and_photos
    lookups = app.state.service.metrics.upload_region_cache

    def count(source: str) -> float:
        return lookups.labels(source)._value.get()

    stored = photos[4][0].read_bytes()  # in the corpus: its stored regions are used
    before = count("corpus")
    client.post("/v1/search/captions", files={"file": ("a.jpg", stored)}).raise_for_status()
    assert count("corpus") == before + 1

    novel = png_bytes((12, 200, 90))  # new: extracted once, then served from the cache
    extracted, cached = count("extractor"), count("cache")
    for _ in range(2):
        client.post("/v1/search/captions", files={"file": ("n.png", novel)}).raise_for_status()
    assert (count("extractor"), count("cache")) == (extracted + 1, cached + 1)


def test_concurrent_queries_share_reranker_calls(app_and_photos) -> None:
    app, client, photos, _ = app_and_photos
    batcher = app.state.service.runtime.batcher
    calls_before = batcher.batches_run
    answers = []

    def search(text: str) -> None:
        answers.append(client.post("/v1/search/images", json={"text": text}).status_code)

    threads = [threading.Thread(target=search, args=(c,)) for _, caps in photos for c in caps[:1]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == [200] * len(threads)
    assert batcher.batches_run - calls_before < len(threads)  # some queries were fused

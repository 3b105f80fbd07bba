"""Photos with different region counts (a detector's adaptive boxes) through the real HTTP stack:
both searches answer 200, and every reranked score is the score of that photo scored alone."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import httpx
import numpy as np
import pytest
from redis_server import free_port
from service_support import ServerThread, coco_photos, make_settings

from model.vision.extractors.grid import GridExtractor
from service.api.app import create_app

PHOTOS = 8
GRID_INPUT = 128  # 4 x 4 = 16 grid cells, of which each photo keeps 1..16


class VariableRegionsExtractor:
    """The real grid extractor, keeping a different number of its cells per photo (1..16, from
    the photo's pixels, so the same photo always gets the same regions), as a detector keeps a
    different number of boxes per photo."""

    def __init__(self) -> None:
        self._grid = GridExtractor(input_size=GRID_INPUT, device="cpu")

    def extract(self, images):
        records = self._grid.extract(images)
        kept = []
        for image, record in zip(images, records, strict=True):
            digest = hashlib.sha256(image.tobytes()).digest()
            count = 1 + digest[0] % record.num_regions
            kept.append(
                replace(record, features=record.features[:count], boxes=record.boxes[:count])
            )
        return kept

    def __getattr__(self, name):
        return getattr(self._grid, name)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_retrieval_model, shared_dir):
    settings = make_settings(tmp_path_factory.mktemp("variable") / "data", batch_max_wait_ms=20)
    app = create_app(settings, model=tiny_retrieval_model, extractor=VariableRegionsExtractor())
    server = ServerThread(app, free_port()).start()
    photos = coco_photos(shared_dir, PHOTOS)
    try:
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            ids = []
            for path, captions in photos:
                response = client.post(
                    "/v1/images",
                    files={"file": (path.name, path.read_bytes())},
                    data={"captions": captions[:2]},
                )
                assert response.status_code == 201, response.text
                ids.append(response.json()["id"])
            yield app, client, photos, ids
    finally:
        server.stop()


def _stored_counts(app, ids: list[int]) -> dict[int, int]:
    stored = app.state.service.runtime.corpus.get_region_features(ids)
    return {i: stored[i].num_regions for i in ids}


def _score_alone(app, image_id: int, text: str, shortlist_score: float) -> float:
    """The fused score of one stored photo with one text, its tensors built from its own
    regions only (nothing padded, nothing cached)."""
    runtime = app.state.service.runtime
    model = runtime.model
    regions = runtime.corpus.get_region_features([image_id])[image_id]
    image = model.precompute_images(np.asarray(regions.features)[None])
    query = model.encode_texts([text]).precompute
    return float(model.rerank_pairs(image, query, np.float32([shortlist_score]))[0])


def test_text_search_over_mixed_region_counts_scores_each_photo_as_alone(served) -> None:
    app, client, photos, ids = served
    counts = _stored_counts(app, ids)
    assert len(set(counts.values())) >= 4, f"the photos should differ in regions: {counts}"
    app.state.service.runtime.pipeline.forget(image_ids=ids)  # build them anew, in one batch
    text = photos[0][1][0]
    response = client.post("/v1/search/images", json={"text": text, "limit": PHOTOS})
    assert response.status_code == 200, response.text
    hits = response.json()["results"]
    assert sorted(h["id"] for h in hits) == sorted(ids)  # every photo reranked in one job
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    for hit in hits:
        expected = _score_alone(app, hit["id"], text, hit["shortlist_score"])
        assert hit["score"] == pytest.approx(expected, abs=1e-5)
    assert len({round(s, 4) for s in scores}) > 1


def test_explanations_hold_only_each_photos_own_regions(served) -> None:
    app, client, _, ids = served
    counts = _stored_counts(app, ids)
    response = client.post(
        "/v1/search/images",
        json={"text": "a man riding a horse", "limit": PHOTOS, "explain": True},
    )
    assert response.status_code == 200, response.text
    for hit in response.json()["results"]:
        explanation = hit["explanation"]
        regions = counts[hit["id"]]
        assert len(explanation["boxes"]) == regions
        assert len(explanation["region_pooling"]) == regions
        assert sum(explanation["region_pooling"]) == pytest.approx(1.0, abs=1e-4)
        for row in explanation["word_region"]:
            assert len(row) == regions and sum(row) == pytest.approx(1.0, abs=1e-4)


def test_caption_search_from_each_photo_answers(served) -> None:
    app, client, _, ids = served
    counts = _stored_counts(app, ids)
    for image_id in ids:
        response = client.post(
            "/v1/search/captions", json={"image_id": image_id, "limit": 3, "explain": True}
        )
        assert response.status_code == 200, response.text
        hits = response.json()["results"]
        assert hits and all(len(h["explanation"]["boxes"]) == counts[image_id] for h in hits)

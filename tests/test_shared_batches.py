"""Concurrent searches share batched model calls for query encoding and photo extraction too
(not only for the shortlist and the reranker), and answer as they do one by one."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from redis_server import free_port
from service_support import ServerThread, coco_photos, make_settings, png_bytes

from service.api.app import create_app
from service.search.encoding import QueryEncoder

QUERIES = [
    "a man riding a wave on top of a surfboard",
    "two giraffes standing in a field",
    "a plate of food with broccoli",
    "a red double decker bus on a city street",
    "a cat sleeping on a laptop",
    "people skiing down a snowy hill",
]
COLOURS = [(200, 30, 30), (20, 40, 180), (30, 160, 60), (240, 200, 20), (120, 20, 140)]


def _hits(response: httpx.Response) -> list[tuple[int, float]]:
    response.raise_for_status()
    return [(hit["id"], round(hit["score"], 4)) for hit in response.json()["results"]]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_retrieval_model, small_grid_extractor, shared_dir):
    """A real server (uvicorn, real HTTP) with 8 coco-mini photos; the feature cache is off,
    so every photo upload is extracted."""
    settings = make_settings(tmp_path_factory.mktemp("shared") / "data", feature_cache_mib=0)
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    running = ServerThread(app, free_port()).start()
    with httpx.Client(base_url=running.url, timeout=120) as client:
        for path, captions in coco_photos(shared_dir, 8):
            files = {"file": (path.name, path.read_bytes())}
            client.post("/v1/images", files=files, data={"captions": captions[:3]})
    yield running
    running.stop()


def test_query_texts_of_concurrent_searches_share_encoder_calls(server) -> None:
    runtime = server.server.config.app.state.service.runtime
    encoder = runtime.pipeline.encoder
    with httpx.Client(base_url=server.url, timeout=120) as client:

        def search(text: str) -> list[tuple[int, float]]:
            return _hits(client.post("/v1/search/images", json={"text": text, "limit": 5}))

        alone = {text: search(text) for text in QUERIES}
        calls_before = encoder.batches_run
        encoder.max_wait_s = 0.3  # gather the concurrent texts into one call
        try:
            with ThreadPoolExecutor(len(QUERIES)) as pool:
                together = dict(zip(QUERIES, pool.map(search, QUERIES), strict=True))
        finally:
            encoder.max_wait_s = 0.0
    assert encoder.batches_run - calls_before < len(QUERIES)
    assert together == alone


def test_photos_of_concurrent_searches_share_extractor_calls(server) -> None:
    runtime = server.server.config.app.state.service.runtime
    extraction = runtime.regions.batcher
    photos = [png_bytes(colour, size=(90 + i, 70)) for i, colour in enumerate(COLOURS)]
    with httpx.Client(base_url=server.url, timeout=120) as client:

        def search(photo: bytes) -> list[tuple[int, float]]:
            files = {"file": ("q.png", photo)}
            return _hits(client.post("/v1/search/captions", files=files, data={"limit": "5"}))

        calls_before = extraction.batches_run
        extraction.max_wait_s = 0.3  # gather the concurrent photos into one network call
        try:
            with ThreadPoolExecutor(len(photos)) as pool:
                together = list(pool.map(search, photos))
        finally:
            extraction.max_wait_s = 0.0
        assert extraction.batches_run - calls_before < len(photos)
        alone = [search(photo) for photo in photos]  # no cache: each extracted by itself
    assert together == alone


def test_a_bad_text_fails_only_its_own_search(tiny_retrieval_model) -> None:
    encoder = QueryEncoder(tiny_retrieval_model)
    good, bad, other = encoder(["two dogs on a beach", "   ", "a red bus"])
    assert isinstance(bad, ValueError)
    for text, encoded in (("two dogs on a beach", good), ("a red bus", other)):
        alone = tiny_retrieval_model.encode_texts([text])
        np.testing.assert_allclose(encoded.pooled, alone.pooled, atol=1e-5)
        assert encoded.token_ids == alone.token_ids
        assert encoded.precompute.words.shape == alone.precompute.words.shape
        np.testing.assert_allclose(
            encoded.precompute.words.numpy(), alone.precompute.words.numpy(), atol=1e-5
        )

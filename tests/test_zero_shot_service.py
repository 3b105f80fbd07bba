"""The first searches a newcomer makes, end to end: uvicorn on a free port, a temp data dir,
the shipped default model and the real grid extractor; scikit-image's 17 demo photos (what
`camp-search demo` ingests) are ingested over HTTP, then short everyday queries are searched.

The queries are ones the shipped model WITHOUT its zero-shot channel (model/zeroshot.py) ranks
below first, reranked (bench/zero_shot_channel.py prints every demo query's rank with and
without): the test fails without the channel.
"""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import pytest
from redis_server import free_port
from service_support import ServerThread, make_settings

from service.api.app import create_app
from service.cli.bulk_ingest import HttpTarget, ingest
from service.cli.demo import demo_items

# (query, photo, rerank): the shipped model ranks the photo 2nd or lower for each without its
# channel (bench/zero_shot_channel.py, the author's own query list) and first with it
CHANNEL_QUERIES = (
    ("galaxies in space", "hubble_deep_field.jpg", True),
    ("pebbles", "gravel.png", True),
    ("an espresso", "coffee.png", False),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    settings = make_settings(tmp_path_factory.mktemp("zero-shot") / "data", port=port)
    server = ServerThread(create_app(settings), port).start(timeout_s=300)

    async def ingest_demo():
        target = await HttpTarget(server.url).open()
        try:
            return await ingest(demo_items(), target, jobs=2)
        finally:
            await target.close()

    report = asyncio.run(ingest_demo())
    assert report.added == len(demo_items()) and not report.refused
    yield server
    server.stop()


def test_the_service_serves_the_model_with_its_zero_shot_channel(server) -> None:
    info = httpx.get(f"{server.url}/v1/info", timeout=60).json()
    assert info["corpus"]["images"] == len(demo_items())
    assert info["embedding_dim"] == 128 + 384  # pooled heads + the channel's MiniLM space


@pytest.mark.parametrize(("query", "photo_name", "rerank"), CHANNEL_QUERIES)
def test_everyday_queries_put_their_photo_first(
    server, query: str, photo_name: str, rerank: bool
) -> None:
    photo = next(item for item in demo_items() if item.path.name == photo_name)
    expected = hashlib.sha256(photo.path.read_bytes()).hexdigest()
    with httpx.Client(base_url=server.url, timeout=120) as client:
        response = client.post(
            "/v1/search/images", json={"text": query, "limit": 3, "rerank": rerank}
        )
        assert response.status_code == 200, response.text
        top = response.json()["results"][0]
        found = client.get(f"/v1/images/{top['id']}").json()["sha256"]
    assert found == expected, f"{query!r}: top hit is not {photo_name}"

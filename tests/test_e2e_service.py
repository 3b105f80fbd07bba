"""End to end with the real stack: uvicorn on a free port, a real redis-server, a temp data
dir, the shipped default model and the real grid extractor. coco-mini's 239 photos are
ingested over HTTP with 4 of their 5 captions; the 5th is held out as a text query.

The module ingests once (~1 minute on 2 CPU cores); the tests then run in file order against
that one corpus (the delete and restart tests come last).
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from redis_server import RedisServer, free_port
from service_support import ServerThread, make_settings

from service.api.app import create_app
from service.cli.bulk_ingest import HttpTarget, ingest, read_source

CAPTIONS_KEPT = 4
HELD_OUT = 4  # index of the held-out caption
TOP_K = 10
QUERY_THREADS = 4
PHOTO_QUERIES = 40


class Stack:
    """A running server on a data dir, with its Redis; `restart` keeps the data dir."""

    def __init__(self, data_dir: Path, redis: RedisServer) -> None:
        self.data_dir = data_dir
        self.redis = redis
        self.port = free_port()
        self.server: ServerThread | None = None

    def start(self) -> Stack:
        settings = make_settings(self.data_dir, redis_url=self.redis.url, port=self.port)
        self.server = ServerThread(create_app(settings), self.port).start(timeout_s=300)
        self.client = httpx.Client(base_url=self.server.url, timeout=120)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.client.close()
            self.server.stop()
            self.server = None

    def search_images(self, text: str, **options: object) -> list[dict]:
        response = self.client.post("/v1/search/images", json={"text": text, **options})
        assert response.status_code == 200, response.text
        return response.json()["results"]


@pytest.fixture(scope="module")
def manifest(shared_dir) -> Path:
    return shared_dir / "data" / "coco-mini" / "manifest.jsonl"


@pytest.fixture(scope="module")
def rows(manifest) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, manifest):
    redis = RedisServer(tmp_path_factory.mktemp("e2e-redis")).start()
    stack = Stack(tmp_path_factory.mktemp("e2e") / "data", redis).start()
    items = read_source(manifest, max_captions=CAPTIONS_KEPT)

    async def ingest_all():
        target = await HttpTarget(stack.server.url).open()
        try:
            return await ingest(items, target, jobs=2)
        finally:
            await target.close()

    stack.first_report = asyncio.run(ingest_all())
    stack.second_report = asyncio.run(ingest_all())
    yield stack
    stack.stop()
    redis.kill()


def ids_by_sha(stack: Stack, rows: list[dict], manifest: Path) -> dict[str, int]:
    import hashlib

    found = {}
    for row in rows:
        sha = hashlib.sha256((manifest.parent / row["image"]).read_bytes()).hexdigest()
        data = stack.client.get("/v1/images", params={"sha256": sha}).json()["data"]
        if data:
            found[row["image"]] = data[0]["id"]
    return found


def test_bulk_ingest_over_http_is_complete_and_resumable(stack, rows) -> None:
    first, second = stack.first_report, stack.second_report
    assert (first.added, first.existing, first.refused) == (len(rows), 0, [])
    assert (second.added, second.existing, second.refused) == (0, len(rows), [])
    info = stack.client.get("/v1/info").json()
    assert info["corpus"] == {"images": len(rows), "captions": CAPTIONS_KEPT * len(rows)}
    assert info["model_version"] and info["extractor"] == "grid"


def test_held_out_captions_find_their_photo(stack, rows, manifest) -> None:
    ids = ids_by_sha(stack, rows, manifest)
    queries = [(row["captions"][HELD_OUT], ids[row["image"]]) for row in rows]

    def rank_of(query: tuple[str, int]) -> int | None:
        hits = stack.search_images(query[0], limit=TOP_K)
        found = [h["id"] for h in hits]
        return found.index(query[1]) if query[1] in found else None

    with ThreadPoolExecutor(QUERY_THREADS) as pool:
        ranks = list(pool.map(rank_of, queries))
    hit_rate = sum(r is not None for r in ranks) / len(ranks)
    hit_at_1 = sum(r == 0 for r in ranks) / len(ranks)
    chance = TOP_K / len(rows)
    print(
        f"\nheld-out caption -> photo over {len(rows)} photos: hit@1 {hit_at_1:.3f}, "
        f"hit@{TOP_K} {hit_rate:.3f} (chance {chance:.3f})"
    )
    assert hit_rate > 5 * chance


def test_photo_queries_find_their_captions(stack, rows, manifest) -> None:
    ids = ids_by_sha(stack, rows, manifest)
    found_by_upload = found_by_id = 0
    for row in rows[:PHOTO_QUERIES]:
        image_id = ids[row["image"]]
        data = (manifest.parent / row["image"]).read_bytes()
        upload = stack.client.post(
            "/v1/search/captions", files={"file": ("q.jpg", data)}, data={"limit": str(TOP_K)}
        )
        assert upload.status_code == 200, upload.text
        found_by_upload += image_id in {h["image_id"] for h in upload.json()["results"]}
        by_id = stack.client.post(
            "/v1/search/captions", json={"image_id": image_id, "limit": TOP_K}
        )
        found_by_id += image_id in {h["image_id"] for h in by_id.json()["results"]}
        assert [h["id"] for h in by_id.json()["results"]] == [
            h["id"] for h in upload.json()["results"]
        ]
    rate = found_by_upload / PHOTO_QUERIES
    print(f"\nphoto -> one of its own captions in the top {TOP_K}: {rate:.3f}")
    assert found_by_upload == found_by_id
    assert rate > 0.5


def test_explanations_for_the_ui(stack, rows) -> None:
    hits = stack.search_images(rows[0]["captions"][HELD_OUT], limit=3, explain=True)
    for hit in hits:
        explanation = hit["explanation"]
        assert len(explanation["boxes"]) == 49
        assert len(explanation["word_region"]) == len(explanation["words"])
        assert all(len(row) == 49 for row in explanation["word_region"])


def test_search_survives_redis_going_down(stack, rows) -> None:
    query = rows[1]["captions"][HELD_OUT]
    before = [h["id"] for h in stack.search_images(query)]
    stack.redis.kill()
    try:
        ready = stack.client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert "cache:redis" in {c["name"] for c in ready.json()["components"] if not c["ok"]}
        assert [h["id"] for h in stack.search_images(query)] == before
        uploaded = stack.client.post(
            "/v1/search/captions",
            files={"file": ("q.png", _fresh_png())},
        )
        assert uploaded.status_code == 200
    finally:
        stack.redis.start()
    assert stack.client.get("/readyz").json()["status"] == "ready"


def test_deleted_photo_never_appears_again(stack, rows, manifest) -> None:
    ids = ids_by_sha(stack, rows, manifest)
    row = rows[2]
    victim = ids[row["image"]]
    query = row["captions"][HELD_OUT]
    assert stack.client.delete(f"/v1/images/{victim}").status_code == 204
    for options in ({"limit": 100, "candidates": 239}, {"limit": 100, "rerank": False}):
        assert victim not in {h["id"] for h in stack.search_images(query, **options)}
    data = (manifest.parent / row["image"]).read_bytes()
    captions = stack.client.post(
        "/v1/search/captions", files={"file": ("q.jpg", data)}, data={"limit": "100"}
    ).json()["results"]
    assert victim not in {h["image_id"] for h in captions}
    assert stack.client.get(f"/v1/images/{victim}/file").status_code == 404


def test_restart_keeps_everything(stack, rows) -> None:
    query = rows[5]["captions"][HELD_OUT]
    before_info = stack.client.get("/v1/info").json()["corpus"]
    before = [(h["id"], round(h["score"], 4)) for h in stack.search_images(query)]
    stack.stop()
    stack.start()
    assert stack.client.get("/v1/info").json()["corpus"] == before_info
    after = [(h["id"], round(h["score"], 4)) for h in stack.search_images(query)]
    assert after == before
    assert before_info["images"] == len(rows) - 1  # the deleted photo stays deleted


def _fresh_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (120, 90), (40, 160, 220)).save(buffer, "PNG")
    return buffer.getvalue()

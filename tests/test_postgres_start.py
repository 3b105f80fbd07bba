"""A replica whose PostgreSQL primary is down at start waits for it instead of failing: a real
`camp-search serve` process (a small checkpoint, so it starts in seconds) against a server
that is not running yet (`postgres_cluster.PostgresServer`, its own cluster on a free port).
Meanwhile it is live, not ready, and says which database it waits for; searches and writes get
503 + Retry-After; once the server starts it migrates, builds and serves."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest
from postgres_cluster import PostgresServer, postgres_available
from service_support import TEST_API_KEY, coco_photos, save_small_checkpoint
from test_postgres_api import spawn_replica

READY_AFTER_START_S = 20.0  # database up -> replica ready: back-off (1 s here) + migrate + build
PASSWORD = "not-shown-anywhere"


@pytest.fixture
def stopped_server():
    if not postgres_available():
        pytest.skip("no PostgreSQL binaries")
    server = PostgresServer.create()  # initdb only: nothing listens on its port yet
    try:
        yield server
    finally:
        server.remove()


def _readiness(url: str) -> httpx.Response:
    return httpx.get(f"{url}/readyz", timeout=10)


def test_a_replica_started_before_its_database_waits_then_serves(
    tmp_path, shared_dir, stopped_server, tiny_retrieval_model
) -> None:
    checkpoint = save_small_checkpoint(tiny_retrieval_model, tmp_path / "small.pt")
    # A password in the URL (trust auth ignores it) must not show on /readyz or in the log.
    database_url = stopped_server.url.replace("postgres@", f"postgres:{PASSWORD}@")
    log = tmp_path / "replica.log"
    process, url = spawn_replica(
        tmp_path / "images",
        database_url,
        log,
        checkpoint=str(checkpoint),
        database_retry_max_s="1.0",
    )
    try:
        (photo, captions), *_ = coco_photos(shared_dir, 1)
        deadline = time.monotonic() + 60
        while True:  # until the process answers and has tried the database
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                ready = _readiness(url)
                if any(c["name"] == "database" for c in ready.json()["components"]):
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        assert ready.status_code == 503 and ready.headers["Retry-After"]
        body = ready.json()
        assert body["status"] == "starting"
        database = next(c for c in body["components"] if c["name"] == "database")
        assert not database["ok"]
        assert f"127.0.0.1:{stopped_server.port}" in database["detail"]
        assert "not reachable" in database["detail"] and PASSWORD not in database["detail"]

        search = httpx.post(f"{url}/v1/search/images", json={"text": captions[0]}, timeout=10)
        write = httpx.post(
            f"{url}/v1/images",
            files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
            headers={"X-API-Key": TEST_API_KEY},
            timeout=10,
        )
        for refused in (search, write):
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.headers["Retry-After"]
            assert "waiting for the database" in refused.json()["detail"]
            assert PASSWORD not in refused.text

        time.sleep(2.0)  # more retries (0.5, 1, 1 s apart): logged once, not once per retry
        stopped_server.start()
        started = time.monotonic()
        while _readiness(url).status_code != 200:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() - started < READY_AFTER_START_S, log.read_text()[-3000:]
            time.sleep(0.1)

        added = httpx.post(
            f"{url}/v1/images",
            files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
            data={"captions": captions[:1]},
            headers={"X-API-Key": TEST_API_KEY},
            timeout=60,
        )
        assert added.status_code == 201, added.text
        found = httpx.post(f"{url}/v1/search/images", json={"text": captions[0]}, timeout=60)
        assert found.status_code == 200
        assert added.json()["id"] in [hit["id"] for hit in found.json()["results"]]
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    logged = log.read_text()
    assert PASSWORD not in logged
    # Refused many times, logged once (a "starting up" answer would be a new reason: a line).
    assert logged.count("Connection refused") == 1, logged[-3000:]
    assert "answers (after" in logged

"""Two real API processes (`camp-search serve`, the shipped default model) on one PostgreSQL
database and one images folder: a write on A is found on B, read-your-writes by the change
sequence, and a database that stops answering gives 503 + Retry-After, never a 500."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
from redis_server import free_port
from service_support import TEST_API_KEY, coco_photos, make_settings, png_bytes, running_client
from ui_stack import camp_search_command

from service.api.app import create_app
from service.api.sequence import MIN_SEQUENCE_HEADER, SEQUENCE_HEADER

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_READY_S = 120.0
WRITE_HEADERS = {"X-API-Key": TEST_API_KEY}


def spawn_replica(
    data_dir: Path, database_url: str, log: Path, **settings: str
) -> tuple[subprocess.Popen, str]:
    """`camp-search serve` on a free port; `settings` are more CAMPSEARCH_ variables."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPSEARCH_")}
    env.update(
        CAMPSEARCH_DATA_DIR=str(data_dir),
        CAMPSEARCH_DATABASE_URL=database_url,
        CAMPSEARCH_API_KEYS=TEST_API_KEY,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO_ROOT),
        **{f"CAMPSEARCH_{name.upper()}": value for name, value in settings.items()},
    )
    command = [camp_search_command(), "serve", "--port", str(port), "--log-level", "warning"]
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=out, cwd=log.parent)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_READY_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError(log.read_text()[-3000:])


@contextmanager
def database_refusing_connections(url: str) -> Iterator[None]:
    """The database stops answering (connections cut and refused) inside the block."""
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
    try:
        yield
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def search_ids(url: str, text: str, headers: dict[str, str] | None = None) -> list[int]:
    response = httpx.post(
        f"{url}/v1/search/images", json={"text": text, "limit": 50}, headers=headers, timeout=30
    )
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["results"]]


@pytest.mark.slow  # two processes load the default model: ~50 s on 2 cores
def test_two_replicas_share_one_database(tmp_path, shared_dir, postgres_url) -> None:
    data_dir = tmp_path / "shared-images"
    # Both start at once: their schema migrations race for the advisory lock.
    first, url_a = spawn_replica(data_dir, postgres_url, tmp_path / "a.log")
    second, url_b = spawn_replica(data_dir, postgres_url, tmp_path / "b.log")
    try:
        wait_ready(first, url_a, tmp_path / "a.log")
        wait_ready(second, url_b, tmp_path / "b.log")
        # No data-directory lock in this mode: both replicas serve the same folder.
        assert not (data_dir / ".campsearch.lock").exists()
        ready = httpx.get(f"{url_b}/readyz", timeout=10).json()
        database = next(c for c in ready["components"] if c["name"] == "database")
        assert database["ok"] and "applied change sequence" in database["detail"]
        assert (
            httpx.get(f"{url_a}/v1/info", timeout=10)
            .json()["database"]["url"]
            .startswith("postgresql://")
        )

        (photo, captions), (other_photo, _) = coco_photos(shared_dir, 2)
        added = httpx.post(
            f"{url_a}/v1/images",
            files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
            data={"captions": captions[:2]},
            headers=WRITE_HEADERS,
            timeout=60,
        )
        assert added.status_code == 201, added.text
        image_id = added.json()["id"]
        sequence = int(added.headers[SEQUENCE_HEADER])
        assert sequence > 0

        # Read-your-writes on the OTHER replica: it waits until it applied the write.
        wait = {MIN_SEQUENCE_HEADER: str(sequence)}
        assert image_id in search_ids(url_b, captions[0], wait)
        record = httpx.get(f"{url_b}/v1/images/{image_id}", timeout=10)
        assert record.status_code == 200
        served = httpx.get(f"{url_b}/v1/images/{image_id}/file", timeout=10)
        assert served.status_code == 200 and served.content == photo.read_bytes()
        info = httpx.get(f"{url_b}/v1/info", timeout=10).json()
        assert info["database"]["applied_sequence"] >= sequence
        assert info["corpus"]["images"] == 1

        # A sequence never written: 503 with Retry-After after the bounded wait, not stale.
        too_far = httpx.post(
            f"{url_b}/v1/search/images",
            json={"text": captions[0]},
            headers={MIN_SEQUENCE_HEADER: str(sequence + 10_000)},
            timeout=30,
        )
        assert too_far.status_code == 503 and too_far.headers["Retry-After"] == "1"
        assert too_far.json()["title"] == "Not caught up"
        bad = httpx.post(
            f"{url_b}/v1/search/images",
            json={"text": captions[0]},
            headers={MIN_SEQUENCE_HEADER: "soon"},
            timeout=30,
        )
        assert bad.status_code == 422

        # Delete on B; A stops finding it (waiting for B's delete by its sequence).
        deleted = httpx.delete(f"{url_b}/v1/images/{image_id}", headers=WRITE_HEADERS, timeout=30)
        assert deleted.status_code == 204
        delete_sequence = int(deleted.headers[SEQUENCE_HEADER])
        assert delete_sequence > sequence
        after = search_ids(url_a, captions[0], {MIN_SEQUENCE_HEADER: str(delete_sequence)})
        assert image_id not in after
        assert httpx.get(f"{url_a}/v1/images/{image_id}", timeout=10).status_code == 404

        # The database stops answering: a write is refused with 503 + Retry-After, and
        # nothing is half-written once it answers again.
        with database_refusing_connections(postgres_url):
            refused = httpx.post(
                f"{url_a}/v1/images",
                files={"file": (other_photo.name, other_photo.read_bytes(), "image/jpeg")},
                headers=WRITE_HEADERS,
                timeout=60,
            )
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "2"
            assert refused.json()["title"] == "Database unavailable"
            assert httpx.get(f"{url_a}/readyz", timeout=30).status_code == 503
        with psycopg.connect(postgres_url) as conn:
            assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == 0
            assert conn.execute("SELECT count(*) FROM features").fetchone()[0] == 0
        # A client that honours Retry-After gets through once the pool has reconnected.
        deadline = time.monotonic() + 30
        while True:
            retried = httpx.post(
                f"{url_a}/v1/images",
                files={"file": (other_photo.name, other_photo.read_bytes(), "image/jpeg")},
                headers=WRITE_HEADERS,
                timeout=60,
            )
            if retried.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(float(retried.headers["Retry-After"]))
        assert retried.status_code == 201, retried.text
    finally:
        for process in (first, second):
            process.terminate()
        for process in (first, second):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def test_two_apps_on_one_database_read_their_writes(
    tmp_path, shared_dir, postgres_url, tiny_retrieval_model, small_grid_extractor
) -> None:
    """The same through two in-process apps (the small test model): the default suite's
    check of the sequence headers; the embedded mode sends none."""
    (photo, captions), *_ = coco_photos(shared_dir, 1)
    settings = make_settings(
        tmp_path / "shared", database_url=postgres_url, api_keys=[TEST_API_KEY]
    )
    apps = [
        create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
        for _ in range(2)
    ]
    with running_client(apps[0]) as first, running_client(apps[1]) as second:
        added = first.post(
            "/v1/images",
            files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
            data={"captions": captions[:1]},
            headers=WRITE_HEADERS,
        )
        assert added.status_code == 201, added.text
        sequence = added.headers[SEQUENCE_HEADER]
        found = second.post(
            "/v1/search/images",
            json={"text": captions[0], "limit": 10},
            headers={MIN_SEQUENCE_HEADER: sequence},
        )
        assert found.status_code == 200
        assert added.json()["id"] in [hit["id"] for hit in found.json()["results"]]
        assert second.get("/v1/info").json()["database"]["applied_sequence"] >= int(sequence)

        with database_refusing_connections(postgres_url):
            refused = first.post(
                "/v1/images",
                files={"file": ("x.png", png_bytes("red"), "image/png")},
                headers=WRITE_HEADERS,
            )
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "2"
            assert refused.headers["content-type"] == "application/problem+json"
            assert first.get("/readyz").status_code == 503
    embedded = create_app(
        make_settings(tmp_path / "embedded", api_keys=[TEST_API_KEY]),
        model=tiny_retrieval_model,
        extractor=small_grid_extractor,
    )
    with running_client(embedded) as client:
        stored = client.post(
            "/v1/images",
            files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
            headers=WRITE_HEADERS,
        )
        assert stored.status_code == 201 and SEQUENCE_HEADER not in stored.headers
        assert client.get("/v1/info").json()["database"] is None

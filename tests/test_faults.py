"""Faults: Redis killed under load, the API SIGKILLed during a bulk ingest, index files lost
while stopped, and a full disk. Real processes and real file systems throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from redis_server import free_port
from security_support import served
from service_support import TEST_API_KEY, coco_photos, make_settings, png_bytes
from ui_stack import camp_search_command

from service.api.app import create_app

FAULT_SERVER = Path(__file__).with_name("fault_server.py")
REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_READY_S = 120.0
INGEST_PHOTOS = 24
KILL_AFTER_IMAGES = 6
SEARCH_THREADS = 3
TMPFS_BYTES = 3 * 2**20


# --- Redis killed under load -------------------------------------------------------------------


def test_redis_killed_under_load_search_goes_on_and_the_cache_comes_back(
    tmp_path, shared_dir, redis_server, tiny_retrieval_model, small_grid_extractor
) -> None:
    settings = make_settings(tmp_path / "data", redis_url=redis_server.url, rate_limit_requests=0)
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with served(app) as server:
        rows = coco_photos(shared_dir, 6)
        for path, captions in rows:
            httpx.post(
                f"{server.url}/v1/images",
                files={"file": (path.name, path.read_bytes())},
                data={"captions": captions[:4]},
                timeout=60,
            ).raise_for_status()
        queries = [captions[4] for _, captions in rows]
        statuses: Counter[int] = Counter()
        stop = threading.Event()

        def search_loop(offset: int) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                n = offset
                while not stop.is_set():
                    response = client.post(
                        "/v1/search/images", json={"text": queries[n % len(queries)], "limit": 3}
                    )
                    statuses[response.status_code] += 1
                    n += 1

        threads = [threading.Thread(target=search_loop, args=(i,)) for i in range(SEARCH_THREADS)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            redis_server.kill()
            time.sleep(1.0)
            degraded = httpx.get(f"{server.url}/readyz", timeout=10)
            assert degraded.status_code == 200 and degraded.json()["status"] == "degraded"
            cache = [c for c in degraded.json()["components"] if c["name"].startswith("cache")]
            assert cache and cache[0]["ok"] is False
            served_while_down = sum(statuses.values())
            time.sleep(2.0)
            assert sum(statuses.values()) > served_while_down  # searches went on
            redis_server.start()  # same port: the server reconnects by itself
            deadline = time.monotonic() + 15
            while httpx.get(f"{server.url}/readyz", timeout=10).json()["status"] != "ready":
                assert time.monotonic() < deadline, "readiness did not recover"
                time.sleep(0.2)
            time.sleep(1.0)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        assert set(statuses) == {200}, statuses
        # The restarted (empty) Redis is used again: an uploaded photo's regions are written
        # to it on the first search and read back from it on the second.
        cache = app.state.service.runtime.cache
        hits_before = cache.status().stats.hits
        new_photo = coco_photos(shared_dir, 7)[6][0].read_bytes()
        for _ in range(2):
            response = httpx.post(
                f"{server.url}/v1/search/captions",
                files={"file": ("q.jpg", new_photo)},
                timeout=60,
            )
            assert response.status_code == 200
        assert cache.status().stats.hits > hits_before
        assert redis_server.client().dbsize() > 0


# --- the API SIGKILLed during a bulk ingest ------------------------------------------------------


def start_fault_server(data_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPSEARCH_")}
    env.update(
        CAMPSEARCH_DATA_DIR=str(data_dir),
        CAMPSEARCH_API_KEYS=TEST_API_KEY,
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]),
    )
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, str(FAULT_SERVER), str(port)], env=env, stdout=out, stderr=out
        )
    deadline = time.monotonic() + SERVER_READY_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError(log.read_text()[-3000:])


def stored_images(url: str) -> list[dict]:
    images = []
    image_id, misses = 1, 0
    count = httpx.get(f"{url}/v1/info", timeout=10).json()["corpus"]["images"]
    while len(images) < count and misses < 1000:
        response = httpx.get(f"{url}/v1/images/{image_id}", timeout=10)
        if response.status_code == 200:
            images.append(response.json())
        else:
            misses += 1
        image_id += 1
    return images


def ingest_command(manifest: Path, url: str) -> list[str]:
    return [camp_search_command(), "ingest", str(manifest), "--server", url, "--jobs", "2"]


def test_api_killed_during_bulk_ingest_loses_and_duplicates_nothing(tmp_path, shared_dir) -> None:
    rows = coco_photos(shared_dir, INGEST_PHOTOS)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        "".join(json.dumps({"image": str(p), "captions": c[:4]}) + "\n" for p, c in rows)
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    client_env = {**os.environ, "CAMPSEARCH_API_KEY": TEST_API_KEY}
    server = start_fault_server(data_dir, port, log)
    ingest = subprocess.Popen(
        ingest_command(manifest, url),
        env=client_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        acknowledged = 0
        deadline = time.monotonic() + SERVER_READY_S
        while acknowledged < KILL_AFTER_IMAGES:  # every counted image was acknowledged (201)
            assert time.monotonic() < deadline and ingest.poll() is None
            acknowledged = httpx.get(f"{url}/v1/info", timeout=10).json()["corpus"]["images"]
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        _, errors = ingest.communicate(timeout=120)
        assert ingest.returncode == 2, errors  # the client stops: the server is gone
        assert "rerun the same command to resume" in errors

        server = start_fault_server(data_dir, port, log)
        images = stored_images(url)
        assert len(images) >= acknowledged
        hashes = Counter(image["sha256"] for image in images)
        assert all(n == 1 for n in hashes.values()), "an image was stored twice"
        for image in images:
            assert len(image["captions"]) == 4, image  # a photo and its captions in one commit
            assert httpx.get(f"{url}{image['url']}", timeout=10).status_code == 200
        results = httpx.post(
            f"{url}/v1/search/images",
            json={"text": "a photo", "limit": 50, "candidates": 100},
            timeout=60,
        ).json()["results"]
        assert {hit["id"] for hit in results} == {image["id"] for image in images}

        resumed = subprocess.run(
            ingest_command(manifest, url), env=client_env, capture_output=True, text=True
        )
        assert resumed.returncode == 0, resumed.stderr
        assert f"{len(images)} already stored" in resumed.stderr
        final = stored_images(url)
        assert len(final) == INGEST_PHOTOS
        assert len({image["sha256"] for image in final}) == INGEST_PHOTOS
    finally:
        if ingest.poll() is None:
            ingest.kill()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


# --- index files lost while stopped ------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "truncated", "garbage"])
def test_index_files_damaged_while_stopped_are_rebuilt_on_start(
    tmp_path, shared_dir, tiny_retrieval_model, small_grid_extractor, damage
) -> None:
    settings = make_settings(tmp_path / "data", rate_limit_requests=0)

    def search(url: str) -> list[int]:
        response = httpx.post(
            f"{url}/v1/search/images", json={"text": "a dog", "limit": 10}, timeout=60
        )
        assert response.status_code == 200
        return [hit["id"] for hit in response.json()["results"]]

    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with served(app) as server:
        for path, captions in coco_photos(shared_dir, 4):
            httpx.post(
                f"{server.url}/v1/images",
                files={"file": (path.name, path.read_bytes())},
                data={"captions": captions[:2]},
                timeout=60,
            ).raise_for_status()
        before = search(server.url)
    index_files = sorted((tmp_path / "data" / "index").glob("*.faiss"))
    assert index_files, "the indexes were not saved on shutdown"
    for index_file in index_files:
        if damage == "deleted":
            index_file.unlink()
        elif damage == "truncated":
            index_file.write_bytes(index_file.read_bytes()[: index_file.stat().st_size // 3])
        else:
            index_file.write_bytes(os.urandom(index_file.stat().st_size))

    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with served(app) as server:
        info = httpx.get(f"{server.url}/v1/info", timeout=10).json()
        assert info["corpus"] == {"images": 4, "captions": 8}
        assert search(server.url) == before


# --- a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path):
    """A tmpfs of TMPFS_BYTES mounted for this test (needs root / CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({result.stderr.strip()}); the LMDB-capped full store "
            "is covered by test_api_errors.py::test_full_storage_is_507_and_nothing_is_written"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_answers_507_and_leaves_nothing_half_written(
    small_filesystem, shared_dir, tiny_retrieval_model, small_grid_extractor
) -> None:
    data_dir = small_filesystem / "data"
    settings = make_settings(data_dir, rate_limit_requests=0)
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    created: list[int] = []
    refusal = None
    with served(app) as server:
        for path, captions in coco_photos(shared_dir, 60):
            response = httpx.post(
                f"{server.url}/v1/images",
                files={"file": (path.name, path.read_bytes())},
                data={"captions": captions[:2]},
                timeout=60,
            )
            if response.status_code == 201:
                created.append(response.json()["id"])
                continue
            refusal = response
            break
        assert refusal is not None, "the 3 MiB file system never filled up"
        assert refusal.status_code in (503, 507), refusal.text
        assert refusal.headers["content-type"] == "application/problem+json"
        assert "storage is full" in refusal.json()["detail"]
        assert created, "nothing fit at all"

        info = httpx.get(f"{server.url}/v1/info", timeout=10).json()
        assert info["corpus"]["images"] == len(created)
        stored_files = [p for p in (data_dir / "images").rglob("*") if p.is_file()]
        assert len(stored_files) == len(created)  # no orphan file of the refused photo
        for image_id in created:
            assert httpx.get(f"{server.url}/v1/images/{image_id}/file").status_code == 200
        search = httpx.post(f"{server.url}/v1/search/images", json={"text": "a"}, timeout=60)
        assert search.status_code == 200  # reads go on while the disk is full

        # space freed -> writes work again
        assert httpx.delete(f"{server.url}/v1/images/{created[0]}").status_code == 204
        assert httpx.delete(f"{server.url}/v1/images/{created[1]}").status_code == 204
        small = httpx.post(
            f"{server.url}/v1/images", files={"file": ("s.png", png_bytes("navy"))}, timeout=60
        )
        assert small.status_code == 201, small.text


# --- sustained mixed load (slow: bench/load.py carries the figures) ----------------------------


@pytest.mark.slow
def test_mixed_load_from_64_clients_has_no_5xx_and_nothing_over_the_timeout(tmp_path) -> None:
    """bench/load.py for 60 s: text search, photo search and ingest from 64 clients."""
    out = tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "load.py"), "--seconds", "60", "--json", out],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    load = json.loads(out.read_text())["load"]
    assert load["clients"] == 64 and load["requests"] > 0
    assert load["server_errors_5xx"] == 0
    assert load["over_request_timeout"] == 0
    assert load["transport_errors"] == {}

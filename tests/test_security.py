"""Security: writes need a valid key, keys never reach logs, ids cannot read outside the data
dir, CORS is closed unless configured, and rate limits (shared through Redis) answer 429.

Real servers throughout: uvicorn on loopback (raw sockets where a URL must reach the server
unnormalised), a real redis-server for the shared limiter.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from security_support import raw_get, served
from service_support import TEST_API_KEY, coco_photos, make_settings, png_bytes, running_client

from service.api.app import create_app

WRONG_KEY = "wrong-key-0123456789abcdef"
WINDOW_S = 3600  # long windows: a test never straddles two
SECRET = b"secret outside the data dir: do not serve"


def secured_app(tmp_path, model, extractor, **overrides):
    settings = make_settings(tmp_path / "data", api_keys=TEST_API_KEY, **overrides)
    return create_app(settings, model=model, extractor=extractor)


def image_count(client) -> int:
    return client.get("/v1/info").json()["corpus"]["images"]


# --- API keys ----------------------------------------------------------------------------------


def test_every_write_without_a_valid_key_is_refused_and_writes_nothing(
    tmp_path, tiny_retrieval_model, small_grid_extractor
) -> None:
    app = secured_app(tmp_path, tiny_retrieval_model, small_grid_extractor)
    with running_client(app) as client:
        good = {"X-API-Key": TEST_API_KEY}
        photo = client.post("/v1/images", files={"file": ("a.png", png_bytes("red"))}, headers=good)
        assert photo.status_code == 201
        image_id = photo.json()["id"]
        caption = client.post("/v1/captions", json={"text": "a red square"}, headers=good)
        caption_id = caption.json()["id"]

        writes = [
            ("POST", "/v1/images", {"files": {"file": ("b.png", png_bytes("blue"))}}),
            ("POST", "/v1/captions", {"json": {"text": "a caption"}}),
            ("DELETE", f"/v1/images/{image_id}", {}),
            ("DELETE", f"/v1/captions/{caption_id}", {}),
        ]
        bad_keys = [
            {},
            {"X-API-Key": ""},
            {"X-API-Key": WRONG_KEY},
            {"X-API-Key": TEST_API_KEY[:-1]},  # a prefix
            {"X-API-Key": TEST_API_KEY + "x"},  # an extension
            {"X-API-Key": TEST_API_KEY.upper()},
            {"x-api-key": f" {TEST_API_KEY} ".replace(" ", "\t")},
            {"Authorization": f"Bearer {TEST_API_KEY}"},  # the key, in the wrong place
        ]
        for method, url, kwargs in writes:
            for headers in bad_keys:
                response = client.request(method, url, headers=headers, **kwargs)
                assert response.status_code == 401, (method, url, headers, response.text)
                assert response.headers["www-authenticate"] == "X-API-Key"
                assert TEST_API_KEY not in response.text
        assert image_count(client) == 1
        assert client.get(f"/v1/captions/{caption_id}").status_code == 200
        # reads stay open
        assert client.get(f"/v1/images/{image_id}").status_code == 200
        search = client.post("/v1/search/images", json={"text": "red"})
        assert search.status_code == 200


# --- keys never logged ---------------------------------------------------------------------------

UVICORN_LOGGERS = ("uvicorn", "uvicorn.access", "uvicorn.error")


@contextmanager
def uvicorn_logs_into(caplog) -> Iterator[None]:
    """uvicorn's loggers (access log included) at DEBUG and propagating to caplog; restored
    afterwards (uvicorn configured them not to propagate)."""
    saved = [(logging.getLogger(n), logging.getLogger(n).propagate) for n in UVICORN_LOGGERS]
    levels = [(logger, logger.level, logger.disabled) for logger, _ in saved]
    for logger, _ in saved:
        logger.propagate, logger.disabled = True, False
        logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for (logger, propagate), (_, level, disabled) in zip(saved, levels, strict=True):
            logger.propagate, logger.disabled = propagate, disabled
            logger.setLevel(level)


def test_keys_never_appear_in_logs(
    tmp_path, tiny_retrieval_model, small_grid_extractor, caplog
) -> None:
    """Every log record of a real uvicorn (access log on, DEBUG) while clients use the right
    key, a wrong key, trip the rate limit and fail validation: neither key appears."""
    app = secured_app(
        tmp_path,
        tiny_retrieval_model,
        small_grid_extractor,
        rate_limit_requests=8,
        rate_limit_window_s=WINDOW_S,
    )
    caplog.set_level(logging.DEBUG)
    with served(app) as server, uvicorn_logs_into(caplog):
        for key in (TEST_API_KEY, WRONG_KEY):
            headers = {"X-API-Key": key}
            with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
                client.post("/v1/images", files={"file": ("a.png", png_bytes("green"))})
                client.post("/v1/captions", json={"text": ""})
                client.post("/v1/search/images", json={"text": "green", "limit": 10**9})
                for _ in range(10):  # past the rate limit
                    client.get("/v1/info")
                client.get(f"/v1/images?sha256={key}")  # a key where it does not belong
    logged = "\n".join(
        f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
        for record in caplog.records
    )
    assert any(r.name == "uvicorn.access" for r in caplog.records)  # the capture works
    assert "/v1/images" in logged
    assert TEST_API_KEY not in logged.replace(f"sha256={TEST_API_KEY}", "")
    assert WRONG_KEY not in logged.replace(f"sha256={WRONG_KEY}", "")
    settings_text = repr(app.state.service.settings) + app.state.service.settings.model_dump_json()
    assert TEST_API_KEY not in settings_text


# --- ids cannot read outside the data dir --------------------------------------------------------

TRAVERSALS = [
    "../../../../../../etc/passwd",
    "..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "%252e%252e%252fetc%252fpasswd",
    "..\\..\\..\\..\\etc\\passwd",
    "....//....//....//etc/passwd",
    "1/../../../../../../etc/passwd",
    "/etc/passwd",
    "%2fetc%2fpasswd",
    "1%00.jpg",
    "1;/etc/passwd",
    "0x1",
    "1e3",
    "-1",
    "9223372036854775808",
    "../secret.txt",
    "..%2fsecret.txt",
]
ID_ROUTES = [
    ("GET", "/v1/images/{}"),
    ("GET", "/v1/images/{}/file"),
    ("DELETE", "/v1/images/{}"),
    ("GET", "/v1/captions/{}"),
    ("DELETE", "/v1/captions/{}"),
    ("GET", "/{}"),  # the web UI's static files
]


@pytest.fixture
def served_with_a_secret(tmp_path, shared_dir, tiny_retrieval_model, small_grid_extractor):
    """A server whose data dir sits next to a secret file, with one photo stored."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    app = create_app(
        make_settings(tmp_path / "data", rate_limit_requests=0),
        model=tiny_retrieval_model,
        extractor=small_grid_extractor,
    )
    with served(app) as server:
        path, captions = coco_photos(shared_dir, 1)[0]
        stored = httpx.post(
            f"{server.url}/v1/images",
            files={"file": (path.name, path.read_bytes())},
            data={"captions": captions[:1]},
            timeout=60,
        )
        stored.raise_for_status()
        yield server, tmp_path / "data", stored.json()


def test_image_ids_cannot_reach_files_outside_the_data_dir(served_with_a_secret) -> None:
    server, _data_dir, stored = served_with_a_secret
    for method, route in ID_ROUTES:
        for attempt in TRAVERSALS:
            status, response = raw_get(server.port, route.format(attempt), method=method)
            assert status in (400, 404, 405, 422), (method, route, attempt, response[:300])
            assert b"root:" not in response and SECRET not in response
    # nothing was deleted by the attempts, and the real file is still served
    served_file = httpx.get(f"{server.url}/v1/images/{stored['id']}/file", timeout=10)
    assert served_file.status_code == 200 and served_file.content[:3] == b"\xff\xd8\xff"


def test_a_stored_path_leaving_the_data_dir_is_not_served(served_with_a_secret) -> None:
    """Stored paths come from the corpus, never from clients; if the catalog were tampered
    with to point outside the data dir (or at a symlink out of it), nothing is served."""
    server, data_dir, stored = served_with_a_secret
    image_url = f"{server.url}/v1/images/{stored['id']}/file"
    with sqlite3.connect(data_dir / "catalog.sqlite3") as db:
        (original,) = db.execute("SELECT stored_path FROM images WHERE id = ?", (stored["id"],))
        for outside in ("../secret.txt", str(data_dir.parent / "secret.txt"), "/etc/passwd"):
            db.execute("UPDATE images SET stored_path = ? WHERE id = ?", (outside, stored["id"]))
            db.commit()
            response = httpx.get(image_url, timeout=10)
            assert response.status_code == 404, (outside, response.status_code)
            assert SECRET not in response.content and b"root:" not in response.content
        link = data_dir / "images" / "link-out.jpg"
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(data_dir.parent / "secret.txt")
        db.execute(
            "UPDATE images SET stored_path = ? WHERE id = ?",
            (str(link.relative_to(data_dir)), stored["id"]),
        )
        db.commit()
        response = httpx.get(image_url, timeout=10)
        assert response.status_code == 404 and SECRET not in response.content
        db.execute("UPDATE images SET stored_path = ? WHERE id = ?", (original[0], stored["id"]))
        db.commit()
    assert httpx.get(image_url, timeout=10).status_code == 200


# --- CORS ----------------------------------------------------------------------------------------


def _preflight(client, origin: str) -> httpx.Response:
    return client.options(
        "/v1/search/images",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-api-key",
        },
    )


def test_cors_is_closed_by_default(tmp_path, tiny_retrieval_model, small_grid_extractor) -> None:
    app = secured_app(tmp_path, tiny_retrieval_model, small_grid_extractor)
    with running_client(app) as client:
        for origin in ("https://evil.example", "null", "http://127.0.0.1:8000"):
            assert "access-control-allow-origin" not in _preflight(client, origin).headers
            search = client.post(
                "/v1/search/images", json={"text": "x"}, headers={"Origin": origin}
            )
            assert search.status_code == 200
            assert "access-control-allow-origin" not in search.headers
            assert "access-control-allow-credentials" not in search.headers


def test_cors_opens_only_to_configured_origins(
    tmp_path, tiny_retrieval_model, small_grid_extractor
) -> None:
    allowed = "https://photos.example"
    app = secured_app(
        tmp_path, tiny_retrieval_model, small_grid_extractor, cors_origins=f"{allowed}"
    )
    with running_client(app) as client:
        preflight = _preflight(client, allowed)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == allowed
        assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
        search = client.post("/v1/search/images", json={"text": "x"}, headers={"Origin": allowed})
        assert search.headers["access-control-allow-origin"] == allowed
        for origin in ("https://evil.example", "https://photos.example.evil.example", "null"):
            assert "access-control-allow-origin" not in _preflight(client, origin).headers
            other = client.post("/v1/search/images", json={"text": "x"}, headers={"Origin": origin})
            assert "access-control-allow-origin" not in other.headers


# --- rate limiting -------------------------------------------------------------------------------


def assert_429(response: httpx.Response) -> int:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= WINDOW_S
    return retry_after


def test_requests_past_the_budget_get_429_with_retry_after(
    tmp_path, tiny_retrieval_model, small_grid_extractor
) -> None:
    app = secured_app(
        tmp_path,
        tiny_retrieval_model,
        small_grid_extractor,
        rate_limit_requests=5,
        rate_limit_writes=2,
        rate_limit_window_s=WINDOW_S,
    )
    with running_client(app) as client:
        for _ in range(5):
            assert client.get("/v1/info").status_code == 200
        assert_429(client.get("/v1/info"))
        assert_429(client.post("/v1/search/images", json={"text": "x"}))
        # a wrong key is the same client (random keys do not mint budgets) ...
        assert_429(client.get("/v1/info", headers={"X-API-Key": WRONG_KEY}))
        # ... a valid key has its own budget, with a smaller one for writes
        keyed = {"X-API-Key": TEST_API_KEY}
        for index in range(2):
            response = client.post("/v1/captions", json={"text": f"caption {index}"}, headers=keyed)
            assert response.status_code == 201
        limited = client.post("/v1/captions", json={"text": "one too many"}, headers=keyed)
        assert_429(limited)
        assert "writes" in limited.json()["detail"]
        assert client.get("/v1/info", headers=keyed).status_code == 200  # reads go on
        # operations endpoints are never limited
        for _ in range(10):
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 200


def test_the_budget_is_shared_across_replicas_through_redis(
    tmp_path, tiny_retrieval_model, small_grid_extractor, redis_server, caplog
) -> None:
    """Two API replicas (own data dirs, one Redis) draw on one budget; when Redis dies they
    keep answering (in-process budgets, logged) instead of refusing everyone."""
    options = dict(rate_limit_requests=4, rate_limit_window_s=WINDOW_S, redis_url=redis_server.url)
    first = secured_app(tmp_path / "a", tiny_retrieval_model, small_grid_extractor, **options)
    second = secured_app(tmp_path / "b", tiny_retrieval_model, small_grid_extractor, **options)
    keyed = {"X-API-Key": TEST_API_KEY}
    with running_client(first) as one, running_client(second) as two:
        for client in (one, two, one, two):
            assert client.get("/v1/info", headers=keyed).status_code == 200
        assert_429(one.get("/v1/info", headers=keyed))
        assert_429(two.get("/v1/info", headers=keyed))
        names = [name.decode() for name in redis_server.client().keys("campsearch:ratelimit:*")]
        assert names and all(TEST_API_KEY not in name for name in names)

        redis_server.kill()
        with caplog.at_level(logging.WARNING, logger="service.api.ratelimit"):
            for client in (one, two):
                response = client.get("/v1/info")  # a fresh (address) budget, per replica
                assert response.status_code == 200, response.text
        assert "Redis does not answer" in caplog.text


def test_the_budget_is_shared_across_replicas_through_a_redis_cluster(
    tmp_path, tiny_retrieval_model, small_grid_extractor
) -> None:
    """The same shared budget with CAMPSEARCH_REDIS_CLUSTER=true over a real 3-node cluster:
    each counter's INCR + EXPIRE transaction lands on the node that owns its key."""
    from redis_server import RedisClusterServers

    with RedisClusterServers(tmp_path / "cluster") as cluster:
        options = dict(
            rate_limit_requests=4,
            rate_limit_window_s=WINDOW_S,
            redis_url=cluster.url,
            redis_cluster=True,
        )
        first = secured_app(tmp_path / "a", tiny_retrieval_model, small_grid_extractor, **options)
        second = secured_app(tmp_path / "b", tiny_retrieval_model, small_grid_extractor, **options)
        keyed = {"X-API-Key": TEST_API_KEY}
        with running_client(first) as one, running_client(second) as two:
            for client in (one, two, one, two):
                assert client.get("/v1/info", headers=keyed).status_code == 200
            assert_429(one.get("/v1/info", headers=keyed))
            assert_429(two.get("/v1/info", headers=keyed))
            (name,) = cluster.keys("campsearch:ratelimit:*")
            with cluster.client() as client:
                assert int(client.get(name)) == 6
                assert 0 < client.ttl(name) <= WINDOW_S + 1

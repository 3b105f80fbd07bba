"""Operations endpoints: liveness, readiness (starting, failed, degraded), metrics, info."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient
from service_support import make_settings, png_bytes, running_client, wait_until_loaded

import service.runtime.lifecycle
from service.api.app import create_app


def test_ready_only_after_loading_and_alive_meanwhile(
    tmp_path, tiny_retrieval_model, small_grid_extractor, monkeypatch
) -> None:
    release = threading.Event()
    real_build = service.runtime.lifecycle.ServiceRuntime.build.__func__

    def held_build(cls, *args, **kwargs):  # the real build, once the test lets it go
        release.wait(30)
        return real_build(cls, *args, **kwargs)

    monkeypatch.setattr(service.runtime.lifecycle.ServiceRuntime, "build", classmethod(held_build))
    app = create_app(
        make_settings(tmp_path / "data"), model=tiny_retrieval_model, extractor=small_grid_extractor
    )
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "alive", "phase": "starting"}
        starting = client.get("/readyz")
        assert starting.status_code == 503 and starting.json()["status"] == "starting"
        search = client.post("/v1/search/images", json={"text": "a dog"})
        assert search.status_code == 503 and search.headers["Retry-After"]
        assert search.headers["content-type"] == "application/problem+json"
        release.set()
        wait_until_loaded(app)
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready"
        components = {c["name"]: c for c in ready["components"]}
        assert set(components) == {
            "model",
            "indexes",
            "cache:local",
            "region_features",
            "pooled_vectors",
            "rerank_tensors",
        }
        assert components["region_features"]["detail"] == "complete (images 0/0)"
        for rebuild in ("pooled_vectors", "rerank_tensors"):
            assert components[rebuild]["detail"] == "complete (images 0/0, captions 0/0)"


def test_a_failed_start_is_reported_not_hidden(tmp_path) -> None:
    settings = make_settings(tmp_path / "data", checkpoint=tmp_path / "missing.pt")
    app = create_app(settings)
    with running_client(app) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "missing.pt" in ready.json()["components"][0]["detail"]
        assert client.get("/healthz").status_code == 503
        info = client.get("/v1/info")
        assert info.status_code == 503 and "failed to start" in info.json()["detail"]


def test_redis_down_is_degraded_but_search_works(
    tmp_path, tiny_retrieval_model, small_grid_extractor, redis_server
) -> None:
    settings = make_settings(tmp_path / "data", redis_url=redis_server.url)
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        added = client.post(
            "/v1/images", files={"file": ("r.png", png_bytes("red"))}, data={"captions": ["red"]}
        )
        assert added.status_code == 201
        assert client.get("/readyz").json()["status"] == "ready"
        redis_server.kill()
        ready = client.get("/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "degraded"
        cache = next(c for c in body["components"] if c["name"] == "cache:redis")
        assert cache["ok"] is False and "127.0.0.1" in cache["detail"]
        app.state.service.runtime.pipeline.image_tensors.clear()  # force a feature read
        hits = client.post("/v1/search/images", json={"text": "red"}).json()["results"]
        assert [h["id"] for h in hits] == [added.json()["id"]]
        redis_server.start()
        assert client.get("/readyz").json()["status"] == "ready"


def test_metrics_and_info(tmp_path, tiny_retrieval_model, small_grid_extractor) -> None:
    app = create_app(
        make_settings(tmp_path / "data"), model=tiny_retrieval_model, extractor=small_grid_extractor
    )
    with running_client(app) as client:
        client.post("/v1/images", files={"file": ("m.png", png_bytes("navy"))}).raise_for_status()
        client.post("/v1/search/images", json={"text": "navy"}).raise_for_status()
        client.get("/v1/images/12345")
        text = client.get("/metrics").text
        assert (
            'campsearch_http_requests_total{method="POST",route="/v1/images",status="201"} 1.0'
            in text
        )
        assert 'route="/v1/images/{image_id}",status="404"' in text
        for stage in ("encode", "shortlist", "features", "rerank", "extract"):
            assert f'campsearch_stage_seconds_count{{stage="{stage}"}}' in text
        assert 'campsearch_stage_seconds_count{stage="rerank"} 1.0' in text
        assert 'campsearch_feature_cache_events{backend="local",event="misses"}' in text
        assert 'campsearch_corpus_items{kind="images"} 1.0' in text

        info = client.get("/v1/info").json()
        assert info["model_version"] == "tiny-test"
        assert info["extractor"] == "grid" and info["regions_per_image"] == 4
        assert info["device"] == "cpu" and info["embedding_dim"] == 16
        assert info["corpus"] == {"images": 1, "captions": 0}
        assert info["cache"] == "local"


def test_the_web_ui_is_served_at_the_root_when_present(
    tmp_path, tiny_retrieval_model, small_grid_extractor
) -> None:
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<title>camp-search</title>")
    app = create_app(
        make_settings(tmp_path / "data"),
        model=tiny_retrieval_model,
        extractor=small_grid_extractor,
        static_dir=static,
    )
    with running_client(app) as client:
        assert "camp-search" in client.get("/").text
        assert client.get("/healthz").status_code == 200  # API routes win over the UI
        missing = client.get("/no-such-page")
        assert missing.status_code == 404

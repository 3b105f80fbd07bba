"""Settings come from CAMPSEARCH_* variables and refuse unsafe combinations at start-up."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from service_support import png_bytes, running_client

from service.api.app import create_app
from service.runtime.settings import (
    CONCURRENT_MODEL_STAGES,
    MEBIBYTE,
    Settings,
    default_torch_threads,
)


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CAMPSEARCH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CAMPSEARCH_REDIS_URL", "redis://127.0.0.1:6390/0")
    monkeypatch.setenv("CAMPSEARCH_API_KEYS", "a-key-of-sixteen-chars, another-long-enough-key")
    monkeypatch.setenv("CAMPSEARCH_QUERY_PRECISION", "fp32")
    settings = Settings(_env_file=None)
    assert settings.data_dir == tmp_path
    assert settings.query_precision == "fp32"
    assert Settings(_env_file=None, data_dir=tmp_path, query_precision="auto").query_precision
    assert settings.redis_url == "redis://127.0.0.1:6390/0"
    assert [key.get_secret_value() for key in settings.api_keys] == [
        "a-key-of-sixteen-chars",
        "another-long-enough-key",
    ]
    assert settings.writes_need_key


def test_keys_never_show_in_the_settings_repr() -> None:
    settings = Settings(_env_file=None, api_keys=["super-secret-value-123"])
    assert "super-secret-value-123" not in repr(settings)


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(_env_file=None, api_keys=["short"])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_without_keys_is_allowed(host: str) -> None:
    assert not Settings(_env_file=None, host=host).writes_need_key


def test_public_bind_without_keys_is_refused_unless_explicit() -> None:
    with pytest.raises(ValidationError, match="refusing to bind"):
        Settings(_env_file=None, host="0.0.0.0")
    assert Settings(_env_file=None, host="0.0.0.0", allow_anonymous_writes=True).host == "0.0.0.0"
    assert Settings(_env_file=None, host="0.0.0.0", api_keys=["k" * 16]).writes_need_key


def _torch_threads_of_a_new_thread() -> int:
    """torch's thread count as a thread started now sees it (a thread that already ran torch
    keeps the count it started with)."""
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    return seen[0]


def test_cache_budgets_reach_the_caches_and_metrics(
    monkeypatch: pytest.MonkeyPatch, tmp_path, tiny_retrieval_model, small_grid_extractor
) -> None:
    monkeypatch.setenv("CAMPSEARCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CAMPSEARCH_IMAGE_CACHE_MIB", "3")
    monkeypatch.setenv("CAMPSEARCH_CAPTION_CACHE_MIB", "2")
    monkeypatch.setenv("CAMPSEARCH_FEATURE_CACHE_MIB", "5")
    settings = Settings(_env_file=None)
    assert (settings.image_cache_mib, settings.caption_cache_mib) == (3, 2)
    assert settings.feature_cache_mib == 5
    assert settings.torch_threads is None
    assert settings.threads_per_torch_call == default_torch_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    assert default_torch_threads() == 8 // CONCURRENT_MODEL_STAGES  # the stages share the cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    assert default_torch_threads() == 1
    assert Settings(_env_file=None, torch_threads=0).threads_per_torch_call is None
    # One rerank call's pairs go over the cores its torch calls leave (at most 4 threads).
    assert settings.rerank_threads == 2
    assert Settings(_env_file=None, torch_threads=0).rerank_threads == 1
    assert Settings(_env_file=None, rerank_workers=1).rerank_threads == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(32)))
    assert Settings(_env_file=None).rerank_threads == 3  # 10 torch threads a call
    assert Settings(_env_file=None, torch_threads=1).rerank_threads == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)  # the runtime sets its own: 1 on two cores
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        assert _torch_threads_of_a_new_thread() == 1  # as every batcher thread starts
        torch.set_num_threads(threads_before)
        runtime = app.state.service.runtime
        assert runtime.pipeline.image_tensors.max_bytes == 3 * MEBIBYTE
        assert runtime.pipeline.caption_tensors.max_bytes == 2 * MEBIBYTE
        assert runtime.cache.max_bytes == 5 * MEBIBYTE

        captions = ["red", "a long caption about a red square photo seen on a sunny day"]
        added = client.post(
            "/v1/images", files={"file": ("r.png", png_bytes("red"))}, data={"captions": captions}
        ).json()
        client.post("/v1/search/images", json={"text": "red"}).raise_for_status()
        client.post("/v1/search/captions", json={"image_id": added["id"]}).raise_for_status()
        gauges = {
            (sample.name, sample.labels["cache"]): sample.value
            for family in text_string_to_metric_families(client.get("/metrics").text)
            for sample in family.samples
            if sample.name.startswith("campsearch_memory_cache")
        }
        assert gauges[("campsearch_memory_cache_budget_bytes", "features")] == 5 * MEBIBYTE
        assert 0 < gauges[("campsearch_memory_cache_bytes", "caption_tensors")] <= 2 * MEBIBYTE

        # The budgets count what the entries hold: no cached tensor is a view of a bigger batch.
        pipeline = runtime.pipeline
        cached = pipeline.caption_tensors.get_many([c["id"] for c in added["captions"]])
        assert len(cached) == 2
        visible = sum(
            value.element_size() * value.nelement()
            for caption in cached.values()
            for value in vars(caption).values()
        )
        assert pipeline.caption_tensors.bytes_used == visible
        image = pipeline.image_tensors.get_many([added["id"]])[added["id"]]
        assert image.boxes.base is None


def test_an_empty_read_url_means_no_read_replica(monkeypatch) -> None:
    """compose passes `${CAMPSEARCH_DATABASE_READ_URL:-}`: empty is unset, not a bad URL."""
    monkeypatch.setenv("CAMPSEARCH_DATABASE_URL", "postgresql://app:secret@db/campsearch")
    monkeypatch.setenv("CAMPSEARCH_DATABASE_READ_URL", "")
    settings = Settings(_env_file=None)
    assert settings.database == "postgresql://app:secret@db/campsearch"
    assert settings.database_read_url is None and settings.database_read is None
    assert "secret" not in repr(settings)
    monkeypatch.setenv("CAMPSEARCH_DATABASE_READ_URL", "mysql://db/campsearch")
    with pytest.raises(ValueError, match="postgresql://"):
        Settings(_env_file=None)

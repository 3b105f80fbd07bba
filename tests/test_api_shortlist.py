"""The shortlist stage through the real app: concurrent searches are batched into one index
search and answer exactly as one-by-one searches do; /v1/info and /metrics say where each
stage runs; a GPU shortlist (a CPU stand-in here) is wired from the device setting."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from device_support import CpuStandIn
from redis_server import free_port
from service_support import ServerThread, make_settings, png_bytes

import index.corpus
import index.device
import service.runtime.lifecycle
from service.api.app import create_app

COLOURS = ["red", "navy", "green", "orange", "purple", "teal", "gold", "gray", "pink", "black"]
QUERIES = ["red", "a navy square", "green", "orange thing", "purple", "teal", "gold", "gray"]


def _serve(tmp_path, model, extractor, **overrides) -> ServerThread:
    app = create_app(
        make_settings(tmp_path / "data", **overrides), model=model, extractor=extractor
    )
    return ServerThread(app, free_port()).start()


def _fill(client: httpx.Client, colours: list[str] = COLOURS) -> list[int]:
    added = []
    for colour in colours:
        response = client.post(
            "/v1/images",
            files={"file": (f"{colour}.png", png_bytes(colour))},
            data={"captions": [f"a {colour} square"]},
        )
        response.raise_for_status()
        added.append(response.json()["id"])
    return added


def _shortlist_of(client: httpx.Client, text: str) -> list[tuple[int, float]]:
    body = {"text": text, "rerank": False, "limit": 10, "candidates": 10}
    response = client.post("/v1/search/images", json=body)
    response.raise_for_status()
    return [(hit["id"], round(hit["shortlist_score"], 5)) for hit in response.json()["results"]]


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_concurrent_searches_are_batched_and_answer_as_one_by_one(
    tmp_path, tiny_retrieval_model, small_grid_extractor
) -> None:
    server = _serve(tmp_path, tiny_retrieval_model, small_grid_extractor)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            _fill(client)
            alone = {text: _shortlist_of(client, text) for text in QUERIES}
            runtime = server.server.config.app.state.service.runtime
            batches_before = runtime.shortlist.batches_run
            runtime.shortlist.max_wait_s = 0.2  # gather every concurrent query in one batch
            with ThreadPoolExecutor(len(QUERIES)) as pool:
                together = dict(
                    zip(QUERIES, pool.map(lambda t: _shortlist_of(client, t), QUERIES), strict=True)
                )
            assert together == alone
            assert runtime.shortlist.batches_run - batches_before < len(QUERIES)
            metrics = client.get("/metrics").text
            searches = _metric(metrics, "campsearch_shortlist_batch_jobs_sum")
            assert searches == 2 * len(QUERIES)
            assert _metric(metrics, "campsearch_shortlist_batch_jobs_count") < searches
            assert _metric(metrics, "campsearch_shortlist_queue_depth") == 0
            captions = client.post(
                "/v1/search/captions", json={"image_id": 1, "rerank": False, "limit": 3}
            )
            assert captions.status_code == 200 and captions.json()["results"]
    finally:
        server.stop()


def test_info_and_metrics_say_where_each_stage_runs(
    tmp_path, tiny_retrieval_model, small_grid_extractor, monkeypatch
) -> None:
    monkeypatch.setattr(tiny_retrieval_model, "precision", "bf16")  # autocast is CUDA only
    monkeypatch.setattr(tiny_retrieval_model, "query_precision", "bf16")  # on every device
    server = _serve(tmp_path, tiny_retrieval_model, small_grid_extractor, device="cpu")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            stages = client.get("/v1/info").json()["stages"]
            metrics = client.get("/metrics").text
    finally:
        server.stop()
    cpu = {"device": "cpu", "precision": "fp32", "indexes": None}
    assert stages == {
        "text_encoder": {**cpu, "precision": "bf16"},
        "extractor": cpu,
        "shortlist": {**cpu, "indexes": {"images": "cpu", "captions": "cpu"}},
        "reranker": cpu,
    }
    for stage, where in stages.items():
        precision = where["precision"]
        line = f'campsearch_stage_info{{device="cpu",precision="{precision}",stage="{stage}"}} 1.0'
        assert line in metrics


def test_the_gpu_shortlist_follows_the_device_setting(
    tmp_path, tiny_retrieval_model, small_grid_extractor, monkeypatch
) -> None:
    """`device: cuda:3` with a faiss that sees 4 GPUs: both indexes search on GPU 3 (a CPU
    stand-in copy here), the batcher waits to gather queries, and writes update the copy."""
    backends: list[CpuStandIn] = []

    def stand_in(gpu: int) -> CpuStandIn:
        backends.append(CpuStandIn(name=f"cuda:{gpu}"))
        return backends[-1]

    monkeypatch.setattr(index.device, "faiss_gpu_count", lambda: 4)
    monkeypatch.setattr(index.corpus, "FaissGpu", stand_in)
    with pytest.raises(ValueError, match="only 4"):
        index.device.faiss_gpu_id("cuda:4")
    server = _serve(
        tmp_path, tiny_retrieval_model, small_grid_extractor, device="cpu", batch_max_wait_ms=7
    )
    server.stop()  # "cpu": never the GPU, even when faiss sees one
    assert not backends
    with monkeypatch.context() as patch:  # the model stays on the CPU; FAISS is told cuda:3
        patch.setattr(service.runtime.lifecycle, "faiss_gpu_id", lambda device: 3)
        server = _serve(tmp_path, tiny_retrieval_model, small_grid_extractor, batch_max_wait_ms=7)
    try:
        runtime = server.server.config.app.state.service.runtime
        assert runtime.shortlist.max_wait_s == pytest.approx(0.007)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            (red,) = _fill(client, COLOURS[:1])
            _shortlist_of(client, "red")  # the first search copies the index to the device
            _fill(client, COLOURS[1:])
            first = _shortlist_of(client, "red")
            client.delete(f"/v1/images/{red}").raise_for_status()
            after_delete = _shortlist_of(client, "red")
            info = client.get("/v1/info").json()["stages"]["shortlist"]
            metrics = client.get("/metrics").text
    finally:
        server.stop()
    assert info["device"] == "cuda:3" and info["indexes"] == {
        "images": "cuda:3",
        "captions": "cuda:3",
    }
    assert (
        'campsearch_stage_info{device="cuda:3",precision="fp32",stage="shortlist"} 1.0' in metrics
    )
    assert red in {hit for hit, _ in first} and red not in {hit for hit, _ in after_delete}
    assert len(first) == len(COLOURS) and len(after_delete) == len(COLOURS) - 1
    images = runtime.corpus.indexes["images"]
    assert images.device_stats.full_copies == 1  # nine adds and a delete: no re-copy
    assert images.device_stats.vectors_added == len(COLOURS) - 1
    assert images._replica.hidden == {red}
    assert 'campsearch_shortlist_device_copies{kind="images"} 1.0' in metrics

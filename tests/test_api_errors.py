"""Every client error answers its status with a problem+json body naming the field and the
reason; overload is 429 with Retry-After; a full disk is 507; nothing a client sends is a 500."""

from __future__ import annotations

import struct
import threading
import time
import zlib

import httpx
import pytest
from service_support import make_settings, png_bytes, running_client

import service.runtime.lifecycle
from index.corpus import Corpus
from service.api.app import create_app
from service.runtime.budget import MemoryBudget

MAX_UPLOAD = 64 * 1024


@pytest.fixture
def app(tmp_path, tiny_retrieval_model, small_grid_extractor):
    settings = make_settings(
        tmp_path / "data", max_upload_bytes=MAX_UPLOAD, max_limit=20, max_candidates=50,
        max_query_chars=40, max_image_pixels=1_000_000,
    )  # fmt: skip
    return create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)


@pytest.fixture
def client(app):
    with running_client(app) as client:
        client.post(
            "/v1/images", files={"file": ("a.png", png_bytes("red"))}, data={"captions": ["a red"]}
        ).raise_for_status()
        yield client


def problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def fields(body: dict) -> set[str]:
    return {error["field"] for error in body.get("errors", [])}


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB, with a tiny IDAT (a pixel bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("method", "url", "json_body", "field"),
    [
        ("get", "/v1/images/999", None, "path.image_id"),
        ("get", "/v1/images/999/file", None, "path.image_id"),
        ("delete", "/v1/images/999", None, "path.image_id"),
        ("get", "/v1/captions/999", None, "path.caption_id"),
        ("delete", "/v1/captions/999", None, "path.caption_id"),
        ("post", "/v1/search/captions", {"image_id": 999}, "body.image_id"),
        ("post", "/v1/captions", {"text": "x", "image_id": 999}, "body.image_id"),
    ],
)
def test_unknown_ids_are_404(client, method, url, json_body, field) -> None:
    kwargs = {"json": json_body} if json_body is not None else {}
    body = problem(getattr(client, method)(url, **kwargs), 404)
    assert field in fields(body) and "999" in body["detail"]


@pytest.mark.parametrize(
    ("json_body", "field"),
    [
        ({"text": "dog", "limit": 0}, "body.limit"),
        ({"text": "dog", "limit": 21}, "body.limit"),
        ({"text": "dog", "candidates": 0}, "body.candidates"),
        ({"text": "dog", "candidates": 51}, "body.candidates"),
        ({"text": "x" * 41}, "body.text"),
        ({"text": "   "}, "body.text"),
        ({"text": ""}, "body.text"),
        ({}, "body.text"),
        ({"text": "dog", "rerank": "maybe"}, "body.rerank"),
        ({"text": "dog", "surprise": 1}, "body.surprise"),
    ],
)
def test_bad_search_parameters_are_422(client, json_body, field) -> None:
    body = problem(client.post("/v1/search/images", json=json_body), 422)
    assert field in fields(body)


def test_bad_paths_queries_and_captions_are_422(client) -> None:
    assert "path.image_id" in fields(problem(client.get("/v1/images/abc"), 422))
    assert "path.image_id" in fields(problem(client.get(f"/v1/images/{2**64}"), 422))
    assert "path.caption_id" in fields(problem(client.get("/v1/captions/-1"), 422))
    assert "query.sha256" in fields(problem(client.get("/v1/images?sha256=xyz"), 422))
    assert "body.text" in fields(problem(client.post("/v1/captions", json={"text": " "}), 422))
    blank = client.post("/v1/images", files={"file": ("b.png", png_bytes("blue"))},
                        data={"captions": ["fine", "  "]})  # fmt: skip
    assert "captions.1" in fields(problem(blank, 422))
    no_file = client.post("/v1/images", data={"captions": ["no photo"]})
    assert "body.file" in fields(problem(no_file, 422))
    bad_option = client.post(
        "/v1/search/captions", files={"file": ("c.png", png_bytes("red"))}, data={"limit": "many"}
    )
    assert "body.limit" in fields(problem(bad_option, 422))
    too_many = client.post(
        "/v1/search/captions", files={"file": ("c.png", png_bytes("red"))}, data={"limit": "21"}
    )
    assert "body.limit" in fields(problem(too_many, 422))
    assert "file" in fields(problem(client.post("/v1/search/captions", data={"limit": "2"}), 422))


@pytest.mark.parametrize("url", ["/v1/images", "/v1/search/captions"])
def test_bad_images_are_400_413_415_naming_the_file(client, url) -> None:
    cases = [
        (b"", 400, "empty"),
        (png_bytes("red")[:60], 400, "corrupt"),
        (b"%PDF-1.4 not a photo at all", 415, "supported"),
        (png_declaring(5000, 5000), 413, "pixels"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_UPLOAD, 413, "limit"),
    ]
    for data, status, word in cases:
        body = problem(client.post(url, files={"file": ("x.png", data, "image/png")}), status)
        assert fields(body) == {"file"}
        assert word in body["detail"].lower() or word in str(body["errors"]).lower()


def test_bodies_are_bounded_while_streaming(client) -> None:
    declared = client.post(
        "/v1/images", content=b"x", headers={"Content-Length": str(10 * 2**20),
                                             "Content-Type": "multipart/form-data; boundary=b"}
    )  # fmt: skip
    assert "body" in fields(problem(declared, 413))

    sent = 0

    def endless():  # chunked upload, no Content-Length: stopped at the limit
        nonlocal sent
        prefix = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
        yield prefix
        while sent < 50 * 2**20:
            sent += 2**16
            yield b"\0" * 2**16

    streamed = client.post(
        "/v1/images", content=endless(), headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert "body" in fields(problem(streamed, 413))


def test_unsupported_content_type_and_bad_json_on_caption_search(client) -> None:
    text = client.post(
        "/v1/search/captions", content=b"id=1", headers={"Content-Type": "text/plain"}
    )
    assert "header.Content-Type" in fields(problem(text, 415))
    broken = client.post(
        "/v1/search/captions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert "body" in fields(problem(broken, 422))
    wrong = client.post("/v1/search/captions", json={"image_id": "seven"})
    assert "body.image_id" in fields(problem(wrong, 422))


def test_overload_is_429_with_retry_after_and_a_stuck_model_is_503(
    tmp_path, tiny_retrieval_model, small_grid_extractor
) -> None:
    settings = make_settings(
        tmp_path / "data", batch_max_size=1, queue_max_size=1, request_timeout_s=30.0
    )
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        client.post("/v1/images", files={"file": ("a.png", png_bytes("red"))}).raise_for_status()
        runtime = app.state.service.runtime
        stalled = _StalledReranker(runtime, tiny_retrieval_model)
        entered, release = stalled.entered, stalled.release
        answers: list[httpx.Response] = []

        def search() -> None:
            answers.append(client.post("/v1/search/images", json={"text": "a red"}))

        first = threading.Thread(target=search)
        first.start()
        assert entered.wait(10)  # the worker is busy with the first query
        second = threading.Thread(target=search)
        second.start()
        while runtime.batcher.queued < 1:  # the second waits in the (full) queue
            threading.Event().wait(0.01)
        overloaded = client.post("/v1/search/images", json={"text": "a red"})
        body = problem(overloaded, 429)
        assert int(overloaded.headers["Retry-After"]) >= 1
        assert "retry" in body["detail"]
        release.set()
        first.join(30)
        second.join(30)
        assert [a.status_code for a in answers] == [200, 200]

        runtime.pipeline.request_timeout_s = 0.2
        release.clear()
        timed_out = client.post("/v1/search/images", json={"text": "a red"})
        assert int(problem(timed_out, 503).get("status")) == 503
        assert timed_out.headers["Retry-After"] == "1"
        release.set()


def test_the_timeout_bounds_the_whole_search_not_only_the_reranker(
    tmp_path, tiny_retrieval_model, small_grid_extractor
) -> None:
    settings = make_settings(tmp_path / "data", request_timeout_s=0.3)
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        client.post("/v1/images", files={"file": ("a.png", png_bytes("red"))}).raise_for_status()
        pipeline = app.state.service.runtime.pipeline
        release = threading.Event()
        real_tensors = pipeline.tensors_of_images

        def stuck_tensors(*args, **kwargs):  # building rerank tensors hangs (a stalled store)
            release.wait(30)
            return real_tensors(*args, **kwargs)

        pipeline.tensors_of_images = stuck_tensors
        timed_out = client.post("/v1/search/images", json={"text": "a red"})
        body = problem(timed_out, 503)
        assert "0.3 s" in body["detail"]
        assert timed_out.headers["Retry-After"] == "1"
        release.set()
        pipeline.tensors_of_images = real_tensors
        assert client.post("/v1/search/images", json={"text": "a red"}).status_code == 200


def test_searches_past_the_search_memory_budget_wait_their_turn(
    tmp_path, tiny_retrieval_model, small_grid_extractor
) -> None:
    app = create_app(
        make_settings(tmp_path / "data", batch_max_size=1),
        model=tiny_retrieval_model,
        extractor=small_grid_extractor,
    )
    with running_client(app) as client:
        for color in ("red", "blue"):
            photo = {"file": ("p.png", png_bytes(color))}
            client.post("/v1/images", files=photo, data={"captions": [color]}).raise_for_status()
        runtime = app.state.service.runtime
        warm = client.post("/v1/search/images", json={"text": "a red"})  # caches both images
        regions = small_grid_extractor.num_regions
        one_search = 2 * (tiny_retrieval_model.image_tensor_bytes(regions) + regions * 16)
        runtime.pipeline.search_memory = MemoryBudget(one_search)  # room for one search
        stalled = _StalledReranker(runtime, tiny_retrieval_model)
        entered, release = stalled.entered, stalled.release
        answers: list[httpx.Response] = []

        def search() -> None:
            answers.append(client.post("/v1/search/images", json={"text": "a red"}))

        first = threading.Thread(target=search)
        first.start()
        assert entered.wait(10)
        assert runtime.pipeline.search_memory.held == one_search
        second = threading.Thread(target=search)
        second.start()
        deadline = time.monotonic() + 10
        while runtime.pipeline.search_memory.waiting < 1 and time.monotonic() < deadline:
            threading.Event().wait(0.01)
        metrics = client.get("/metrics").text
        assert "campsearch_search_memory_waiting 1.0" in metrics
        assert f'campsearch_search_memory_bytes{{state="held"}} {float(one_search)}' in metrics
        assert runtime.batcher.queued == 0  # the second fetched nothing and queued nothing
        release.set()
        first.join(30)
        second.join(30)
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].json()["results"] == answers[1].json()["results"]
        assert [hit["id"] for hit in answers[0].json()["results"]] == [
            hit["id"] for hit in warm.json()["results"]
        ]
        assert runtime.pipeline.search_memory.held == 0

        runtime.pipeline.search_memory = MemoryBudget(0)  # unbounded: it only counts
        release.clear(), entered.clear()
        image_id = warm.json()["results"][0]["id"]
        photo_search = threading.Thread(
            target=lambda: answers.append(
                client.post("/v1/search/captions", json={"image_id": image_id})
            )
        )
        photo_search.start()
        assert entered.wait(10)  # a photo search holds its two caption candidates
        assert (
            runtime.pipeline.search_memory.held == 2 * tiny_retrieval_model.caption_tensor_bytes()
        )
        release.set()
        photo_search.join(30)
        assert answers[-1].status_code == 200 and runtime.pipeline.search_memory.held == 0


class _StalledReranker:
    """Gives the running reranker the real model with a `rerank_pairs` that sets `entered`,
    then waits for `release` before it runs the real call (everything else passes through)."""

    def __init__(self, runtime, model) -> None:
        self._model = model
        self.entered, self.release = threading.Event(), threading.Event()
        runtime.pipeline.batcher._batch_fn.model = self

    def rerank_pairs(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(30)
        return self._model.rerank_pairs(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_full_storage_is_507_and_nothing_is_written(
    tmp_path, tiny_retrieval_model, small_grid_extractor, monkeypatch
) -> None:
    real_open = Corpus.open

    def open_small(data_dir, **options):  # a feature store that may not grow past 64 KiB
        corpus = real_open(data_dir, **{**options, "map_size": 64 * 1024})
        corpus.store.max_map_size = 64 * 1024
        return corpus

    monkeypatch.setattr(service.runtime.lifecycle.Corpus, "open", staticmethod(open_small))
    app = create_app(
        make_settings(tmp_path / "data"), model=tiny_retrieval_model, extractor=small_grid_extractor
    )
    with running_client(app) as client:
        statuses = []
        for shade in range(40):
            response = client.post(
                "/v1/images", files={"file": ("s.png", png_bytes((shade * 6, 10, 10)))}
            )
            statuses.append(response.status_code)
            if response.status_code != 201:
                break
        body = problem(response, 507)
        assert "storage" in body["detail"]
        stored = statuses.count(201)
        assert client.get("/v1/info").json()["corpus"]["images"] == stored
        assert client.get("/readyz").status_code == 200

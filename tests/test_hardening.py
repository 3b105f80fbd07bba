"""The deployment, hardened: forwarded headers trusted from the proxy only, write keys checked
before the body is read, /metrics behind a setting, and photo decoding within a memory budget.

Real uvicorn servers on loopback throughout (other 127.x source addresses stand in for other
hosts), raw sockets where the client must control exactly what it sends, real coco-mini photos.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from security_support import served
from service_support import TEST_API_KEY, coco_photos, make_settings, png_bytes, running_client

from service.api.app import create_app
from service.ingest.indexer import decode_reservation_bytes
from service.runtime.budget import MemoryBudget

WRONG_KEY = "wrong-key-0123456789abcdef"
WINDOW_S = 3600  # long windows: a test never straddles two
PROMPT_S = 5.0  # a refusal must come this fast, though the body never arrives


def exchange(
    port: int, head: str, body: bytes = b"", *, source_ip: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    """Send `head` (request line + headers, without the blank line) and `body` from
    `source_ip`; read the answer until the server closes or PROMPT_S passes."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=PROMPT_S, source_address=(source_ip, 0)
    ) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        header_block, _, rest = received.partition(b"\r\n\r\n")
        lines = header_block.decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, value in (line.split(":", 1) for line in lines[1:])
        }
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(lines[0].split()[1]), headers, rest


# --- forwarded headers -------------------------------------------------------------------------


def test_spoofed_forwarded_for_does_not_escape_the_rate_limit(
    tmp_path, tiny_retrieval_model, small_grid_extractor
) -> None:
    """uvicorn trusting only the proxy's address (as docker-compose.yml sets it): a client that
    names other addresses in X-Forwarded-For still spends its own budget; from the proxy's
    address the header does name the client."""
    settings = make_settings(tmp_path / "data", rate_limit_requests=3, rate_limit_window_s=WINDOW_S)
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    proxy = "127.0.0.3"
    with served(app, forwarded_allow_ips=proxy, proxy_headers=True) as server:

        def info(source_ip: str, forwarded_for: str | None) -> int:
            head = "GET /v1/info HTTP/1.1\r\nHost: api\r\nConnection: close"
            if forwarded_for is not None:
                head += f"\r\nX-Forwarded-For: {forwarded_for}"
            return exchange(server.port, head, source_ip=source_ip)[0]

        # A direct client: three requests, each claiming to be someone else, then it is out.
        spoofed = [info("127.0.0.1", f"198.51.100.{n}") for n in range(1, 5)]
        assert spoofed == [200, 200, 200, 429]
        assert info("127.0.0.1", "203.0.113.99") == 429  # no address it names resets it
        assert info("127.0.0.1", None) == 429

        # Through the trusted proxy, the forwarded address is the client: a budget each.
        assert [info(proxy, "203.0.113.7") for _ in range(4)] == [200, 200, 200, 429]
        assert info(proxy, "203.0.113.8") == 200
        # nginx appends the peer it saw: the right-most untrusted entry is the client.
        assert info(proxy, "203.0.113.7, 203.0.113.9") == 200


# --- write keys before the body ----------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, tiny_retrieval_model, small_grid_extractor):
    settings = make_settings(tmp_path_factory.mktemp("keyed") / "data", api_keys=TEST_API_KEY)
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with served(app) as server:
        yield app, server


def image_count(server) -> int:
    return httpx.get(f"{server.url}/v1/info").json()["corpus"]["images"]


@pytest.mark.parametrize(
    ("key_header", "reason"),
    [
        ("", "writes need an API key in the X-API-Key header"),
        (f"\r\nX-API-Key: {WRONG_KEY}", "the API key is not valid"),
    ],
    ids=["missing", "wrong"],
)
def test_a_write_without_a_valid_key_is_refused_before_its_body(
    keyed_server, key_header, reason
) -> None:
    """The client declares a body of 15 MB (and 30 MB, past the body limit), sends 9 bytes of
    it and waits: the 401 comes at once, so the server read no further than the headers."""
    _, server = keyed_server
    before = image_count(server)
    for method, path, declared in [
        ("POST", "/v1/images", 15_000_000),
        ("POST", "/v1/images", 30_000_000),
        ("POST", "/v1/captions", 15_000_000),
        ("DELETE", "/v1/images/1", 15_000_000),
        ("POST", "/v1/images/1/captions", 15_000_000),
    ]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: api\r\n"
            "Content-Type: multipart/form-data; boundary=xyz\r\n"
            f"Content-Length: {declared}{key_header}"
        )
        started = time.monotonic()
        status, headers, body = exchange(server.port, head, b"--xyz\r\nC")
        assert time.monotonic() - started < PROMPT_S
        assert status == 401, (method, path, body)
        assert headers["content-type"] == "application/problem+json"
        assert headers["www-authenticate"] == "X-API-Key"
        assert headers["connection"] == "close"
        problem = json.loads(body)
        assert problem["status"] == 401 and problem["title"] == "Unauthorized"
        assert problem["detail"] == reason
        assert problem["errors"] == [{"field": "header.X-API-Key", "reason": reason}]
        assert problem["instance"] == path
        assert WRONG_KEY not in body.decode()
    assert image_count(server) == before


def test_a_write_with_the_right_key_still_goes_through(keyed_server) -> None:
    _, server = keyed_server
    before = image_count(server)
    added = httpx.post(
        f"{server.url}/v1/images",
        files={"file": ("p.png", png_bytes("purple"))},
        headers={"X-API-Key": TEST_API_KEY},
    )
    assert added.status_code == 201, added.text
    assert image_count(server) == before + 1
    # Searches are POSTs that only read: no key needed.
    search = httpx.post(f"{server.url}/v1/search/images", json={"text": "purple"})
    assert search.status_code == 200


def test_anonymous_writes_on_loopback_still_work(
    tmp_path, tiny_retrieval_model, small_grid_extractor
) -> None:
    app = create_app(
        make_settings(tmp_path / "data"), model=tiny_retrieval_model, extractor=small_grid_extractor
    )
    with served(app) as server:
        data = png_bytes("teal")
        boundary = "xyz"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        head = (
            "POST /v1/images HTTP/1.1\r\nHost: api\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}"
        )
        status, _, answer = exchange(server.port, head, body)
        assert status == 201, answer
        assert json.loads(answer)["width"] == 96


# --- /metrics on the API port ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expose", "served_metrics"),
    [
        ("127.0.0.1", None, True),  # a loopback bind: on by default
        ("0.0.0.0", None, False),  # a public bind: off by default
        ("0.0.0.0", True, True),  # docker-compose.yml: its API port is internal
        ("127.0.0.1", False, False),
    ],
)
def test_metrics_follow_the_setting(
    tmp_path, tiny_retrieval_model, small_grid_extractor, host, expose, served_metrics
) -> None:
    settings = make_settings(
        tmp_path / "data", host=host, expose_metrics=expose, api_keys=TEST_API_KEY
    )
    assert settings.metrics_exposed is served_metrics
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        answer = client.get("/metrics")
        if served_metrics:
            assert answer.status_code == 200
            assert "campsearch_decode_memory_bytes" in answer.text
        else:
            assert answer.status_code == 404
            assert answer.headers["content-type"] == "application/problem+json"
            assert "CAMPSEARCH_EXPOSE_METRICS" in answer.json()["detail"]
            assert "campsearch_" not in answer.text
        assert client.get("/healthz").status_code == 200  # the rest is unaffected


# --- decoding within a memory budget ------------------------------------------------------------


class _StalledExtractor:
    """The real extractor, whose `extract` sets `entered` and waits for `release` first."""

    def __init__(self, extractor) -> None:
        self._extractor = extractor
        self.entered, self.release = threading.Event(), threading.Event()

    def extract(self, images):
        self.entered.set()
        self.release.wait(30)
        return self._extractor.extract(images)

    def __getattr__(self, name):
        return getattr(self._extractor, name)


def metric_values(text: str) -> dict[str, float]:
    """`name{labels}` -> value of every sample in a Prometheus text page."""
    return {
        f"{sample.name}{{{','.join(f'{k}={v!r}' for k, v in sample.labels.items())}}}": sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition did not hold in time")
        time.sleep(0.01)


def test_large_photos_wait_for_decode_memory_instead_of_decoding(
    tmp_path, shared_dir, tiny_retrieval_model, small_grid_extractor
) -> None:
    """With room for one photo's pixels, a search by photo stalled in its extraction keeps a
    second photo (an ingest) waiting undecoded, visible in /metrics; both then answer and the
    budget returns to zero. Waiting past the request timeout is 503 + Retry-After."""
    (first_path, _), (second_path, captions), (other_path, _) = coco_photos(shared_dir, 3)
    first, second = first_path.read_bytes(), second_path.read_bytes()
    settings = make_settings(tmp_path / "data", max_image_pixels=40_000_000)
    first_share = decode_reservation_bytes(first, settings.max_image_pixels)
    second_share = decode_reservation_bytes(second, settings.max_image_pixels)
    assert first_share > 640 * 300 * 7  # from the header: the 640 x ~400 photo, 7 bytes a pixel
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with served(app) as server:
        runtime = app.state.service.runtime
        indexer = runtime.indexer
        indexer.decode_memory = MemoryBudget(max(first_share, second_share) + 1024)  # one fits
        stalled = _StalledExtractor(runtime.regions.extractor)
        runtime.regions.extractor = stalled
        decoded: list[int] = []
        real_decode = indexer.decode

        async def counting_decode(data, field="file"):
            decoded.append(len(data))
            return await real_decode(data, field)

        indexer.decode = counting_decode
        answers: dict[str, httpx.Response] = {}

        def search(photo: bytes = first) -> None:
            answers["search"] = httpx.post(
                f"{server.url}/v1/search/captions",
                files={"file": ("a.jpg", photo)},
                data={"limit": "3"},
                timeout=60,
            )

        def ingest() -> None:
            answers["ingest"] = httpx.post(
                f"{server.url}/v1/images",
                files={"file": ("b.jpg", second)},
                data={"captions": captions[:1]},
                timeout=60,
            )

        searching = threading.Thread(target=search)
        searching.start()
        assert stalled.entered.wait(20)  # the first photo is decoded and being extracted
        ingesting = threading.Thread(target=ingest)
        ingesting.start()
        wait_for(lambda: indexer.decode_memory.waiting == 1)
        metrics = metric_values(httpx.get(f"{server.url}/metrics").text)
        assert metrics["campsearch_decode_memory_waiting{}"] == 1
        assert metrics["campsearch_decode_memory_bytes{state='held'}"] == first_share
        assert decoded == [len(first)]  # the second photo was not decoded
        stalled.release.set()
        searching.join(60)
        ingesting.join(60)
        assert answers["search"].status_code == 200, answers["search"].text
        assert answers["ingest"].status_code == 201, answers["ingest"].text
        assert decoded == [len(first), len(second)]
        assert indexer.decode_memory.held == 0 and indexer.decode_memory.waiting == 0
        metrics = metric_values(httpx.get(f"{server.url}/metrics").text)
        assert metrics["campsearch_decode_memory_bytes{state='held'}"] == 0

        # A wait past the request timeout: 503 with Retry-After, and nothing held afterwards.
        stalled.release.clear()
        stalled.entered.clear()
        indexer.decode_wait_s = 0.3
        # (a photo not seen before: a known one would skip the extractor)
        blocker = threading.Thread(target=search, args=(other_path.read_bytes(),))
        blocker.start()
        assert stalled.entered.wait(20)
        third = png_bytes("navy", size=(2000, 1500))  # more than the whole budget: cut to it
        refused = httpx.post(
            f"{server.url}/v1/search/captions", files={"file": ("c.png", third)}, timeout=30
        )
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["content-type"] == "application/problem+json"
        assert "decode memory" in refused.json()["detail"]
        stalled.release.set()
        blocker.join(60)
        assert answers["search"].status_code == 200
        assert indexer.decode_memory.held == 0 and indexer.decode_memory.waiting == 0

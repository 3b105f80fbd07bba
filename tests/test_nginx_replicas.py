"""docker/nginx.conf in front of several real API replicas, as `docker compose up --scale api=N`
runs it: the replicas share one name (here a test DNS server answers it, as Docker's embedded
DNS does), one replica is not ready (its start-up failed: 503 on every route), one is killed
mid-way, and one is added by DNS while nginx runs. Every search and read through nginx succeeds.

Each replica is a real `camp-search serve` on the same port of its own loopback address
(127.0.0.1, .2, .3), with its own data dir; nginx is Debian's, with the repository's template.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from dns_server import DnsServer
from ui_stack import NGINX, ApiServer, NginxServer, free_port

pytestmark = pytest.mark.browser

RESOLVER_VALID_S = 5  # docker/nginx.conf: resolver ... valid=5s
SEARCH = {"text": "a dog on a beach", "limit": 3}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Two ready replicas and one whose start-up failed, all on one port."""
    if not Path(NGINX).is_file():
        pytest.skip("nginx is not installed: apt-get install -y nginx (make system-deps)")
    port = free_port()
    root = tmp_path_factory.mktemp("replicas")
    servers = {
        "ready_a": ApiServer(root / "a", host="127.0.0.1", port=port),
        "ready_b": ApiServer(root / "b", host="127.0.0.2", port=port),
        # A checkpoint that does not exist: the model never loads, /readyz stays 503.
        "unready": ApiServer(
            root / "c",
            host="127.0.0.3",
            port=port,
            settings={"CAMPSEARCH_CHECKPOINT": str(root / "missing.pt")},
        ),
    }
    for server in servers.values():
        server.workdir.mkdir()
    try:
        for server in servers.values():
            server.start(wait_ready=False)
        servers["ready_a"].wait_ready()
        servers["ready_b"].wait_ready()
        wait_for(lambda: readiness(servers["unready"]) == 503, "the unready replica answers")
        yield port, servers
    finally:
        for server in servers.values():
            server.stop()


def readiness(server: ApiServer) -> int | None:
    try:
        return httpx.get(f"{server.url}/readyz", timeout=2).status_code
    except httpx.HTTPError:
        return None


def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached in {timeout_s} s: {what}")
        time.sleep(0.1)


def upstream_lines(frontend: NginxServer) -> list[str]:
    path = frontend.prefix / "upstreams.log"
    return path.read_text().splitlines() if path.is_file() else []


def served_by(line: str) -> str:
    """The replica that gave the final answer: the last address nginx tried."""
    tried = re.search(r"\[([^\]]*)\]", line)
    assert tried, line
    return tried.group(1).split(",")[-1].strip().split(":")[0]


class Traffic:
    """Searches and reads through nginx from one thread, as fast as they answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                for answer in (
                    client.post("/v1/search/images", json=SEARCH),
                    client.get("/v1/info"),
                ):
                    self.answers.append(answer.status_code)
                    if answer.status_code != 200:
                        self.failures.append(f"{answer.request.url}: {answer.status_code}")

    def wait_for_answers(self, count: int) -> None:
        target = len(self.answers) + count
        wait_for(lambda: len(self.answers) >= target or self.failures, f"{count} answers")


def test_requests_skip_an_unready_replica_and_a_killed_one(replicas, tmp_path):
    port, servers = replicas
    dns = DnsServer({"api": ["127.0.0.1", "127.0.0.3"]}).start()
    frontend = NginxServer(tmp_path / "nginx", f"api:{port}", resolver=dns.address)
    try:
        frontend.start()
        # One ready replica and the unready one: every answer is the ready one's.
        with Traffic(frontend.url) as traffic:
            traffic.wait_for_answers(60)
        assert traffic.failures == []
        lines = upstream_lines(frontend)
        assert {served_by(line) for line in lines} == {"127.0.0.1"}
        skipped = [line for line in lines if f"127.0.0.3:{port}, 127.0.0.1:{port}" in line]
        assert skipped, "nginx never tried the unready replica"
        assert any(line.startswith("POST /v1/search/") for line in skipped)
        assert all("[503, 200]" in line for line in skipped)

        # Scaled up: the next resolution adds the second ready replica, without a reload.
        dns.set_addresses("api", ["127.0.0.1", "127.0.0.2", "127.0.0.3"])
        with Traffic(frontend.url) as traffic:
            wait_for(
                lambda: any(served_by(line) == "127.0.0.2" for line in upstream_lines(frontend)),
                "a request answered by the added replica",
                timeout_s=RESOLVER_VALID_S + 30,
            )
            servers["ready_b"].process.kill()  # a crash, mid-traffic
            servers["ready_b"].process.wait()
            killed_at = len(upstream_lines(frontend))
            traffic.wait_for_answers(60)
        assert traffic.failures == []
        after_kill = upstream_lines(frontend)[killed_at:]
        assert {served_by(line) for line in after_kill} == {"127.0.0.1"}
        assert any(f"127.0.0.2:{port}" in line for line in after_kill), "b was never tried"
        assert httpx.get(frontend.url + "/nginx-health").text == "ok\n"
    finally:
        frontend.stop()
        dns.stop()


def test_a_single_address_needs_no_resolver(replicas, tmp_path):
    """CAMPSEARCH_API_UPSTREAM may be one address:port (no DNS): nginx never asks the resolver."""
    port, _ = replicas
    dns = DnsServer({}).start()
    frontend = NginxServer(tmp_path / "nginx", f"127.0.0.1:{port}", resolver=dns.address)
    try:
        frontend.start()
        assert httpx.post(frontend.url + "/v1/search/images", json=SEARCH).status_code == 200
        assert dns.queries == 0
    finally:
        frontend.stop()
        dns.stop()

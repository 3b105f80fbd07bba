"""The frontend: Debian nginx running the repository's docker/nginx.conf (only its
${CAMPSEARCH_*} values differ from the container's) in front of the real API, checked over HTTP
and with the same browser flow as tests/test_ui_browser.py. Screenshots: tests/artifacts/nginx/."""

from __future__ import annotations

import gzip
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import ui_flows
from ui_stack import NGINX, NGINX_TEMPLATE, NginxServer, free_port

from service.api.uploads import FORM_OVERHEAD_BYTES
from service.runtime.settings import Settings

pytestmark = pytest.mark.browser

HORSES = 4
MEBIBYTE = 1024 * 1024
HEALTHCHECK = Path(__file__).resolve().parents[1] / "docker" / "healthcheck.py"


@pytest.fixture(scope="module")
def nginx(ui_stack_api, tmp_path_factory):
    if not Path(NGINX).is_file():
        pytest.skip("nginx is not installed: apt-get install -y nginx (make system-deps)")
    server, _ = ui_stack_api
    frontend = NginxServer(tmp_path_factory.mktemp("nginx"), f"127.0.0.1:{server.port}").start()
    yield frontend
    frontend.stop()


@pytest.fixture(scope="module")
def shots():
    from ui_stack import ARTIFACTS_DIR

    folder = ARTIFACTS_DIR / "nginx"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def get_from(source_ip: str, port: int, path: str) -> int:
    """Status of a GET sent from `source_ip` (any 127.x address is this machine on Linux)."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=5, source_address=(source_ip, 0)
    ) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        status_line = s.makefile("rb").readline().decode()
    return int(status_line.split()[1])


def test_browser_flow_through_nginx(chromium, nginx, ui_stack_api, shots):
    """Search, explanation, photo upload and a bad upload, all under nginx's strict CSP."""
    server, photos = ui_stack_api
    page = ui_flows.open_ui(chromium, nginx.url)
    try:
        ui_flows.check_text_search(page, server.url, photos[HORSES], shots)
        ui_flows.check_explanation(page, photos[HORSES], shots)
        ui_flows.check_photo_search(page, server.url, photos[HORSES], shots)
        ui_flows.check_bad_upload(page, shots)
        assert page.inner_text("#health-text") == "Ready"
        assert page.problems == []
        assert ui_flows.csp_violations(page) == []
    finally:
        page.close()


def test_security_headers_on_pages_api_answers_and_errors(nginx):
    for path in ("/", "/js/app.js", "/v1/info", "/v1/images/999999", "/nope"):
        answer = httpx.get(nginx.url + path)
        headers = answer.headers
        csp = headers["content-security-policy"]
        assert "script-src 'self';" in csp and "unsafe-inline" not in csp, path
        assert "frame-ancestors 'none'" in csp
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["x-frame-options"] == "DENY"
        assert "server" not in headers or headers["server"] == "nginx"  # no version number
    # Swagger UI's page needs its inline bootstrap: only there; its bundle is this origin's.
    docs = httpx.get(nginx.url + "/docs")
    assert docs.status_code == 200
    docs_csp = docs.headers["content-security-policy"]
    assert "script-src 'self' 'unsafe-inline';" in docs_csp
    assert "http" not in docs_csp  # no other origin


def test_static_files_are_cached_and_compressed(nginx):
    page = httpx.get(nginx.url + "/", headers={"Accept-Encoding": "identity"})
    assert page.status_code == 200 and "<title>camp-search</title>" in page.text
    assert page.headers["cache-control"] == "no-cache"
    script = httpx.get(nginx.url + "/js/app.js", headers={"Accept-Encoding": "gzip"})
    assert script.headers["cache-control"] == "max-age=3600"
    assert script.headers["content-encoding"] == "gzip"
    assert script.headers["content-type"].startswith(("application/javascript", "text/javascript"))
    raw = httpx.get(nginx.url + "/js/app.js", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in raw.headers
    assert int(raw.headers["content-length"]) > len(gzip.compress(raw.content))


def test_api_routes_are_proxied(nginx, ui_stack_api):
    server, photos = ui_stack_api
    assert httpx.get(nginx.url + "/healthz").json()["status"] == "alive"
    assert httpx.get(nginx.url + "/readyz").json()["status"] == "ready"
    assert httpx.get(nginx.url + "/openapi.json").json()["info"]["title"] == "camp-search"
    through = httpx.get(f"{nginx.url}/v1/images/{photos[0].image_id}").json()
    direct = httpx.get(f"{server.url}/v1/images/{photos[0].image_id}").json()
    assert through == direct
    photo = httpx.get(f"{nginx.url}/v1/images/{photos[0].image_id}/file")
    assert photo.content == photos[0].path.read_bytes()


def test_metrics_are_only_for_the_allow_list(nginx):
    assert get_from("127.0.0.1", nginx.port, "/metrics") == 200
    assert get_from("127.0.0.2", nginx.port, "/metrics") == 403
    assert get_from("127.0.0.2", nginx.port, "/v1/info") == 200


def test_upload_limits_match_the_api(nginx, ui_stack_api):
    """nginx refuses exactly the bodies the API would refuse unread; a photo over the API's
    limit inside an acceptable body still gets the API's own 413."""
    limit = re.search(r"client_max_body_size (\d+)m;", NGINX_TEMPLATE.read_text())
    assert limit, "docker/nginx.conf must set client_max_body_size in MiB"
    api_body_limit = Settings.model_fields["max_upload_bytes"].default + FORM_OVERHEAD_BYTES
    assert int(limit.group(1)) * MEBIBYTE == api_body_limit

    photo_over_the_limit = b"\xff" * (Settings.model_fields["max_upload_bytes"].default + 1024)
    answer = httpx.post(
        nginx.url + "/v1/search/captions", files={"file": ("big.jpg", photo_over_the_limit)}
    )
    assert answer.status_code == 413
    assert answer.json()["instance"] == "/v1/search/captions"  # the API's own problem body

    body_over_the_limit = b"\xff" * (api_body_limit + 1024)
    answer = httpx.post(
        nginx.url + "/v1/search/captions", files={"file": ("huge.jpg", body_over_the_limit)}
    )
    assert answer.status_code == 413
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["status"] == 413
    assert "21 MiB" in answer.json()["detail"]


def test_api_down_is_a_problem_json_503(tmp_path):
    dead_port = free_port()  # nothing listens there
    frontend = NginxServer(tmp_path, f"127.0.0.1:{dead_port}").start()
    try:
        answer = httpx.post(frontend.url + "/v1/search/images", json={"text": "a dog"})
        assert answer.status_code == 503
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.headers["retry-after"] == "5"
        assert "not reachable" in answer.json()["detail"]
        assert httpx.get(frontend.url + "/nginx-health").text == "ok\n"  # nginx itself lives
    finally:
        frontend.stop()


def test_container_healthcheck_script(ui_stack_api):
    server, _ = ui_stack_api

    def run(url: str) -> subprocess.CompletedProcess:
        env = {"CAMPSEARCH_HEALTHCHECK_URL": url, "PATH": "/usr/bin:/bin"}
        return subprocess.run(
            [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30
        )

    assert run(f"{server.url}/readyz").returncode == 0
    down = run(f"http://127.0.0.1:{free_port()}/readyz")
    assert down.returncode == 1 and "unreachable" in down.stderr
    missing = run(f"{server.url}/no-such-route")
    assert missing.returncode == 1 and "404" in missing.stderr

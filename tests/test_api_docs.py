"""/docs and /redoc work offline: their pages reference only same-origin assets, which the API
serves from the installed `fastapi-offline` package, directly and through nginx (the
repository's docker/nginx.conf); headless Chromium, with every other origin blocked, renders
the operations."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from service_support import ServerThread, make_settings
from ui_stack import NGINX, NginxServer, free_port

from service.api.app import create_app
from service.api.docs import DOCS_ASSETS_URL

pytestmark = pytest.mark.browser

RENDER_TIMEOUT_MS = 30_000
EXPECTED_TYPES = {
    ".js": ("application/javascript", "text/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
}
# ReDoc's "API docs by Redocly" footer logo lives on Redocly's CDN; the policy blocks it and the
# page is whole without it.
REDOCLY_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
# An operation every OpenAPI document of the service has.
KNOWN_PATH = "/v1/search/images"


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_retrieval_model, small_grid_extractor):
    app = create_app(
        make_settings(tmp_path_factory.mktemp("docs-api")),
        model=tiny_retrieval_model,
        extractor=small_grid_extractor,
    )
    server = ServerThread(app, free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def frontend(api, tmp_path_factory):
    if not Path(NGINX).is_file():
        pytest.skip("nginx is not installed: apt-get install -y nginx (make system-deps)")
    server = NginxServer(tmp_path_factory.mktemp("docs-nginx"), f"127.0.0.1:{api.port}").start()
    yield server
    server.stop()


def referenced_urls(html: str) -> list[str]:
    """Every src=/href= of the page and the URLs its inline bootstrap passes to the bundle."""
    urls = re.findall(r"""(?:src|href|spec-url)=["']([^"']+)["']""", html)
    urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", html)
    return urls


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
@pytest.mark.parametrize("through", ["api", "nginx"])
def test_docs_pages_load_only_same_origin_assets(page, through, api, request):
    base = api.url if through == "api" else request.getfixturevalue("frontend").url
    answer = httpx.get(base + page)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    urls = referenced_urls(answer.text)
    assert any(url.startswith(DOCS_ASSETS_URL + "/") for url in urls), urls
    assert "/openapi.json" in urls
    for url in urls:
        assert not urlsplit(url).netloc and url.startswith("/"), f"{page} references {url}"
        if url.startswith(DOCS_ASSETS_URL):
            asset = httpx.get(base + url)
            assert asset.status_code == 200, url
            suffix = url[url.rindex(".") :]
            assert asset.headers["content-type"].startswith(EXPECTED_TYPES[suffix]), url
            assert len(asset.content) > 1000, url
    if through == "nginx":
        csp = answer.headers["content-security-policy"]
        assert "http" not in csp and "script-src 'self' 'unsafe-inline';" in csp


def test_missing_docs_asset_is_a_404(api):
    assert httpx.get(f"{api.url}{DOCS_ASSETS_URL}/nope.js").status_code == 404


@pytest.mark.parametrize(
    ("page", "operation_selector"),
    [
        ("/docs", f".opblock-summary-path[data-path='{KNOWN_PATH}']"),
        ("/redoc", "[data-section-id^='tag/'], [data-section-id^='operation/']"),
    ],
)
def test_docs_render_operations_offline_through_nginx(chromium, frontend, page, operation_selector):
    """Chromium may reach only nginx: any other origin (a CDN) is aborted and recorded."""
    browser_page = chromium.new_page()
    elsewhere: list[str] = []
    problems: list[str] = []

    def only_this_origin(route):
        if route.request.url.startswith(frontend.url + "/") or route.request.url.startswith(
            ("data:", "blob:")
        ):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    browser_page.route("**/*", only_this_origin)
    browser_page.on("pageerror", lambda error: problems.append(str(error)))
    browser_page.on(
        "console",
        lambda message: (
            problems.append(message.text)
            if (
                message.type == "error"
                and "Content Security Policy" in message.text
                and REDOCLY_LOGO not in message.text
            )
            else None
        ),
    )
    try:
        browser_page.goto(frontend.url + page)
        browser_page.wait_for_selector(operation_selector, timeout=RENDER_TIMEOUT_MS)
        assert KNOWN_PATH in browser_page.content()
    finally:
        browser_page.close()
    assert elsewhere == []
    assert problems == []

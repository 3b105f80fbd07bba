"""The real stack for the browser and frontend tests: `camp-search serve`, Debian nginx running
the repository's own docker/nginx.conf, headless Chromium, and coco-mini photos ingested over HTTP.

Everything here is a real process on a free port with a temp directory; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.load import stop_server

REPO_ROOT = Path(__file__).resolve().parents[1]
STATIC_DIR = REPO_ROOT / "service" / "static"
NGINX_TEMPLATE = REPO_ROOT / "docker" / "nginx.conf"
ARTIFACTS_DIR = REPO_ROOT / "tests" / "artifacts"

CHROMIUM = os.environ.get("CAMPSEARCH_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NGINX_MIME_TYPES = Path("/etc/nginx/mime.types")

API_READY_TIMEOUT_S = 120.0
NGINX_READY_TIMEOUT_S = 10.0
API_KEY = "ui-test-key-0123456789abcdef"
UI_PHOTO_COUNT = 12  # coco-mini photos the UI tests search (each ingests in ~0.1-0.3 s)
# The variables docker/nginx.conf takes (rendered by the nginx image's envsubst step).
NGINX_TEMPLATE_VARIABLES = (
    "CAMPSEARCH_NGINX_PORT",
    "CAMPSEARCH_API_UPSTREAM",
    "CAMPSEARCH_STATIC_ROOT",
    "CAMPSEARCH_METRICS_ALLOW",
    "CAMPSEARCH_RESOLVER",
)


def camp_search_command() -> str:
    """The `camp-search` console script of the interpreter running the tests."""
    beside = Path(sys.executable).parent / "camp-search"
    found = str(beside) if beside.is_file() else shutil.which("camp-search")
    if not found:
        raise RuntimeError("the camp-search command is not installed: pip install -e .")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


# --- the API ---------------------------------------------------------------------------------


class ApiServer:
    """`camp-search serve` in a subprocess with its own data dir and the shipped default model."""

    def __init__(
        self,
        workdir: Path,
        *,
        api_key: str = API_KEY,
        host: str = "127.0.0.1",
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        """`settings`: more CAMPSEARCH_* variables for this server (e.g. a bad checkpoint)."""
        self.workdir = workdir
        self.api_key = api_key
        self.host = host
        self.port = port or free_port()
        self.settings = dict(settings or {})
        self.log_path = workdir / "api.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, *, wait_ready: bool = True) -> ApiServer:
        env = {key: value for key, value in os.environ.items() if not key.startswith("CAMPSEARCH_")}
        env.update(
            CAMPSEARCH_DATA_DIR=str(self.workdir / "data"),
            CAMPSEARCH_API_KEYS=self.api_key,
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.settings)
        command = [camp_search_command(), "serve"]
        command += ["--host", self.host, "--port", str(self.port), "--log-level", "warning"]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + API_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"camp-search serve exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"API not ready: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None:
            stop_server(self.process, timeout_s=15)


@dataclass(frozen=True)
class IngestedPhoto:
    """A coco-mini photo stored through the API: 4 captions ingested, the 5th held out."""

    image_id: int
    path: Path
    captions: tuple[str, ...]
    held_out_caption: str


def ingest_coco_mini(
    api_url: str, shared_dir: Path, count: int, api_key: str = API_KEY
) -> list[IngestedPhoto]:
    """POST the first `count` coco-mini photos with their first four captions."""
    root = shared_dir / "data" / "coco-mini"
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    photos = []
    with httpx.Client(base_url=api_url, timeout=120, headers={"X-API-Key": api_key}) as client:
        for row in rows[:count]:
            path = root / row["image"]
            answer = client.post(
                "/v1/images",
                files={"file": (path.name, path.read_bytes(), "image/jpeg")},
                data={"captions": row["captions"][:4]},
            )
            answer.raise_for_status()
            photos.append(
                IngestedPhoto(
                    image_id=answer.json()["id"],
                    path=path,
                    captions=tuple(row["captions"][:4]),
                    held_out_caption=row["captions"][4],
                )
            )
    return photos


# --- nginx -------------------------------------------------------------------------------------

# What the nginx image's own /etc/nginx/nginx.conf does around conf.d (nginx-unprivileged:
# pid and temp paths in a writable place, mime types, one include); here pointed at a temp
# prefix. docker/nginx.conf itself is used unchanged apart from its ${CAMPSEARCH_*} values.
MAIN_CONFIG = """\
{user}worker_processes 1;
error_log {prefix}/error.log notice;
pid {prefix}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    proxy_temp_path {prefix}/proxy_temp;
    client_body_temp_path {prefix}/client_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    include {mime_types};
    default_type application/octet-stream;
    access_log {prefix}/access.log;
    # Which replica answered each request, after which others failed (tests/test_nginx_replicas.py).
    log_format upstreams '$request_method $request_uri $status [$upstream_addr] [$upstream_status]';
    access_log {prefix}/upstreams.log upstreams;
    sendfile on;
    keepalive_timeout 65;
    include {prefix}/conf.d/default.conf;
}}
"""


def render_nginx_template(template: str, values: Mapping[str, str]) -> str:
    """Replace `${NAME}` for exactly the template variables, as envsubst does in the image."""
    missing = set(NGINX_TEMPLATE_VARIABLES) - set(values)
    if missing:
        raise ValueError(f"no value for {sorted(missing)}")
    for name in NGINX_TEMPLATE_VARIABLES:
        template = template.replace("${" + name + "}", values[name])
    if "${CAMPSEARCH_" in template:
        raise ValueError("docker/nginx.conf uses a variable the tests do not know")
    return template


class NginxServer:
    """Debian nginx in the foreground (`daemon off`) with the repository's docker/nginx.conf."""

    def __init__(
        self,
        prefix: Path,
        upstream: str,
        *,
        metrics_allow: str = "127.0.0.1",
        resolver: str = "127.0.0.1",
    ) -> None:
        """`upstream` is an address:port, or a name:port that `resolver` (host[:port]) answers."""
        self.prefix = prefix
        self.port = free_port()
        # nginx's workers must be able to read the UI files: give them a copy in the prefix.
        static_root = prefix / "static"
        shutil.copytree(STATIC_DIR, static_root)
        self.values = {
            "CAMPSEARCH_NGINX_PORT": str(self.port),
            "CAMPSEARCH_API_UPSTREAM": upstream,
            "CAMPSEARCH_STATIC_ROOT": str(static_root),
            "CAMPSEARCH_METRICS_ALLOW": metrics_allow,
            "CAMPSEARCH_RESOLVER": resolver,
        }
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> NginxServer:
        (self.prefix / "conf.d").mkdir(parents=True, exist_ok=True)
        site = render_nginx_template(NGINX_TEMPLATE.read_text(), self.values)
        (self.prefix / "conf.d" / "default.conf").write_text(site)
        # As root, nginx's workers default to `nobody`, who cannot read pytest's temp dirs; the
        # image runs everything as its unprivileged user instead.
        user = "user root;\n" if os.geteuid() == 0 else ""
        main = MAIN_CONFIG.format(user=user, prefix=self.prefix, mime_types=NGINX_MIME_TYPES)
        config = self.prefix / "nginx.conf"
        config.write_text(main)
        command = [NGINX, "-p", f"{self.prefix}/", "-c", str(config), "-g", "daemon off;"]
        with (self.prefix / "stderr.log").open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, NGINX_READY_TIMEOUT_S, self.process)
        except (RuntimeError, TimeoutError) as error:
            logs = "".join(
                (self.prefix / name).read_text()
                for name in ("stderr.log", "error.log")
                if (self.prefix / name).is_file()
            )
            raise RuntimeError(f"nginx did not start: {error}\n{logs}") from error
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_server(self.process, timeout_s=5)


# --- the browser -------------------------------------------------------------------------------


def chromium_available() -> bool:
    return Path(CHROMIUM).is_file()


def launch_chromium(playwright):
    """Debian's Chromium through Playwright (`playwright install` cannot download here)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))

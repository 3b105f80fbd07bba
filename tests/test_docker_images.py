"""The Docker images, proven without a Docker engine: each Dockerfile is read and carried out
here, on this machine, as closely as a machine without Docker allows.

For docker/Dockerfile.cpu and docker/Dockerfile.gpu in turn:

* the builder stage's instructions run in order (ARG, ENV, WORKDIR, COPY, RUN) into a clean
  virtualenv at the image's /opt/venv, made by Debian bookworm's own Python 3.11 (the base of
  python:3.11-slim-bookworm) with no system site packages. Every container path (/opt/venv,
  /src, /data, ...) lives under one temp folder that stands in for the image's root.
* the runtime stage's ENV, USER, WORKDIR, ENTRYPOINT + CMD and HEALTHCHECK are used as written:
  the image's command starts with only the image's environment (plus what docker-compose.yml
  gives the API: API keys and a Redis URL), as uid/gid 10001 when the test runs as root (CI
  does), and the image's own healthcheck script is run until it passes.
* then a real coco-mini photo set is ingested and searched text -> photos and photo -> captions,
  directly and through nginx running docker/nginx.conf, and GET / must return the web UI.

What differs from a real build, each named where it happens:

* PyTorch's CPU wheel index (TORCH_INDEX_URL) is not reachable here: torch comes from the same
  requirements file through pip's default index, which finds the CPU wheel on local disk.
* pip's cache is kept (the image sets PIP_NO_CACHE_DIR=1) so reruns do not download again.
* the runtime stage's `useradd`/`mkdir`/`chown` RUN is replaced by making the folders here and
  giving /data and the home folder to uid 10001 (the test cannot add a user to this machine).
* the image's port 8000 is replaced by a free port (CMD's --port and CAMPSEARCH_PORT alike).
* GPU image, not run here: its apt-get layer (the CUDA base image's Python is 3.12; Debian's
  3.11 stands in), the CUDA build of torch and torchvision (requirements/torch-gpu.txt; the CPU
  torch of requirements/torch-cpu.txt stands in), and detectron2 (cloned and compiled with nvcc;
  its import is left out of the build's sanity check). faiss-gpu-cu12 is installed for real, as
  the Dockerfile says, and must import without a GPU and fall back to CPU search.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from redis_server import RedisServer, redis_server_binary
from ui_stack import NGINX, IngestedPhoto, NginxServer, free_port, ingest_coco_mini

from bench.load import stop_server

pytestmark = pytest.mark.image

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {
    "cpu": REPO_ROOT / "docker" / "Dockerfile.cpu",
    "gpu": REPO_ROOT / "docker" / "Dockerfile.gpu",
}
# Debian bookworm's Python 3.11: the distribution and minor version of python:3.11-slim-bookworm.
BASE_PYTHON = Path("/usr/bin/python3.11")
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Absolute paths of the images' file systems, mapped under the stand-in root.
CONTAINER_PATHS = (
    "/opt/venv",
    "/src",
    "/build",
    "/data",
    "/models",
    "/home/campsearch",
    "/usr/local/bin/campsearch-healthcheck",
)
CONTAINER_HOME = "/home/campsearch"
CONTAINER_PORT = "8000"
API_KEY = "image-test-key-0123456789abcdef"
PHOTOS = 6
INSTALL_TIMEOUT_S = 1500
HEALTHCHECK_POLL_S = 1.0  # the image probes every 15 s; the test need not wait that long


# --- reading a Dockerfile ----------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]


def parse_dockerfile(path: Path) -> dict[str, Stage]:
    """Stages by name; continuation lines joined and comment lines dropped, as Docker does."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, arguments = line.strip().partition(" ")
        keyword, arguments = keyword.upper(), " ".join(arguments.split())
        if keyword == "FROM":
            current = stages.setdefault(arguments.split()[-1], Stage(arguments.split()[-1]))
        elif current is not None:
            current.instructions.append(Instruction(keyword, arguments))
    return stages


def env_pairs(arguments: str) -> list[tuple[str, str]]:
    """`ENV A=1 B="x y"` -> [("A", "1"), ("B", "x y")]."""
    return [tuple(word.split("=", 1)) for word in shlex.split(arguments)]  # type: ignore[misc]


def expand(value: str, env: dict[str, str]) -> str:
    """Docker's $NAME / ${NAME} substitution in ENV values."""
    return re.sub(r"\$\{?(\w+)\}?", lambda match: env.get(match.group(1), ""), value)


# --- the stand-in root ------------------------------------------------------------------------


class ImageRoot:
    """A temp folder standing in for the image's `/`: container paths map under it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def host(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    def rewrite(self, text: str) -> str:
        """Every known container path in a command or value -> its host path."""
        for path in sorted(CONTAINER_PATHS, key=len, reverse=True):
            text = re.sub(
                r"(?<![\w/.])" + re.escape(path) + r"(?=[/\s\"':;]|$)", str(self.host(path)), text
            )
        return text


@dataclass(frozen=True)
class Substitution:
    """Text of a builder RUN this machine cannot run as written. It must be in some RUN, so a
    changed Dockerfile fails here instead of silently running something else."""

    pattern: str
    replacement: str | None  # None: that RUN is not run here at all
    why: str


GPU_SUBSTITUTIONS = (
    Substitution("apt-get install", None, "the CUDA base image's system packages"),
    Substitution(
        'pip install --index-url "${TORCH_INDEX_URL}" -r requirements/torch-gpu.txt',
        f"pip install -r {REPO_ROOT / 'requirements' / 'torch-cpu.txt'}",
        "the CUDA build of torch and torchvision: the CPU torch stands in",
    ),
    Substitution(
        'git clone --filter=blob:none "${DETECTRON2_REPO}"',
        None,
        "detectron2 is cloned from GitHub and compiled against CUDA torch with nvcc",
    ),
    Substitution(
        "import faiss, torch, detectron2, service",
        "import faiss, torch, service",
        "detectron2 is not built here: the build's import check leaves it out",
    ),
)


def apply_substitutions(
    command: str, substitutions: tuple[Substitution, ...], used: set[Substitution]
) -> str | None:
    for rule in substitutions:
        if rule.pattern not in command:
            continue
        used.add(rule)
        if rule.replacement is None:
            print(f"not run here ({rule.why}): {command[:100]}")
            return None
        print(f"changed here ({rule.why}): {rule.pattern} -> {rule.replacement}")
        command = command.replace(rule.pattern, rule.replacement)
    return command


def base_env() -> dict[str, str]:
    """What a RUN sees besides the Dockerfile's ARG/ENV: this machine's pip configuration
    (where the CPU torch wheel is found), and the base image's interpreter first on PATH."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key.startswith("PIP_") or key in ("HOME", "LANG", "SSL_CERT_FILE", "TMPDIR")
    }
    env["PATH"] = BASE_PATH
    return env


def base_interpreter_dir(root: Path) -> Path:
    """`python` and `python3` of the base image (Debian's 3.11) in a folder of their own."""
    folder = root / "base-image-bin"
    folder.mkdir(exist_ok=True)
    for name in ("python", "python3"):
        link = folder / name
        if not link.exists():
            link.symlink_to(BASE_PYTHON)
    return folder


def build(stage: Stage, root: ImageRoot, substitutions: tuple[Substitution, ...]) -> None:
    """Carry out the builder stage's ARG, ENV, WORKDIR, COPY and RUN instructions in order."""
    interpreters = base_interpreter_dir(root.root)
    env = base_env()
    env["PATH"] = f"{interpreters}:{env['PATH']}"
    workdir = root.host("/")
    used: set[Substitution] = set()
    for instruction in stage.instructions:
        keyword, arguments = instruction.keyword, instruction.arguments
        if keyword == "ARG":
            name, _, default = arguments.partition("=")
            env[name] = default
            if name == "TORCH_INDEX_URL":
                # PyTorch's index is not reachable here: pip's default index serves torch.
                env[name] = "https://pypi.org/simple"
        elif keyword == "ENV":
            for name, value in env_pairs(arguments):
                if name == "PIP_NO_CACHE_DIR":
                    continue  # keep pip's cache between test runs
                env[name] = root.rewrite(expand(value, env))
        elif keyword == "WORKDIR":
            workdir = root.host(arguments)
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            copy_into(arguments, workdir, root)
        elif keyword == "RUN":
            command = apply_substitutions(arguments, substitutions, used)
            if command is None:
                continue
            completed = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", root.rewrite(command)],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
            )
            assert completed.returncode == 0, (
                f"RUN {command}\nfailed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
            )
    unused = [rule.pattern for rule in substitutions if rule not in used]
    assert not unused, f"the Dockerfile no longer has {unused}: update the substitutions"


def copy_into(arguments: str, workdir: Path, root: ImageRoot) -> None:
    """COPY src... dst from the build context (the repository); --from=builder is the same
    tree here."""
    if arguments.startswith("--from="):
        return
    *sources, destination = arguments.split()
    target = root.host(destination) if destination.startswith("/") else workdir / destination
    for source in sources:
        origin = REPO_ROOT / source
        if origin.is_dir():
            shutil.copytree(
                origin, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        elif destination.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target / origin.name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)


# --- the runtime stage ------------------------------------------------------------------------


@dataclass
class Runtime:
    env: dict[str, str]
    command: list[str]
    healthcheck: list[str]
    workdir: Path
    uid: int
    gid: int
    start_period_s: float


def prepare_runtime(stage: Stage, root: ImageRoot, port: int, redis_url: str) -> Runtime:
    """The runtime stage's environment, user, folders, command and healthcheck."""
    (create_user,) = [run for run in stage.all("RUN") if "useradd" in run]
    assert "--uid 10001" in create_user and "mkdir -p /data /models" in create_user
    uid, gid = (int(part) for part in stage.last("USER").split(":"))
    for instruction in stage.instructions:
        if instruction.keyword == "COPY":
            copy_into(instruction.arguments, root.host("/"), root)
    for folder in ("/data", "/models", CONTAINER_HOME):
        root.host(folder).mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(root.host(folder), uid, gid)

    env = {"PATH": BASE_PATH, "HOME": str(root.host(CONTAINER_HOME)), "LANG": "C.UTF-8"}
    for arguments in stage.all("ENV"):
        for name, value in env_pairs(arguments):
            env[name] = root.rewrite(expand(value, env))
    env["CAMPSEARCH_PORT"] = str(port)
    # What docker-compose.yml's api service adds.
    env["CAMPSEARCH_API_KEYS"] = API_KEY
    env["CAMPSEARCH_REDIS_URL"] = redis_url

    command = json.loads(stage.last("ENTRYPOINT")) + json.loads(stage.last("CMD"))
    assert command[command.index("--port") + 1] == CONTAINER_PORT
    command[command.index("--port") + 1] = str(port)
    healthcheck = stage.last("HEALTHCHECK")
    start_period = re.search(r"--start-period=(\d+)s", healthcheck)
    assert start_period, healthcheck
    probe = json.loads(healthcheck[healthcheck.index("CMD") + len("CMD") :])
    return Runtime(
        env=env,
        command=[root.rewrite(part) for part in command],
        healthcheck=[root.rewrite(part) for part in probe],
        workdir=root.host(stage.last("WORKDIR")),
        uid=uid,
        gid=gid,
        start_period_s=float(start_period.group(1)),
    )


def as_image_user(runtime: Runtime) -> dict:
    """subprocess arguments that run a process as the image's user (only root can switch)."""
    if os.geteuid() != 0:
        print("not root: the image's processes run as this user, not uid 10001")
        return {}
    return {"user": runtime.uid, "group": runtime.gid, "extra_groups": []}


def resolve(executable: str, env: dict[str, str]) -> str:
    found = shutil.which(executable, path=env["PATH"])
    assert found, f"{executable} is not on the image's PATH {env['PATH']}"
    return found


def wait_healthy(runtime: Runtime, server: subprocess.Popen, log: Path) -> None:
    """Run the image's HEALTHCHECK command until it exits 0, within its start period."""
    probe = [resolve(runtime.healthcheck[0], runtime.env), *runtime.healthcheck[1:]]
    deadline = time.monotonic() + runtime.start_period_s
    while True:
        if server.poll() is not None:
            pytest.fail(
                f"the image's command exited {server.returncode}: {log.read_text()[-3000:]}"
            )
        result = subprocess.run(
            probe,
            env=runtime.env,
            cwd=runtime.workdir,
            capture_output=True,
            text=True,
            timeout=30,
            **as_image_user(runtime),
        )
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"healthcheck still failing: {result.stderr}\n{log.read_text()[-3000:]}")
        time.sleep(HEALTHCHECK_POLL_S)


# --- the test ---------------------------------------------------------------------------------


@pytest.fixture
def image_root() -> Iterator[ImageRoot]:
    """A world-traversable temp root (pytest's own are 0700: uid 10001 could not enter)."""
    folder = Path(tempfile.mkdtemp(prefix="campsearch-image-"))
    folder.chmod(0o755)
    try:
        yield ImageRoot(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (make system-deps)")
    server = RedisServer(tmp_path / "redis").start()
    yield server.url
    server.kill()


def search_checks(base_url: str, photos: list[IngestedPhoto]) -> None:
    """A text -> photos and a photo -> captions search answer with the ingested data."""
    ids = {photo.image_id for photo in photos}
    headers = {"X-API-Key": API_KEY}
    with httpx.Client(base_url=base_url, timeout=120, headers=headers) as client:
        for photo in photos[:2]:
            answer = client.post("/v1/search/images", json={"text": photo.captions[0], "limit": 3})
            assert answer.status_code == 200, answer.text
            hits = [hit["id"] for hit in answer.json()["results"]]
            assert hits and set(hits) <= ids
            assert photo.image_id in hits, (photo.captions[0], hits)
        photo = photos[0]
        answer = client.post(
            "/v1/search/captions",
            files={"file": (photo.path.name, photo.path.read_bytes(), "image/jpeg")},
            data={"limit": "5"},
        )
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert results and {hit["image_id"] for hit in results} <= ids
        assert photo.image_id in {hit["image_id"] for hit in results}
        ui = client.get("/")
        assert ui.status_code == 200 and "<title>camp-search</title>" in ui.text


def venv_python_says(venv: Path, code: str) -> str:
    """stdout of the venv's python running `code` outside the repository (no repo on sys.path)."""
    return subprocess.run(
        [venv / "bin" / "python", "-c", code],
        cwd=venv,
        env={"PATH": BASE_PATH, "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout


# Ids name the files: an id "gpu" would read as the gpu marker (conftest skips those).
@pytest.mark.parametrize("image", ["cpu", "gpu"], ids=["Dockerfile.cpu", "Dockerfile.gpu"])
def test_image_installs_serves_and_searches(image, image_root, redis_url, shared_dir, tmp_path):
    if not BASE_PYTHON.is_file():
        pytest.skip(f"{BASE_PYTHON} (Debian's python3.11 with venv) is not installed")
    stages = parse_dockerfile(DOCKERFILES[image])
    assert list(stages) == ["builder", "runtime"]
    build(stages["builder"], image_root, GPU_SUBSTITUTIONS if image == "gpu" else ())

    venv = image_root.host("/opt/venv")
    installed = venv_python_says(venv, "import service; print(service.__file__)")
    assert installed.split()[0].startswith(str(venv / "lib")), installed
    if image == "gpu":
        faiss_check = venv_python_says(
            venv,
            "import faiss; print(hasattr(faiss, 'StandardGpuResources'), faiss.get_num_gpus())",
        )
        assert faiss_check.split() == ["True", "0"], "faiss-gpu must import and see no GPU here"

    port = free_port()
    runtime = prepare_runtime(stages["runtime"], image_root, port, redis_url)
    log = tmp_path / "api.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [resolve(runtime.command[0], runtime.env), *runtime.command[1:]],
            env=runtime.env,
            cwd=runtime.workdir,
            stdout=sink,
            stderr=subprocess.STDOUT,
            **as_image_user(runtime),
        )
    frontend = None
    try:
        wait_healthy(runtime, server, log)
        api_url = f"http://127.0.0.1:{port}"
        photos = ingest_coco_mini(api_url, shared_dir, PHOTOS, api_key=API_KEY)
        data_dir = image_root.host("/data")
        assert any(data_dir.iterdir()), "nothing was stored in the image's /data"
        if os.geteuid() == 0:
            owners = {path.stat().st_uid for path in data_dir.rglob("*")}
            assert owners == {runtime.uid}, f"files in /data owned by {owners}"
        search_checks(api_url, photos)
        if Path(NGINX).is_file():
            frontend = NginxServer(tmp_path / "nginx", f"127.0.0.1:{port}").start()
            search_checks(frontend.url, photos)
        else:
            print("nginx is not installed: the frontend part is not run")
    finally:
        if frontend is not None:
            frontend.stop()
        stop_server(server, timeout_s=15)
    # uvicorn shuts down gracefully on SIGTERM, then ends by the same signal.
    assert server.returncode in (0, -signal.SIGTERM), log.read_text()[-3000:]
    assert "Application shutdown complete" in log.read_text()

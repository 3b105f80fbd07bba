"""The service now against a baseline commit, black-box, in one run on the same machine and data.

    python bench/compare_search.py --baseline 7436d54 [--json results/compare_search.json]

The baseline ref is unpacked with `git archive` into a temporary directory and served from there
with this venv's packages (PYTHONPATH puts its source first); the current tree is served the same
way. Both `camp-search serve` processes (real uvicorn, 127.0.0.1, rate limits off) get their own
fresh data dir with the same 239 coco-mini photos and their first four captions. Then, with both
servers up, every figure is measured in rounds that alternate baseline and current, so load from
other jobs on a shared machine hits both alike; per-request figures are medians over all rounds:

* text -> images p50, caches warm (each held-out caption searched once before timing);
* text -> images p50 with every in-process cache off (both servers restarted on the same data
  with CAMPSEARCH_IMAGE_CACHE_MIB=0, CAMPSEARCH_CAPTION_CACHE_MIB=0 and
  CAMPSEARCH_FEATURE_CACHE_MIB=0);
* photo -> captions p50 with photos not in the corpus (flickr8k photos, each sent with a random
  tail after the JPEG's end, so no upload cache can answer);
* 16 concurrent clients of text -> images for `--seconds`: searches per second and 5xx count.

Prints a table with the ratios baseline / current (higher is better for the current tree, for
searches/s current / baseline) and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import API_KEY, REQUEST_TIMEOUT_S, free_port, stop_server, wait_ready

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("SHARED_DIR", REPO_ROOT.parent / "shared"))
COCO = SHARED_DIR / "data" / "coco-mini" / "manifest.jsonl"
FLICKR = SHARED_DIR / "data" / "flickr8k" / "manifest.jsonl"
DEFAULT_BASELINE = "7436d54"
CACHES_OFF = {f"CAMPSEARCH_{c}_CACHE_MIB": "0" for c in ("IMAGE", "CAPTION", "FEATURE")}


def serve_command(source: Path) -> str:
    """Python code that runs the tree's `camp-search` entry point (its module moved over time)."""
    scripts = tomllib.loads((source / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["camp-search"].partition(":")
    return f"import sys; from {module} import {function}; sys.argv[0] = 'camp-search'; {function}()"


@dataclass
class Server:
    name: str
    source: Path
    data_dir: Path
    process: subprocess.Popen | None = None
    url: str = ""

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPSEARCH_")}
        env.update(
            PYTHONPATH=str(self.source),
            CAMPSEARCH_DATA_DIR=str(self.data_dir),
            CAMPSEARCH_API_KEYS=API_KEY,
            CAMPSEARCH_RATE_LIMIT_REQUESTS="0",
            CAMPSEARCH_RATE_LIMIT_WRITES="0",
            CAMPSEARCH_REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S),
            HF_HUB_OFFLINE="1",
            **(extra_env or {}),
        )
        args = [sys.executable, "-c", serve_command(self.source), "serve", "--host", "127.0.0.1"]
        args += ["--port", str(port), "--log-level", "warning"]
        log = (self.data_dir.parent / f"{self.name}.log").open("ab")
        self.process = subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.source
        )
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.process is None:
            return
        stop_server(self.process)
        self.process = None


def unpack(ref: str, into: Path) -> Path:
    """The tree of `ref` (git archive), extracted into `into`."""
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", ref],
        check=True,
        capture_output=True,
    ).stdout
    into.mkdir(parents=True)
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def manifest_rows(path: Path, count: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:count]


async def ingest(server: Server, rows: list[dict]) -> None:
    async with httpx.AsyncClient(
        base_url=server.url, timeout=300, headers={"X-API-Key": API_KEY}
    ) as client:
        for row in rows:
            data = (COCO.parent / row["image"]).read_bytes()
            captions = {"captions": row["captions"][:4]}
            files = {"file": ("p.jpg", data)}
            response = await client.post("/v1/images", files=files, data=captions)
            response.raise_for_status()


async def timed(client: httpx.AsyncClient, request) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    response = await request(client)
    return 1e3 * (time.perf_counter() - start), response


def text_request(text: str):
    def send(client: httpx.AsyncClient):
        return client.post("/v1/search/images", json={"text": text, "limit": 10})

    return send


def photo_request(photo: bytes, rng: random.Random):
    def send(client: httpx.AsyncClient):
        # A new tail after the JPEG's end at every send: a new sha256, the same pixels, so
        # neither the corpus nor the upload-region cache knows the photo (drawn once per photo,
        # every round after the first was answered from that cache).
        data = photo + rng.randbytes(16)
        return client.post("/v1/search/captions", files={"file": ("q.jpg", data, "image/jpeg")})

    return send


async def sequential(
    servers: list[Server], requests: list, rounds: int, warm: bool
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Latencies (ms) per server, and the medians of the stage timings each server reports
    (`timings_ms`: where its time went): `rounds` rounds, each sending every request to one
    server after the other (alternating which goes first); optionally one untimed pass first."""
    latencies: dict[str, list[float]] = {s.name: [] for s in servers}
    stages: dict[str, dict[str, list[float]]] = {s.name: {} for s in servers}
    clients = {
        s.name: httpx.AsyncClient(base_url=s.url, timeout=120, headers={"X-API-Key": API_KEY})
        for s in servers
    }
    try:
        if warm:
            for server in servers:
                for request in requests:
                    await request(clients[server.name])
        for round_index in range(rounds):
            order = servers if round_index % 2 == 0 else servers[::-1]
            for server in order:
                for request in requests:
                    ms, response = await timed(clients[server.name], request)
                    if response.status_code != 200:
                        raise RuntimeError(f"{server.name}: search answered {response.status_code}")
                    latencies[server.name].append(ms)
                    for stage, value in response.json().get("timings_ms", {}).items():
                        stages[server.name].setdefault(stage, []).append(value)
    finally:
        for client in clients.values():
            await client.aclose()
    medians = {
        name: {stage: round(statistics.median(v), 1) for stage, v in by_stage.items()}
        for name, by_stage in stages.items()
    }
    return latencies, medians


async def concurrent(server: Server, texts: list[str], clients: int, seconds: float) -> dict:
    """`clients` clients searching text -> images in a loop for `seconds`."""
    done, errors_5xx, other = 0, 0, 0
    deadline = time.monotonic() + seconds

    async def worker(seed: int) -> None:
        nonlocal done, errors_5xx, other
        rng = random.Random(seed)
        async with httpx.AsyncClient(
            base_url=server.url, timeout=120, headers={"X-API-Key": API_KEY}
        ) as client:
            while time.monotonic() < deadline:
                response = await text_request(rng.choice(texts))(client)
                if response.status_code >= 500:
                    errors_5xx += 1
                elif response.status_code != 200:
                    other += 1
                else:
                    done += 1

    start = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    elapsed = time.monotonic() - start
    return {"searches_per_s": done / elapsed, "ok": done, "5xx": errors_5xx, "other": other}


def p50(values: list[float]) -> float:
    return statistics.median(values)


async def run(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="compare-search-"))
    coco = manifest_rows(COCO, args.photos)
    texts = [row["captions"][4] for row in coco if len(row["captions"]) > 4][: args.queries]
    flickr = manifest_rows(FLICKR, args.upload_photos)
    uploads = [(FLICKR.parent / row["image"]).read_bytes() for row in flickr]
    servers = [
        Server("baseline", unpack(args.baseline, workdir / "baseline-src"), workdir / "b" / "data"),
        Server("current", REPO_ROOT, workdir / "c" / "data"),
    ]
    for server in servers:
        server.data_dir.mkdir(parents=True)
    results: dict = {}
    try:
        for server in servers:
            server.start()
        for server in servers:
            await wait_ready(server.url, server.process)
            started = time.monotonic()
            await ingest(server, coco)
            results.setdefault(server.name, {})["ingest_s"] = time.monotonic() - started
            print(f"{server.name}: {len(coco)} photos ingested", flush=True)

        warm, warm_stages = await sequential(
            servers, [text_request(t) for t in texts], args.rounds, warm=True
        )
        rng = random.Random(0)
        photo, photo_stages = await sequential(
            servers, [photo_request(p, rng) for p in uploads], args.rounds, warm=False
        )
        for server in servers:
            results[server.name]["text_p50_warm_ms"] = p50(warm[server.name])
            results[server.name]["text_warm_stages_ms"] = warm_stages[server.name]
            results[server.name]["photo_p50_ms"] = p50(photo[server.name])
            results[server.name]["photo_stages_ms"] = photo_stages[server.name]
        for round_index in range(args.rounds):
            order = servers if round_index % 2 == 0 else servers[::-1]
            for server in order:
                figures = await concurrent(server, texts, args.clients, args.seconds)
                results[server.name].setdefault("concurrent_rounds", []).append(figures)
        for server in servers:
            rounds = results[server.name]["concurrent_rounds"]
            results[server.name]["concurrent_searches_per_s"] = statistics.median(
                r["searches_per_s"] for r in rounds
            )
            results[server.name]["concurrent_5xx"] = sum(r["5xx"] for r in rounds)

        for server in servers:  # same data, every in-process cache off
            server.stop()
            server.start(CACHES_OFF)
        for server in servers:
            await wait_ready(server.url, server.process)
        cold, cold_stages = await sequential(
            servers, [text_request(t) for t in texts], args.rounds, warm=False
        )
        for server in servers:
            results[server.name]["text_p50_caches_off_ms"] = p50(cold[server.name])
            results[server.name]["text_caches_off_stages_ms"] = cold_stages[server.name]
    finally:
        for server in servers:
            server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


ROWS = (
    ("text -> images p50, caches warm (ms)", "text_p50_warm_ms", "lower"),
    ("text -> images p50, caches off (ms)", "text_p50_caches_off_ms", "lower"),
    ("photo -> captions p50, new photo (ms)", "photo_p50_ms", "lower"),
    ("16 clients, searches/s", "concurrent_searches_per_s", "higher"),
    ("16 clients, 5xx", "concurrent_5xx", None),
)


def table(results: dict) -> tuple[str, dict[str, float]]:
    base, cur = results["baseline"], results["current"]
    lines = ["| figure | baseline | current | speed-up |", "|---|---|---|---|"]
    ratios: dict[str, float] = {}
    for label, key, better in ROWS:
        ratio = ""
        if better == "lower":
            ratios[key] = base[key] / cur[key]
        elif better == "higher":
            ratios[key] = cur[key] / base[key]
        if key in ratios:
            ratio = f"{ratios[key]:.2f}x"
        lines.append(f"| {label} | {base[key]:.1f} | {cur[key]:.1f} | {ratio} |")
    return "\n".join(lines), ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git ref to compare with")
    parser.add_argument("--photos", type=int, default=239, help="coco-mini photos stored")
    parser.add_argument("--queries", type=int, default=30, help="held-out captions searched")
    parser.add_argument("--upload-photos", type=int, default=10, help="new photos searched")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per figure")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency round")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    load_before = list(os.getloadavg())
    results = asyncio.run(run(args))
    text, ratios = table(results)
    print(text)
    for name in ("baseline", "current"):
        for key in ("text_warm_stages_ms", "text_caches_off_stages_ms", "photo_stages_ms"):
            print(f"{name} {key}: {results[name].get(key)}")
    figures = {
        "baseline": args.baseline,
        "current": subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "statistic": "medians over alternating rounds (shared machine)",
        "load_average_before_after": [load_before, list(os.getloadavg())],
        "results": results,
        "ratios": ratios,
        "table": text,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Mixed load on the running service: text search, photo search and ingest from many clients.

Starts `camp-search serve` (the shipped default model, a fresh data dir, API key, rate limits
off: this measures capacity) on 127.0.0.1 only, ingests `--photos` coco-mini photos with their
first four captions, then runs two phases with an async httpx client of its own:

  * baseline: 1 client for `--baseline-seconds`;
  * load: `--clients` clients (default 64) for `--seconds` (default 60).

Each client loops over a mix (default 70% text -> images with a held-out caption, 20% photo ->
captions by upload, 10% ingest of a new photo: a coco-mini JPEG with a random tail after its
end, so a new sha256 each time). Per kind: count, errors by status, throughput, p50/p99 (ms);
and the checks: no 5xx, no request over the server's request timeout. The ratios load/baseline
of throughput and p50 are printed.

`--soak-minutes M` then keeps the same load for M minutes and samples the server's RSS every
`--rss-every` seconds; it reports the RSS after the first minute and at the end, and the growth.

    python bench/load.py --seconds 60 --json results/load.json
    python bench/load.py --seconds 60 --soak-minutes 10 --json results/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = REPO_ROOT.parent / "shared" / "data" / "coco-mini" / "manifest.jsonl"
API_KEY = "load-bench-key-0123456789abcdef"
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 30.0  # the server's CAMPSEARCH_REQUEST_TIMEOUT_S for this run
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 30.0  # the client waits longer, to see slow answers
MIX = {"text": 0.7, "photo": 0.2, "ingest": 0.1}  # --mix overrides it


@dataclass
class Phase:
    """What one phase measured."""

    name: str
    clients: int
    seconds: float = 0.0
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    transport_errors: Counter = field(default_factory=Counter)
    over_timeout: int = 0

    def summary(self) -> dict:
        kinds = {}
        for kind in MIX:
            latencies = sorted(self.latencies_ms.get(kind, []))
            statuses = self.statuses.get(kind, Counter())
            kinds[kind] = {
                "requests": len(latencies),
                "per_s": round(len(latencies) / self.seconds, 2) if self.seconds else 0.0,
                "p50_ms": _percentile(latencies, 50),
                "p99_ms": _percentile(latencies, 99),
                "statuses": {str(k): v for k, v in sorted(statuses.items())},
            }
        every = sorted(v for values in self.latencies_ms.values() for v in values)
        server_errors = sum(
            n for c in self.statuses.values() for status, n in c.items() if status >= 500
        )
        return {
            "name": self.name,
            "clients": self.clients,
            "seconds": round(self.seconds, 1),
            "requests": len(every),
            "per_s": round(len(every) / self.seconds, 2) if self.seconds else 0.0,
            "p50_ms": _percentile(every, 50),
            "p99_ms": _percentile(every, 99),
            "server_errors_5xx": server_errors,
            "transport_errors": dict(self.transport_errors),
            "over_request_timeout": self.over_timeout,
            "kinds": kinds,
        }


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 1)


# --- the server --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(workdir: Path, port: int, redis_url: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPSEARCH_")}
    env.update(
        CAMPSEARCH_DATA_DIR=str(workdir / "data"),
        CAMPSEARCH_API_KEYS=API_KEY,
        CAMPSEARCH_RATE_LIMIT_REQUESTS="0",
        CAMPSEARCH_RATE_LIMIT_WRITES="0",
        CAMPSEARCH_REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S),
        HF_HUB_OFFLINE="1",
    )
    if redis_url:
        env["CAMPSEARCH_REDIS_URL"] = redis_url
    command = shutil.which("camp-search") or str(Path(sys.executable).parent / "camp-search")
    args = [command, "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    log = (workdir / "server.log").open("wb")
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)


async def wait_ready(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            try:
                if (await client.get(f"{url}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.25)
    raise TimeoutError("the server did not become ready")


def rss_mib(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# --- the load ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    photos: list[bytes]  # JPEG bytes, for photo search and ingest
    queries: list[str]  # held-out captions (the 5th of each photo)


def load_corpus(manifest: Path, count: int) -> tuple[Corpus, list[tuple[bytes, list[str]]]]:
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    rows = rows[:count]
    stored = [((manifest.parent / r["image"]).read_bytes(), r["captions"][:4]) for r in rows]
    queries = [r["captions"][4] for r in rows if len(r["captions"]) > 4]
    return Corpus([data for data, _ in stored], queries), stored


async def one_request(client: httpx.AsyncClient, kind: str, corpus: Corpus, rng: random.Random):
    if kind == "text":
        return await client.post(
            "/v1/search/images", json={"text": rng.choice(corpus.queries), "limit": 10}
        )
    if kind == "photo":
        photo = rng.choice(corpus.photos)
        return await client.post(
            "/v1/search/captions", files={"file": ("q.jpg", photo, "image/jpeg")}
        )
    tail = rng.randbytes(16)  # after the JPEG's end: ignored by decoders, a new sha256
    photo = rng.choice(corpus.photos) + tail
    return await client.post(
        "/v1/images",
        files={"file": ("new.jpg", photo, "image/jpeg")},
        data={"captions": ["a photo added under load"]},
    )


async def run_phase(
    url: str, corpus: Corpus, clients: int, seconds: float, name: str, mix: dict[str, float]
) -> Phase:
    phase = Phase(name, clients)
    kinds, weights = zip(*((k, w) for k, w in mix.items() if w > 0), strict=True)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=url, timeout=CLIENT_TIMEOUT_S, limits=limits, headers={"X-API-Key": API_KEY}
    ) as client:
        started = time.monotonic()
        deadline = started + seconds

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                kind = rng.choices(kinds, weights)[0]
                sent = time.perf_counter()
                try:
                    response = await one_request(client, kind, corpus, rng)
                except httpx.TransportError as error:
                    phase.transport_errors[type(error).__name__] += 1
                    continue
                elapsed = time.perf_counter() - sent
                phase.latencies_ms[kind].append(elapsed * 1000)
                phase.statuses[kind][response.status_code] += 1
                if elapsed > REQUEST_TIMEOUT_S:
                    phase.over_timeout += 1

        await asyncio.gather(*(worker(seed) for seed in range(clients)))
        phase.seconds = time.monotonic() - started
    return phase


async def soak(
    url: str,
    corpus: Corpus,
    pid: int,
    clients: int,
    minutes: float,
    every_s: float,
    mix: dict[str, float],
):
    samples: list[tuple[float, float]] = []
    started = time.monotonic()

    async def sample() -> None:
        while True:
            samples.append((round(time.monotonic() - started, 1), round(rss_mib(pid), 1)))
            await asyncio.sleep(every_s)

    sampler = asyncio.create_task(sample())
    try:
        phase = await run_phase(url, corpus, clients, minutes * 60, "soak", mix)
    finally:
        sampler.cancel()
    samples.append((round(time.monotonic() - started, 1), round(rss_mib(pid), 1)))
    after_first_minute = next((rss for t, rss in samples if t >= 60), samples[0][1])
    return phase, {
        "samples_s_mib": samples,
        "rss_after_1_min_mib": after_first_minute,
        "rss_end_mib": samples[-1][1],
        "rss_max_mib": max(rss for _, rss in samples),
        "growth_after_1_min_mib": round(samples[-1][1] - after_first_minute, 1),
    }


async def main_async(args: argparse.Namespace) -> dict:
    corpus, stored = load_corpus(args.manifest, args.photos)
    workdir = Path(tempfile.mkdtemp(prefix="camp-load-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(workdir, port, args.redis_url)
    try:
        await wait_ready(url, process)
        async with httpx.AsyncClient(
            base_url=url, timeout=120, headers={"X-API-Key": API_KEY}
        ) as client:
            for data, captions in stored:
                response = await client.post(
                    "/v1/images", files={"file": ("p.jpg", data)}, data={"captions": captions}
                )
                response.raise_for_status()
        rss_start = rss_mib(process.pid)
        baseline = await run_phase(url, corpus, 1, args.baseline_seconds, "baseline", args.mix)
        load = await run_phase(url, corpus, args.clients, args.seconds, "load", args.mix)
        result = {
            "server": {"request_timeout_s": REQUEST_TIMEOUT_S, "photos": args.photos},
            "mix": args.mix,
            "rss_start_mib": round(rss_start, 1),
            "rss_after_load_mib": round(rss_mib(process.pid), 1),
            "baseline": baseline.summary(),
            "load": load.summary(),
        }
        if args.soak_minutes > 0:
            phase, rss = await soak(
                url,
                corpus,
                process.pid,
                args.clients,
                args.soak_minutes,
                args.rss_every,
                args.mix,
            )
            result["soak"] = {**phase.summary(), "rss": rss}
        return result
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def report(result: dict) -> None:
    for name in ("baseline", "load", "soak"):
        phase = result.get(name)
        if not phase:
            continue
        print(
            f"{name:8s} {phase['clients']:3d} clients {phase['seconds']:6.1f} s: "
            f"{phase['requests']} requests, {phase['per_s']} /s, p50 {phase['p50_ms']} ms, "
            f"p99 {phase['p99_ms']} ms, 5xx {phase['server_errors_5xx']}, transport errors "
            f"{sum(phase['transport_errors'].values())}, "
            f"over timeout {phase['over_request_timeout']}"
        )
        for kind, figures in phase["kinds"].items():
            print(
                f"    {kind:6s} {figures['requests']:6d} req {figures['per_s']:7.2f} /s "
                f"p50 {figures['p50_ms']} ms p99 {figures['p99_ms']} ms {figures['statuses']}"
            )
    base, load = result["baseline"], result["load"]
    if base["per_s"] and base["p50_ms"]:
        print(
            f"load/baseline: throughput x{load['per_s'] / base['per_s']:.2f}, "
            f"p50 x{load['p50_ms'] / base['p50_ms']:.2f}"
        )
    print(f"server RSS: {result['rss_start_mib']} MiB before, {result['rss_after_load_mib']} after")
    if "soak" in result:
        rss = result["soak"]["rss"]
        print(
            f"soak RSS: {rss['rss_after_1_min_mib']} MiB after 1 min, {rss['rss_end_mib']} at "
            f"the end (growth {rss['growth_after_1_min_mib']} MiB, max {rss['rss_max_mib']})"
        )


def parse_mix(text: str) -> dict[str, float]:
    """`text=0.7,photo=0.2,ingest=0.1` -> weights (kinds left out weigh 0)."""
    mix = dict.fromkeys(MIX, 0.0)
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind.strip() not in MIX:
            raise argparse.ArgumentTypeError(f"unknown kind {kind!r}: use {', '.join(MIX)}")
        mix[kind.strip()] = float(weight)
    if not any(weight > 0 for weight in mix.values()):
        raise argparse.ArgumentTypeError("at least one kind needs a weight above 0")
    return mix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--photos", type=int, default=40, help="coco-mini photos stored first")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--baseline-seconds", type=float, default=10.0)
    parser.add_argument("--soak-minutes", type=float, default=0.0)
    parser.add_argument("--rss-every", type=float, default=5.0, help="soak RSS sampling (s)")
    parser.add_argument("--redis-url", default=None, help="serve with this Redis cache")
    parser.add_argument(
        "--mix", type=parse_mix, default=MIX, help="weights, e.g. text=0.8,photo=0.2,ingest=0"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    load = result["load"]
    if load["server_errors_5xx"] or load["over_request_timeout"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

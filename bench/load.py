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

`--soak-minutes M` then keeps the same load for M minutes and, every `--rss-every` seconds,
samples the server's resident memory by kind from /proc/PID/status (total, RssAnon: heap, malloc
arenas, tensors, what a leak grows; RssFile: mapped files such as LMDB pages, reclaimable;
RssShmem) and, from /metrics, the bytes each in-process cache holds and the corpus size. Per kind
it reports the value at the start, after the first minute and at the end, the growth after the
first minute, and the slope over the last half of the soak in MiB/min (about 0: levelled off),
with the images added and the growth per added image.

`--cache-mib N` serves with all three cache budgets (CAMPSEARCH_IMAGE_CACHE_MIB,
CAMPSEARCH_CAPTION_CACHE_MIB, CAMPSEARCH_FEATURE_CACHE_MIB) at N MiB, so they fill within a soak;
`--malloc-arena-max N` sets MALLOC_ARENA_MAX for the server (glibc's per-thread heaps);
`--heap-trim-interval S` how often it hands freed heap back to the OS (0: never);
`--mmap-threshold-kib N` the size from which its allocations are mapped on their own (0: glibc's
self-raising default).

`--idle-seconds S` then leaves the server idle for S seconds and reads its RSS again (what the
timed heap trim, `--heap-trim-interval`, gives back once the load stops).

`--compare VAR=A,B` runs everything twice, one fresh server each, with the server's environment
variable VAR at A and then at B (nothing else changes; an empty value leaves it unset), and
prints B/A ratios of throughput, latency and memory. VAR is a setting (CAMPSEARCH_*) or, say,
LD_PRELOAD to serve with another allocator.

    python bench/load.py --seconds 60 --json results/load.json
    python bench/load.py --seconds 30 --soak-minutes 10 --cache-mib 64 --json results/soak.json
    python bench/load.py --seconds 30 --soak-minutes 5 --cache-mib 64 \
        --compare CAMPSEARCH_MALLOC_MMAP_THRESHOLD_KIB=64,0 --json results/mmap_ab.json
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
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("SHARED_DIR", REPO_ROOT.parent / "shared"))
DEFAULT_MANIFEST = SHARED_DIR / "data" / "coco-mini" / "manifest.jsonl"
API_KEY = "load-bench-key-0123456789abcdef"
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 30.0  # the server's CAMPSEARCH_REQUEST_TIMEOUT_S for this run
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 30.0  # the client waits longer, to see slow answers
MIX = {"text": 0.7, "photo": 0.2, "ingest": 0.1}  # --mix overrides it
# /proc/PID/status fields (kB) -> the names the soak reports them under (MiB)
RSS_FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
SCRAPE_TIMEOUT_S = 10.0


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


def stop_server(process: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM (the service's graceful shutdown: it saves its indexes), then SIGKILL past
    `timeout_s`. The benches' and the tests' servers alike."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_server(
    workdir: Path,
    port: int,
    redis_url: str | None,
    cache_mib: int | None = None,
    malloc_arena_max: int | None = None,
    heap_trim_interval_s: float | None = None,
    mmap_threshold_kib: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen:
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
    if cache_mib is not None:
        for cache in ("IMAGE", "CAPTION", "FEATURE"):
            env[f"CAMPSEARCH_{cache}_CACHE_MIB"] = str(cache_mib)
    if malloc_arena_max is not None:
        env["MALLOC_ARENA_MAX"] = str(malloc_arena_max)
    if heap_trim_interval_s is not None:
        env["CAMPSEARCH_HEAP_TRIM_INTERVAL_S"] = str(heap_trim_interval_s)
    if mmap_threshold_kib is not None:
        env["CAMPSEARCH_MALLOC_MMAP_THRESHOLD_KIB"] = str(mmap_threshold_kib)
    env.update({name: value for name, value in (extra_env or {}).items() if value})
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


def rss_parts_mib(pid: int) -> dict[str, float]:
    """The server's resident memory (MiB): total `rss` = `anon` + `file` + `shmem`."""
    parts: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in RSS_FIELDS:
            parts[RSS_FIELDS[name]] = round(int(value.split()[0]) / 1024, 1)
    return parts


def rss_mib(pid: int) -> float:
    return rss_parts_mib(pid)["rss"]


async def scrape_memory(client: httpx.AsyncClient) -> dict[str, float]:
    """From /metrics: MiB held by each in-process cache (`cache_<name>`), by the C allocator
    (`heap_in_use`, `heap_free`, `heap_mapped`) and by searches in flight (`search_memory_held`),
    the searches waiting for room (`search_memory_waiting`) and the `images` stored; empty when
    the scrape fails or is slower than SCRAPE_TIMEOUT_S (the load goes on)."""
    try:
        response = await client.get("/metrics", timeout=SCRAPE_TIMEOUT_S)
        response.raise_for_status()
    except httpx.HTTPError:
        return {}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "campsearch_memory_cache_bytes":
                found[f"cache_{sample.labels['cache']}"] = round(sample.value / 2**20, 1)
            elif sample.name == "campsearch_heap_bytes":
                found[f"heap_{sample.labels['state']}"] = round(sample.value / 2**20, 1)
            elif sample.name == "campsearch_search_memory_bytes":
                if sample.labels["state"] == "held":
                    found["search_memory_held"] = round(sample.value / 2**20, 1)
            elif sample.name == "campsearch_search_memory_waiting":
                found["search_memory_waiting"] = int(sample.value)
            elif sample.name == "campsearch_corpus_items" and sample.labels["kind"] == "images":
                found["images"] = int(sample.value)
    return found


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
) -> tuple[Phase, dict]:
    samples: list[dict[str, float]] = []
    started = time.monotonic()

    async with httpx.AsyncClient(base_url=url) as scraper:

        async def take_sample() -> None:
            seconds = round(time.monotonic() - started, 1)
            parts = rss_parts_mib(pid)
            samples.append({"t_s": seconds, **parts, **await scrape_memory(scraper)})

        async def sample_every() -> None:
            while True:
                await take_sample()
                await asyncio.sleep(every_s)

        sampler = asyncio.create_task(sample_every())
        try:
            phase = await run_phase(url, corpus, clients, minutes * 60, "soak", mix)
        finally:
            sampler.cancel()
        await take_sample()
    return phase, memory_growth(samples, minutes * 60)


def memory_growth(samples: list[dict[str, float]], soak_s: float) -> dict:
    """Per sampled kind: start, after 1 min, end, max (overall and in each half), growth after
    1 min and the last half's slope (MiB/min); the images added, and the growth of each RSS part
    per added image."""
    kinds = list(dict.fromkeys(k for sample in samples for k in sample if k != "t_s"))
    growth: dict[str, dict[str, float | None]] = {}
    for kind in kinds:
        series = [(sample["t_s"], sample[kind]) for sample in samples if kind in sample]
        after_minute = next((value for t, value in series if t >= 60), series[0][1])
        growth[kind] = {
            "start": series[0][1],
            "after_1_min": after_minute,
            "end": series[-1][1],
            "max": max(value for _, value in series),
            # in-flight work swings the mapped part by hundreds of MiB from one sample to the
            # next: a bounded series has about the same peak in both halves
            "first_half_max": max((v for t, v in series if t < soak_s / 2), default=None),
            "last_half_max": max((v for t, v in series if t >= soak_s / 2), default=None),
            "growth_after_1_min": round(series[-1][1] - after_minute, 1),
            "last_half_slope_per_min": _slope_per_min(
                [(t, value) for t, value in series if t >= soak_s / 2]
            ),
        }
    images = growth.pop("images", None)
    result: dict = {"samples": samples, "mib": growth}
    if images is not None:
        added_after_minute = images["growth_after_1_min"]
        result["images"] = {
            "start": images["start"],
            "end": images["end"],
            "added": images["end"] - images["start"],
            "added_after_1_min": added_after_minute,
            "last_half_per_min": images["last_half_slope_per_min"],
        }
        result["mib_per_added_image_after_1_min"] = {
            kind: round(growth[kind]["growth_after_1_min"] / added_after_minute, 4)
            for kind in RSS_FIELDS.values()
            if added_after_minute and kind in growth
        }
    # the keys of earlier runs, for comparisons
    result.update(
        rss_after_1_min_mib=growth["rss"]["after_1_min"],
        rss_end_mib=growth["rss"]["end"],
        rss_max_mib=growth["rss"]["max"],
        growth_after_1_min_mib=growth["rss"]["growth_after_1_min"],
    )
    return result


def _slope_per_min(series: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute; None with under 3 points."""
    if len(series) < 3:
        return None
    seconds, values = zip(*series, strict=True)
    return round(statistics.linear_regression([t / 60 for t in seconds], values).slope, 2)


async def main_async(args: argparse.Namespace, extra_env: dict[str, str] | None = None) -> dict:
    corpus, stored = load_corpus(args.manifest, args.photos)
    workdir = Path(tempfile.mkdtemp(prefix="camp-load-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(
        workdir,
        port,
        args.redis_url,
        args.cache_mib,
        args.malloc_arena_max,
        args.heap_trim_interval,
        args.mmap_threshold_kib,
        extra_env,
    )
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
            "server": {
                "request_timeout_s": REQUEST_TIMEOUT_S,
                "photos": args.photos,
                "cache_mib": args.cache_mib,
                "malloc_arena_max": args.malloc_arena_max,
                "heap_trim_interval_s": args.heap_trim_interval,
                "malloc_mmap_threshold_kib": args.mmap_threshold_kib,
                "environment": extra_env or {},
            },
            "mix": args.mix,
            "rss_start_mib": round(rss_start, 1),
            "idle_seconds": args.idle_seconds,
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
        if args.idle_seconds > 0:
            await asyncio.sleep(args.idle_seconds)
            result["rss_after_idle_mib"] = round(rss_mib(process.pid), 1)
        return result
    finally:
        stop_server(process, timeout_s=30)
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
    if "rss_after_idle_mib" in result:
        idle, rss = result["idle_seconds"], result["rss_after_idle_mib"]
        print(f"server RSS after {idle} s idle: {rss} MiB")
    if "soak" in result:
        memory = result["soak"]["rss"]
        print(
            "soak memory (MiB): start, after 1 min, end, growth after 1 min, last-half slope/min,"
            " max in the first half, max in the last half"
        )
        for kind, figures in memory["mib"].items():
            print(
                f"    {kind:22s} {figures['start']} {figures['after_1_min']} {figures['end']} "
                f"{figures['growth_after_1_min']} {figures['last_half_slope_per_min']} "
                f"{figures['first_half_max']} {figures['last_half_max']}"
            )
        if "images" in memory:
            images = memory["images"]
            print(
                f"    images: {images['start']} -> {images['end']} (+{images['added']}, "
                f"{images['last_half_per_min']} /min in the last half); MiB per image added "
                f"after 1 min: {memory['mib_per_added_image_after_1_min']}"
            )


def compare(results: dict[str, dict], name: str) -> dict:
    """B/A ratios of the figures that matter, for two runs that differ in one setting."""
    (a_value, a), (b_value, b) = results.items()

    def figures(result: dict) -> dict[str, float | None]:
        out = {
            "one_client_p50_ms": result["baseline"]["p50_ms"],
            "load_per_s": result["load"]["per_s"],
            "load_p50_ms": result["load"]["p50_ms"],
            "load_p99_ms": result["load"]["p99_ms"],
            "rss_after_load_mib": result["rss_after_load_mib"],
        }
        if "rss_after_idle_mib" in result:
            out["rss_after_idle_mib"] = result["rss_after_idle_mib"]
        if "soak" in result:
            memory = result["soak"]["rss"]["mib"]
            out |= {
                "soak_per_s": result["soak"]["per_s"],
                "soak_p50_ms": result["soak"]["p50_ms"],
                "soak_p99_ms": result["soak"]["p99_ms"],
                "soak_anon_end_mib": memory["anon"]["end"],
                "soak_anon_max_mib": memory["anon"]["max"],
                "soak_anon_first_half_max_mib": memory["anon"]["first_half_max"],
                "soak_anon_last_half_max_mib": memory["anon"]["last_half_max"],
                "soak_anon_last_half_slope_per_min": memory["anon"]["last_half_slope_per_min"],
            }
        return out

    fa, fb = figures(a), figures(b)
    print(f"{name}: {a_value} (A) vs {b_value} (B)")
    ratios = {}
    for key in fa:
        ratio = round(fb[key] / fa[key], 3) if fa[key] and fb[key] is not None else None
        ratios[key] = ratio
        print(f"    {key:36s} A {fa[key]!s:>10s}  B {fb[key]!s:>10s}  B/A {ratio}")
    return {
        "setting": name,
        "a": a_value,
        "b": b_value,
        "figures": {"a": fa, "b": fb},
        "ratios": ratios,
    }


def parse_compare(text: str) -> tuple[str, list[str]]:
    """`CAMPSEARCH_MALLOC_MMAP_THRESHOLD_KIB=64,0` -> (the variable, its two values)."""
    name, _, values = text.partition("=")
    chosen = [value.strip() for value in values.split(",")]
    if not name.strip() or len(chosen) != 2 or chosen[0] == chosen[1]:
        raise argparse.ArgumentTypeError("use VAR=A,B: an environment variable, two values")
    return name.strip(), chosen


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
    parser.add_argument(
        "--idle-seconds", type=float, default=0.0, help="idle time before a last RSS reading"
    )
    parser.add_argument("--redis-url", default=None, help="serve with this Redis cache")
    parser.add_argument(
        "--cache-mib", type=int, default=None, help="all three in-process cache budgets (MiB)"
    )
    parser.add_argument(
        "--malloc-arena-max", type=int, default=None, help="MALLOC_ARENA_MAX for the server"
    )
    parser.add_argument(
        "--heap-trim-interval",
        type=float,
        default=None,
        help="CAMPSEARCH_HEAP_TRIM_INTERVAL_S for the server (0: never trim; default: its own)",
    )
    parser.add_argument(
        "--mmap-threshold-kib",
        type=int,
        default=None,
        help="CAMPSEARCH_MALLOC_MMAP_THRESHOLD_KIB for the server (0: glibc's own; default: "
        "the service's)",
    )
    parser.add_argument(
        "--mix", type=parse_mix, default=MIX, help="weights, e.g. text=0.8,photo=0.2,ingest=0"
    )
    parser.add_argument(
        "--compare",
        type=parse_compare,
        default=None,
        help="VAR=A,B: run twice, the server's environment variable VAR at A, then at B",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.compare is None:
        result = asyncio.run(main_async(args))
        report(result)
        runs = {"": result}
    else:
        name, values = args.compare
        runs = {}
        for value in values:
            print(f"--- {name}={value}", flush=True)
            runs[value] = asyncio.run(main_async(args, {name: value}))
            report(runs[value])
        result = {"runs": runs, "comparison": compare(runs, name)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    phases = [
        phase
        for run in runs.values()
        for phase in (run["load"], *([run["soak"]] if "soak" in run else []))
    ]
    if any(phase["server_errors_5xx"] or phase["over_request_timeout"] for phase in phases):
        sys.exit(1)


if __name__ == "__main__":
    main()

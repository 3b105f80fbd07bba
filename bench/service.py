"""Search latency and throughput of the running service, over HTTP, at several corpus sizes.

For each corpus size N (default 1k, 10k, 100k) a synthetic corpus is written straight into a
data directory (catalog rows, 5 captions per image with real coco-mini texts, random unit
shortlist vectors, random float16 49x1280 region features and the rerank tensors ingest
stores with them, computed by the model), the real app opens it (its
recovery rule builds the FAISS indexes from the store, with the "auto" factory) and uvicorn
serves it on a free port with the shipped default model, in a process of its own (this script
again, `--serve`), as `camp-search serve` runs: the timed clients' threads do not share the
server's interpreter. Then, for text -> images (held-out
coco-mini captions) and image -> captions (by stored image id), with and without the
reranker, K = 100 candidates, limit 10:
  * sequential: one client, `--requests` queries;
  * concurrent: 16 client threads, `--concurrent-requests` queries in all;
and p50/p95/p99 latency (ms) and throughput (queries/s) are printed, with the ratio of the
reranked to the shortlist-only figures, and written as JSON with --json.

Region features: 100k x 49 x 1280 float16 is 12.5 GB, so at most `--stored-regions` images
(default 10,000: the 1k and 10k corpora are fully real) have their own stored record; above
that, image id i reads the stored record of id ((i - 1) mod stored) + 1 (a real LMDB/cache
read of a real 125 KB record; only the page-cache working set is smaller than in a real 100k
corpus). The shortlist (FAISS), catalog and caption index are at full size.

    python bench/service.py --sizes 1000 10000 --json results/service.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn

# This file is named like the `service` package: the repository goes before this folder on
# sys.path (run as a script, the folder comes first and would shadow the package).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE)]
sys.path.append(str(_HERE))  # bench/load.py

from load import free_port, stop_server  # noqa: E402

from index.catalog import CaptionRecord, Catalog, ImageRecord  # noqa: E402
from index.corpus import (  # noqa: E402
    CATALOG_FILE,
    POOLED_KEY,
    STORE_DIR,
    Corpus,
    pooled_namespace,
    regions_namespace,
    rerank_namespace,
)
from index.feature_store import FeatureStore  # noqa: E402
from model.retrieval import RetrievalModel  # noqa: E402
from model.types import RegionFeatures, stored_region_arrays  # noqa: E402
from service.api.app import create_app  # noqa: E402
from service.runtime.lifecycle import build_extractor  # noqa: E402
from service.runtime.settings import Settings  # noqa: E402
from service.search.stored_tensors import (  # noqa: E402
    ImageTensors,
    caption_record,
    image_record,
)

REPO = _HERE.parent
REGIONS, REGION_DIM = 49, 1280
CAPTIONS_PER_IMAGE = 5
CANDIDATES = 100
LIMIT = 10
CONCURRENT_CLIENTS = 16
WRITE_CHUNK = 1_000
SHARED_DIR = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared"))
COCO_MANIFEST = SHARED_DIR / "data" / "coco-mini" / "manifest.jsonl"


class ServerProcess:
    """This script with `--serve`: the real app on a free port, in a process of its own."""

    def __init__(self, args: argparse.Namespace, data_dir: Path) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, __file__, "--serve", str(data_dir), "--port", str(port)]
        command += ["--stored-regions", str(args.stored_regions), "--device", args.device]
        if args.checkpoint is not None:
            command += ["--checkpoint", str(args.checkpoint)]
        self.process = subprocess.Popen(command)

    def start(self, timeout_s: float) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server on {self.url} did not become ready")

    def stop(self) -> None:
        stop_server(self.process, timeout_s=120)


def serve(args: argparse.Namespace) -> None:
    """`--serve DATA_DIR`: open the written corpus with the real app, its aliased ids installed
    first (`aliased_region_features`), and serve it on `--port` until SIGTERM."""
    with aliased_region_features(args.stored_regions):
        settings = bench_settings(args.serve, args.device)
        model = RetrievalModel.load(args.checkpoint, device=args.device)
        extractor = build_extractor(settings, model)
        app = create_app(settings, model=model, extractor=extractor, static_dir=None)
        config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning")
        uvicorn.Server(config).run()


def bench_settings(data_dir: Path, device: str) -> Settings:
    """The service's own defaults (no .env file) over a bench data dir."""
    return Settings(  # type: ignore[call-arg]
        data_dir=data_dir, _env_file=None, device=device, max_candidates=CANDIDATES
    )


def coco_captions() -> list[str]:
    rows = [json.loads(line) for line in COCO_MANIFEST.read_text().splitlines() if line.strip()]
    return [caption for row in rows for caption in row["captions"]]


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write_synthetic_corpus(
    data_dir: Path,
    *,
    images: int,
    stored_regions: int,
    model: RetrievalModel,
    extractor_name: str,
    extractor_version: str,
    captions: list[str],
) -> None:
    """Catalog rows, pooled vectors, region records and the rerank tensors ingest stores with
    them (computed by the model from those records and texts), in large transactions."""
    rng = np.random.default_rng(0)
    tensor_version = model.tensor_version
    texts = model.encode_texts(captions)
    text_records = [caption_record(texts.precompute.select([i])) for i in range(len(captions))]
    catalog = Catalog(data_dir / CATALOG_FILE)
    store = FeatureStore(data_dir / STORE_DIR)
    token_ids = model.tokenize(captions)[0]
    image_ids = catalog.allocate_ids("images", images)
    caption_ids = catalog.allocate_ids("captions", images * CAPTIONS_PER_IMAGE)
    boxes = np.zeros((REGIONS, 4), np.float32)
    grid = int(np.sqrt(REGIONS))
    for r in range(REGIONS):
        x, y = r % grid, r // grid
        boxes[r] = (x / grid, y / grid, (x + 1) / grid, (y + 1) / grid)
    now = time.time()
    for start in range(0, images, WRITE_CHUNK):
        chunk = image_ids[start : start + WRITE_CHUNK]
        image_rows = [
            ImageRecord(
                i, hashlib.sha256(b"synthetic-%d" % i).hexdigest(), "images/x", 640, 480, now
            )
            for i in chunk
        ]
        caption_rows = []
        for offset, image_id in enumerate(chunk):
            for c in range(CAPTIONS_PER_IMAGE):
                cid = caption_ids[(start + offset) * CAPTIONS_PER_IMAGE + c]
                text_index = cid % len(captions)
                caption_rows.append(
                    CaptionRecord(cid, image_id, captions[text_index], token_ids[text_index], now)
                )
        puts: dict[str, dict[int, dict[str, np.ndarray]]] = {
            pooled_namespace("images", model.version): {
                i: {POOLED_KEY: v}
                for i, v in zip(chunk, unit_rows(rng, len(chunk), model.pooled_dim), strict=True)
            },
            pooled_namespace("captions", model.version): {
                r.id: {POOLED_KEY: v}
                for r, v in zip(
                    caption_rows, unit_rows(rng, len(caption_rows), model.pooled_dim), strict=True
                )
            },
        }
        puts[rerank_namespace("captions", tensor_version)] = {
            r.id: text_records[r.id % len(captions)] for r in caption_rows
        }
        with_regions = [i for i in chunk if i <= stored_regions]
        if with_regions:
            features = rng.standard_normal((len(with_regions), REGIONS, REGION_DIM))
            features = features.astype(np.float16)
            puts[regions_namespace(extractor_name, extractor_version)] = {
                i: stored_region_arrays(row, boxes, (640, 480))
                for i, row in zip(with_regions, features, strict=True)
            }
            precompute = model.precompute_images(features)
            puts[rerank_namespace("images", tensor_version)] = {
                i: image_record(ImageTensors(precompute.select([row]), boxes, (640, 480)))
                for row, i in enumerate(with_regions)
            }
        store.write(puts)
        catalog.insert(image_rows, caption_rows)
    store.close()
    catalog.close()


@contextlib.contextmanager
def aliased_region_features(stored: int) -> Iterator[None]:
    """While open, every `Corpus` serves ids above `stored` from the region record and rerank
    tensors of ((id - 1) mod stored) + 1 (see the docstring), and counts them as having both:
    installed before the app opens its corpus, so the start's checks and rebuilds see the
    corpus as a real one of that size (nothing to refuse, no GBs of tensors to rebuild while
    the searches are timed)."""

    def sources(ids) -> dict[int, int]:
        return {int(i): (int(i) - 1) % stored + 1 for i in ids}

    def get_region_features(self, ids) -> dict[int, RegionFeatures]:
        source = sources(ids)
        found = real["get_region_features"](self, sorted(set(source.values())))
        return {i: found[s] for i, s in source.items() if s in found}

    def get_rerank_tensors(self, kind, ids) -> dict[int, dict[str, np.ndarray]]:
        if kind != "images":
            return real["get_rerank_tensors"](self, kind, ids)
        source = sources(ids)
        found = real["get_rerank_tensors"](self, kind, sorted(set(source.values())))
        return {i: found[s] for i, s in source.items() if s in found}

    def ids_without_rerank_tensors(self, kind) -> np.ndarray:
        missing = real["ids_without_rerank_tensors"](self, kind)
        return missing if kind != "images" else missing[missing <= stored]

    def ids_with_region_features(self, ids) -> np.ndarray:
        source = sources(ids)
        found = set(real["ids_with_region_features"](self, sorted(set(source.values()))).tolist())
        return np.asarray(sorted(i for i, s in source.items() if s in found), dtype=np.int64)

    aliases = {
        "get_region_features": get_region_features,
        "get_rerank_tensors": get_rerank_tensors,
        "ids_without_rerank_tensors": ids_without_rerank_tensors,
        "ids_with_region_features": ids_with_region_features,
    }
    real = {name: getattr(Corpus, name) for name in aliases}
    for name, method in aliases.items():
        setattr(Corpus, name, method)
    try:
        yield
    finally:
        for name, method in real.items():
            setattr(Corpus, name, method)


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = np.asarray(samples_ms)
    return {f"p{q}": float(np.percentile(ordered, q)) for q in (50, 95, 99)}


def measure(
    send: Callable[[httpx.Client, int], None], url: str, requests: int, clients: int
) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                started = time.perf_counter()
                send(client, index)
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    latencies.append(elapsed)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(clients)]:
            future.result()
    seconds = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "clients": clients,
        **percentiles(latencies),
        "mean": statistics.fmean(latencies),
        "throughput_qps": len(latencies) / seconds,
    }


def bench_size(args: argparse.Namespace, size: int, model: RetrievalModel, captions: list[str]):
    """Write a corpus of `size` images, serve it (`ServerProcess`, its ids above
    `--stored-regions` aliased) and measure every direction with and without the rerank; in a
    data dir removed afterwards (15 GB at 100k images)."""
    with tempfile.TemporaryDirectory(prefix=f"campsearch-bench-{size}-") as folder:
        data_dir = Path(folder)
        extractor = build_extractor(bench_settings(data_dir, args.device), model)
        started = time.perf_counter()
        write_synthetic_corpus(
            data_dir,
            images=size,
            stored_regions=args.stored_regions,
            model=model,
            extractor_name=extractor.name,
            extractor_version=extractor.version,
            captions=captions,
        )
        build_s = time.perf_counter() - started
        server = ServerProcess(args, data_dir)
        try:
            server.start(timeout_s=1800)
            factories = httpx.get(f"{server.url}/v1/info", timeout=30).json()["index_factories"]
            print(f"\n== N = {size:,} images, {size * CAPTIONS_PER_IMAGE:,} captions "
                  f"(written in {build_s:.0f} s; indexes {factories})")  # fmt: skip
            results = measure_directions(server.url, size, captions, args)
        finally:
            server.stop()
    for direction in ("text->image", "image->caption"):
        for clients in (1, CONCURRENT_CLIENTS):
            pick = {
                r["rerank"]: r
                for r in results
                if r["direction"] == direction and r["clients"] == clients
            }
            slower = pick[True]["p50"] / pick[False]["p50"]
            fewer = pick[False]["throughput_qps"] / pick[True]["throughput_qps"]
            print(
                f"{direction:15s} clients={clients:2d}: reranking costs x{slower:.1f} p50 "
                f"latency and x{fewer:.1f} throughput"
            )
    return results, build_s


def measure_directions(
    url: str, size: int, captions: list[str], args: argparse.Namespace
) -> list[dict]:
    """Text -> images (held-out captions) and image -> captions (stored ids), with and without
    the rerank, one client and 16: a row of figures each."""
    queries = captions[4::5]  # coco-mini's 5th captions
    rng = np.random.default_rng(1)
    image_ids = rng.integers(1, size + 1, size=100_000)
    results = []
    for direction in ("text->image", "image->caption"):
        for rerank in (True, False):

            def send(client: httpx.Client, i: int, direction=direction, rerank=rerank) -> None:
                options = {"limit": LIMIT, "candidates": CANDIDATES, "rerank": rerank}
                if direction == "text->image":
                    body = {"text": queries[i % len(queries)], **options}
                    response = client.post("/v1/search/images", json=body)
                else:
                    body = {"image_id": int(image_ids[i]), **options}
                    response = client.post("/v1/search/captions", json=body)
                response.raise_for_status()

            measure(send, url, 4, 1)  # warm-up
            for clients, requests in ((1, args.requests), (16, args.concurrent_requests)):
                row = {"size": size, "direction": direction, "rerank": rerank}
                row.update(measure(send, url, requests, clients))
                results.append(row)
                print(
                    f"{direction:15s} rerank={rerank!s:5s} clients={clients:2d}  "
                    f"p50 {row['p50']:8.1f}  p95 {row['p95']:8.1f}  p99 {row['p99']:8.1f} ms  "
                    f"{row['throughput_qps']:7.2f} q/s"
                )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--requests", type=int, default=40, help="sequential queries per cell")
    parser.add_argument("--concurrent-requests", type=int, default=96, help="queries, 16 clients")
    parser.add_argument("--stored-regions", type=int, default=10_000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # ServerProcess's child
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args)
        return

    model = RetrievalModel.load(args.checkpoint, device=args.device)
    server_threads = bench_settings(REPO, args.device).threads_per_torch_call  # the service's own
    device = str(model.device)
    gpu = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else None
    print(f"model {model.version} on {device}{f' ({gpu})' if gpu else ''}, "
          f"server torch threads {server_threads}, K={CANDIDATES}, limit={LIMIT}")  # fmt: skip
    captions = coco_captions()
    all_rows, builds = [], {}
    for size in args.sizes:
        rows, build_s = bench_size(args, size, model, captions)
        all_rows.extend(rows)
        builds[size] = build_s
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "model": model.version,
                    "device": device,
                    "gpu": gpu,
                    "server_torch_threads": server_threads,
                    "candidates": CANDIDATES,
                    "limit": LIMIT,
                    "stored_regions": args.stored_regions,
                    "build_seconds": builds,
                    "results": all_rows,
                },
                indent=2,
            )
        )
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

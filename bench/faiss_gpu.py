"""FAISS shortlist on the GPU against the CPU, in one run, through `ShortlistIndex`.

For each factory family `auto` picks (Flat below 50k, IVF<n>,Flat up to 5M, IVF<n>_HNSW32,PQ<m>
beyond; here all three at `--vectors`, with the IVF list count `auto` gives that size), it builds
one CPU index, searches batches of 1 / 16 / 128 queries at k=100 on the CPU and on a GPU copy of
the same index, and prints the GPU/CPU speed-up. It also times what a write costs the GPU copy:
1,000 vectors added incrementally against a full re-copy. The dimension is the shipped model's
pooled dimension (read from model/weights/default.pt) unless `--dim` says otherwise.

A second part answers how a CPU service should take concurrent single-query searches: each in
its own thread straight into FAISS (concurrent reads), or through the shortlist micro-batcher
(one thread, queries that arrive together searched as one batch), with `--clients` callers.

Without a GPU (faiss-cpu, or no device) the GPU half is not run and the output says so.

    python bench/faiss_gpu.py --vectors 1000000 --json results/faiss_gpu.json
    python bench/faiss_gpu.py --vectors 20000 --json /tmp/faiss_gpu_smoke.json   # CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np

# bench/service.py is named like the `service` package: drop this folder from sys.path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from index.device import FaissGpu, faiss_gpu_count  # noqa: E402
from index.shortlist import (  # noqa: E402
    FLAT,
    PQ_MIN_VECTORS,
    ShortlistIndex,
    choose_factory,
    l2_normalised,
)
from service.search.batching import MicroBatcher  # noqa: E402

K = 100
BATCH_SIZES = (1, 16, 128)
INCREMENTAL_ADDS = 1_000
CLUSTERS = 4_096
CLUSTER_SPREAD = 0.6
CHUNK = 100_000


def clustered(count: int, dim: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors around random centres (embeddings cluster; uniform noise has no neighbours)."""
    parts = []
    for start in range(0, count, CHUNK):
        size = min(CHUNK, count - start)
        noise = rng.standard_normal((size, dim), dtype=np.float32) * (
            CLUSTER_SPREAD / math.sqrt(dim)
        )
        parts.append(l2_normalised(centres[rng.integers(0, len(centres), size)] + noise, dim))
    return np.concatenate(parts)


def factories(vectors: int, dim: int) -> list[str]:
    """The three shapes `choose_factory` picks, sized for `vectors` (IVF lists as auto)."""
    ivf = choose_factory(max(vectors, 50_000), dim)
    large = choose_factory(PQ_MIN_VECTORS, dim)
    nlist = ivf.split(",")[0]
    return [FLAT, ivf, f"{nlist}_HNSW32,{large.split(',')[1]}"]


def time_batches(index: ShortlistIndex, queries: np.ndarray, batch: int, repeats: int) -> dict:
    """Median milliseconds per batch of `batch` queries, and queries per second."""
    index.search(queries[:batch], K)  # warm-up (and the device copy, done before timing)
    times = []
    for round_ in range(repeats):
        start = (round_ * batch) % max(len(queries) - batch, 1)
        started = time.perf_counter()
        index.search(queries[start : start + batch], K)
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {"ms_per_batch": round(median * 1000, 3), "queries_per_s": round(batch / median, 1)}


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / K for x, y in zip(a, b, strict=True)]))


def bench_factory(
    factory: str, data: np.ndarray, queries: np.ndarray, extra: np.ndarray, gpu: int | None, args
) -> tuple[dict[str, Any], ShortlistIndex]:
    dim = data.shape[1]
    index = ShortlistIndex(dim, factory, nprobe=args.nprobe)
    started = time.perf_counter()
    index.add(np.arange(len(data)), data)
    result: dict[str, Any] = {
        "build_s": round(time.perf_counter() - started, 2),
        "trained": index.is_trained,  # False: too few vectors to train, still the exact buffer
    }
    result["cpu"] = {
        f"batch_{b}": time_batches(index, queries, b, args.repeats) for b in BATCH_SIZES
    }
    cpu_ids = index.search(queries[:128], K)[1]
    print(f"  {factory}: built in {result['build_s']} s; CPU {_row(result['cpu'])}")
    if gpu is None:
        return result, index
    on_gpu = _gpu_twin(index, gpu, args)
    started = time.perf_counter()
    on_gpu.search(queries[:1], K)  # the first search makes the copy
    copy_s = time.perf_counter() - started
    result["gpu"] = {
        f"batch_{b}": time_batches(on_gpu, queries, b, args.repeats) for b in BATCH_SIZES
    }
    result["gpu"]["device"] = on_gpu.device
    result["gpu"]["copy_s"] = round(copy_s, 3)
    result["gpu"]["overlap_with_cpu_at_100"] = round(
        overlap(cpu_ids, on_gpu.search(queries[:128], K)[1]), 4
    )
    new_ids = np.arange(len(data), len(data) + INCREMENTAL_ADDS)
    started = time.perf_counter()
    on_gpu.add(new_ids, extra)
    on_gpu.search(queries[:1], K)  # applies the adds to the copy
    incremental_s = time.perf_counter() - started
    assert on_gpu.device_stats.full_copies == 1, "an add must not re-copy the index"
    result["gpu"]["incremental_add_ms"] = round(incremental_s * 1000, 2)
    result["gpu"]["full_copy_ms"] = round(copy_s * 1000, 2)
    result["speedup_gpu_over_cpu"] = {
        f"batch_{b}": round(
            result["gpu"][f"batch_{b}"]["queries_per_s"]
            / result["cpu"][f"batch_{b}"]["queries_per_s"],
            2,
        )
        for b in BATCH_SIZES
    }
    print(
        f"  {factory}: GPU {_row(result['gpu'])}; speed-up {result['speedup_gpu_over_cpu']}; "
        f"copy {copy_s:.2f} s, {INCREMENTAL_ADDS} adds {incremental_s * 1000:.1f} ms"
    )
    del on_gpu
    return result, index


def _gpu_twin(index: ShortlistIndex, gpu: int, args) -> ShortlistIndex:
    """The same trained index (saved and loaded back, as the service does) on GPU `gpu`."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "index.faiss"
        index.save(path)
        twin, _ = ShortlistIndex.load(path, nprobe=args.nprobe, device=FaissGpu(gpu))
    return twin


def _row(timings: dict) -> str:
    return ", ".join(f"{b}q {timings[f'batch_{b}']['ms_per_batch']:.2f} ms" for b in BATCH_SIZES)


def bench_cpu_serving(
    index: ShortlistIndex, queries: np.ndarray, clients: int, per_client: int
) -> dict:
    """`clients` callers each searching `per_client` single queries: straight into FAISS from
    their own threads, against through one micro-batcher thread (no wait: only what queued)."""

    def direct() -> list[float]:
        latencies: list[float] = []
        lock = threading.Lock()

        def caller(offset: int) -> None:
            for n in range(per_client):
                started = time.perf_counter()
                index.search(queries[(offset + n) % len(queries)][None], K)
                with lock:
                    latencies.append(time.perf_counter() - started)

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(caller, range(0, clients * per_client, per_client)))
        return latencies

    async def batched() -> list[float]:
        batcher = MicroBatcher(
            lambda jobs: index.search_batch(jobs), max_batch_size=128, max_wait_s=0.0, name="bench"
        )
        await batcher.start()
        latencies: list[float] = []

        async def caller(offset: int) -> None:
            for n in range(per_client):
                started = time.perf_counter()
                await batcher.submit((queries[(offset + n) % len(queries)][None], K))
                latencies.append(time.perf_counter() - started)

        try:
            await asyncio.gather(*(caller(o) for o in range(0, clients * per_client, per_client)))
        finally:
            await batcher.stop()
        return latencies

    result = {}
    for name, run in (
        ("direct_threads", direct),
        ("micro_batcher", lambda: asyncio.run(batched())),
    ):
        started = time.perf_counter()
        latencies = run()
        wall = time.perf_counter() - started
        result[name] = {
            "queries_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 3),
            "p95_ms": round(float(np.percentile(latencies, 95)) * 1000, 3),
        }
    result["throughput_ratio_batcher_over_direct"] = round(
        result["micro_batcher"]["queries_per_s"] / result["direct_threads"]["queries_per_s"], 2
    )
    return result


def shipped_pooled_dim() -> int:
    from model.retrieval import RetrievalModel

    return RetrievalModel.load(device="cpu").pooled_dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=None, help="default: the shipped model's")
    parser.add_argument("--queries", type=int, default=1_024)
    parser.add_argument("--repeats", type=int, default=20, help="timed batches per batch size")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--factories", default=None, help="comma-separated; default: auto's three")
    parser.add_argument("--clients", type=int, default=8, help="concurrent callers (CPU part)")
    parser.add_argument("--per-client", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dim = args.dim or shipped_pooled_dim()
    gpus = faiss_gpu_count()
    gpu = 0 if gpus > 0 else None
    chosen = args.factories.split(",") if args.factories else factories(args.vectors, dim)
    print(
        f"faiss {faiss.__version__}, {args.vectors} vectors x {dim} dims, k={K}, "
        f"{faiss.omp_get_max_threads()} CPU threads, "
        + (f"GPU {gpu} (of {gpus})" if gpu is not None else "no GPU: the GPU half is NOT run")
    )
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((min(CLUSTERS, args.vectors), dim)).astype(np.float32)
    data = clustered(args.vectors, dim, centres, rng)
    queries = clustered(args.queries, dim, centres, rng)
    extra = clustered(INCREMENTAL_ADDS, dim, centres, rng)
    report: dict[str, Any] = {
        "faiss_version": faiss.__version__,
        "vectors": args.vectors,
        "dim": dim,
        "k": K,
        "nprobe": args.nprobe,
        "cpu_threads": faiss.omp_get_max_threads(),
        "gpu": {"ran": gpu is not None, "device": f"cuda:{gpu}" if gpu is not None else None},
        "factories": {},
    }
    if gpu is None:
        report["gpu"]["note"] = "the installed faiss sees no GPU: only the CPU half ran"
    serving_factory = choose_factory(args.vectors, dim)
    serving_index = None
    for factory in chosen:
        result, index = bench_factory(factory, data, queries, extra, gpu, args)
        report["factories"][factory] = result
        if factory == serving_factory:
            serving_index = index
        del index
    if serving_index is None:
        serving_index = ShortlistIndex(dim, serving_factory, nprobe=args.nprobe)
        serving_index.add(np.arange(len(data)), data)
    report["cpu_serving"] = {
        "factory": serving_factory,
        "clients": args.clients,
        **bench_cpu_serving(serving_index, queries, args.clients, args.per_client),
    }
    print(f"  CPU serving ({serving_factory}, {args.clients} clients): {report['cpu_serving']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Shortlist latency and recall: flat vs IVF vs HNSW at several corpus sizes, in one run.

Data: 256-d unit vectors drawn around random cluster centres (embeddings cluster; uniform
noise in 256-d has no neighbours worth finding). Queries are held-out draws from the same
distribution. Recall@100 is measured against exact (flat) search; latency is per single query
after a warm-up, as the service issues them.

    python bench/shortlist.py --sizes 10000,100000,1000000 --json results/shortlist.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import faiss
import numpy as np

from index.shortlist import FLAT, ShortlistIndex, l2_normalised

DIM = 256
K = 100
POINTS_PER_CLUSTER = 200
CLUSTER_SPREAD = 0.6
WARMUP_QUERIES = 20


def clustered_vectors(count: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    chosen = centres[rng.integers(0, len(centres), count)]
    noise = rng.standard_normal((count, DIM), dtype=np.float32) * (CLUSTER_SPREAD / math.sqrt(DIM))
    return l2_normalised(chosen + noise, DIM)


def approximate_factories(size: int) -> dict[str, tuple[str, dict[str, int]]]:
    # ~4·sqrt(n) lists (as choose_factory), but never more than the data can train (39 each).
    nlist = min(2 ** round(math.log2(4 * math.sqrt(size))), 2 ** int(math.log2(size / 39)))
    return {
        f"ivf{nlist}": (f"IVF{nlist},Flat", {"nprobe": max(16, nlist // 64)}),
        "hnsw32": ("HNSW32", {"ef_search": 256}),
    }


def time_queries(index: ShortlistIndex, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    for query in queries[:WARMUP_QUERIES]:
        index.search(query[None], K)
    latencies = []
    found = []
    for query in queries:
        started = time.perf_counter()
        _, ids = index.search(query[None], K)
        latencies.append((time.perf_counter() - started) * 1000)
        found.append(ids[0])
    return np.asarray(latencies), np.stack(found)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="FAISS/OpenMP threads while querying (building uses all cores). 1 = one query "
        "per core, as API workers issue them; more only add fork/join overhead to one query.",
    )
    args = parser.parse_args()
    build_threads = faiss.omp_get_max_threads()
    results: dict[str, dict[str, dict[str, float]]] = {}
    print(
        f"faiss {faiss.__version__}, build threads {build_threads}, query threads "
        f"{args.threads}, dim {DIM}, k {K}, {args.queries} single queries after warm-up"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        rng = np.random.default_rng(args.seed)
        centres = rng.standard_normal((max(size // POINTS_PER_CLUSTER, 1), DIM)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        data = clustered_vectors(size, centres, rng)
        queries = clustered_vectors(args.queries, centres, rng)
        ids = np.arange(size, dtype=np.int64)

        flat = ShortlistIndex(DIM, FLAT)
        flat.add(ids, data)
        _, truth = flat.search(queries, K)  # batched exact ground truth
        runs = {"flat": (flat, 0.0)}
        for name, (factory, params) in approximate_factories(size).items():
            started = time.perf_counter()
            index = ShortlistIndex(DIM, factory, **params)
            index.add(ids, data)
            runs[name] = (index, time.perf_counter() - started)
        faiss.omp_set_num_threads(args.threads)
        flat_p50 = None
        for name, (index, build_s) in runs.items():
            latencies, found = time_queries(index, queries)
            row = {
                "p50_ms": float(np.percentile(latencies, 50)),
                "p99_ms": float(np.percentile(latencies, 99)),
                "recall_at_100": recall_at_k(found, truth),
                "build_s": build_s,
            }
            results.setdefault(name, {})[str(size)] = row
            flat_p50 = flat_p50 or row["p50_ms"]
            print(
                f"{size:>9,} {name:<10} {index.factory:<14} p50 {row['p50_ms']:8.3f} ms  "
                f"p99 {row['p99_ms']:8.3f} ms  recall@100 {row['recall_at_100']:.4f}  "
                f"{flat_p50 / row['p50_ms']:6.1f}x faster than flat  build {build_s:6.1f}s",
                flush=True,
            )
        faiss.omp_set_num_threads(build_threads)
        del runs, flat, data
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Figures for the README's capacity plan, measured on this machine in one run.

1. Shortlist memory: the service's own `ShortlistIndex` (FAISS behind an id map, plus its id
   set) built per index type at two sizes on clustered unit vectors of the model's pooled
   width. Bytes per vector = the growth of this process's resident memory (after giving freed
   heap back to the OS) between the two sizes, divided by the extra vectors: what one more
   vector costs a replica. The saved file's bytes per vector are printed beside it; single-query
   latency (one thread) too.
2. PostgreSQL: bytes per stored record in a `bytea` column (TOAST, its index, the heap row)
   for the record sizes the README measured (region features 126,289 B, a photo's rerank
   tensors 73,299 B, a 12-word caption's 16,086 B, a pooled vector 542 B), filled with float16
   normal noise like the real records (`pg_total_relation_size` / rows). Needs a server:
   `--database-url` (a scratch table is created and dropped).
3. Redis: `used_memory` growth per cached record of the same sizes, keys as the cache names
   them, in a fresh `redis-server` started here.

Then the plan: for 10M and 100M photos (5 captions each, as COCO) it multiplies these measured
unit costs out. Every printed number says whether it is measured or derived.

    python bench/capacity.py --database-url postgresql://postgres@127.0.0.1:5432/postgres \
        --json bench/results/capacity.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

# bench/service.py is named like the `service` package: run as a script, this folder is first
# on sys.path and would shadow the package.
BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]

from index.shortlist import FLAT, ShortlistIndex, l2_normalised  # noqa: E402
from service.runtime.heap import trim_heap  # noqa: E402

DIM = 128  # the shipped model's pooled width (model/configs/train_default_cpu.json)
K = 100
QUERIES = 200
CAPTIONS_PER_PHOTO = 5
CAPTION_WORDS = 12
# Record sizes measured earlier (README, "Disk per item"): codec header included.
RECORD_BYTES = {
    "regions (photo)": 126_289,
    "rerank tensors (photo)": 73_299,
    f"rerank tensors (caption, {CAPTION_WORDS} words)": 1_280 * CAPTION_WORDS
    + 4 * CAPTION_WORDS**2
    + 150,
    "pooled vector": 4 * DIM + 30,
}
PLAN_PHOTOS = (10_000_000, 100_000_000)
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    gc.collect()
    trim_heap()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


def clustered(count: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.standard_normal((max(count // 200, 1), DIM)).astype(np.float32)
    chosen = centres[rng.integers(0, len(centres), count)]
    noise = rng.standard_normal((count, DIM), dtype=np.float32) * (0.6 / math.sqrt(DIM))
    return l2_normalised(chosen + noise, DIM)


def factories(size: int) -> dict[str, tuple[str, dict[str, int]]]:
    """The index types `choose_factory` picks between, sized for `size` vectors."""
    nlist = min(2 ** round(math.log2(4 * math.sqrt(size))), 2 ** int(math.log2(size / 39)))
    return {
        "Flat": (FLAT, {}),
        "IVF,Flat": (f"IVF{nlist},Flat", {"nprobe": 32}),
        "HNSW32": ("HNSW32", {"ef_search": 128}),
        "IVF_HNSW32,PQ16": (f"IVF{nlist}_HNSW32,PQ{DIM // 8}", {"nprobe": 32}),
    }


def measure_index(kind: str, size: int, data: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    factory, params = factories(size)[kind]
    before = resident_bytes()
    index = ShortlistIndex(DIM, factory, **params)
    started = time.perf_counter()
    index.add(np.arange(size, dtype=np.int64), data[:size])
    build_s = time.perf_counter() - started
    held = resident_bytes() - before
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "index.faiss"
        index.save(path)
        file_bytes = path.stat().st_size
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    for query in queries[:20]:
        index.search(query[None], K)
    latencies = []
    for query in queries:
        started_query = time.perf_counter()
        index.search(query[None], K)
        latencies.append((time.perf_counter() - started_query) * 1000)
    faiss.omp_set_num_threads(threads)
    del index
    return {
        "factory": factory,
        "resident_bytes": held,
        "file_bytes": file_bytes,
        "build_s": build_s,
        "p50_ms": float(np.percentile(latencies, 50)),
    }


def shortlist_figures(sizes: list[int]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    data = clustered(max(sizes), rng)
    queries = clustered(QUERIES, rng)
    figures: dict[str, Any] = {}
    for kind in factories(max(sizes)):
        rows = {size: measure_index(kind, size, data, queries) for size in sizes}
        small, large = rows[min(sizes)], rows[max(sizes)]
        extra = max(sizes) - min(sizes)
        figures[kind] = {
            "by_size": {str(size): row for size, row in rows.items()},
            "resident_bytes_per_vector": (large["resident_bytes"] - small["resident_bytes"])
            / extra,
            "file_bytes_per_vector": (large["file_bytes"] - small["file_bytes"]) / extra,
            "p50_ms_at_largest": large["p50_ms"],
        }
        resident, in_file = (
            figures[kind]["resident_bytes_per_vector"],
            figures[kind]["file_bytes_per_vector"],
        )
        print(
            f"  {kind:<16} {large['factory']:<22} measured {resident:7.1f} "
            f"B/vector resident ({in_file:6.1f} in the file), "
            f"p50 {large['p50_ms']:.3f} ms at {max(sizes):,}",
            flush=True,
        )
    return figures


def float16_noise(nbytes: int, rng: np.random.Generator) -> bytes:
    values = rng.standard_normal(nbytes // 2 + 1).astype(np.float16).tobytes()
    return values[:nbytes]


def postgres_figures(url: str, rows: int) -> dict[str, float]:
    import psycopg

    rng = np.random.default_rng(1)
    figures = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for name, nbytes in RECORD_BYTES.items():
            table = "campsearch_capacity_probe"
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, record bytea NOT NULL)")
            try:
                with conn.cursor() as cursor:
                    cursor.executemany(
                        f"INSERT INTO {table} VALUES (%s, %s)",
                        [(i, float16_noise(nbytes, rng)) for i in range(rows)],
                    )
                conn.execute(f"VACUUM ANALYZE {table}")
                (total,) = conn.execute(f"SELECT pg_total_relation_size('{table}')").fetchone()
            finally:
                conn.execute(f"DROP TABLE IF EXISTS {table}")
            figures[name] = total / rows
            print(
                f"  {name:<36} {nbytes:>9,} B of record -> measured {total / rows:>11,.0f} B "
                f"in PostgreSQL ({total / rows / nbytes:.3f}x)",
                flush=True,
            )
    return figures


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_figures(binary: str, rows: int) -> dict[str, float]:
    import redis

    rng = np.random.default_rng(2)
    port = free_port()
    folder = tempfile.mkdtemp(prefix="campsearch-redis-")
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", folder],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    figures = {}
    try:
        client = redis.Redis(port=port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        for name, nbytes in RECORD_BYTES.items():
            client.flushall()
            before = int(client.info("memory")["used_memory"])
            with client.pipeline(transaction=False) as pipe:
                for i in range(rows):
                    key = f"campsearch:grid:0123456789abcdef:{10_000_000 + i}"
                    pipe.set(key, float16_noise(nbytes, rng), ex=604_800)
                pipe.execute()
            used = int(client.info("memory")["used_memory"]) - before
            figures[name] = used / rows
            print(
                f"  {name:<36} {nbytes:>9,} B of record -> measured {used / rows:>11,.0f} B "
                f"in Redis ({used / rows / nbytes:.3f}x)",
                flush=True,
            )
        client.close()
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)
    return figures


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f} GiB"


def plan(shortlist: dict[str, Any], database: dict[str, float] | None, cache: dict[str, float]):
    """The derived plan: measured unit costs times the corpus."""
    caption_record = f"rerank tensors (caption, {CAPTION_WORDS} words)"
    out: dict[str, Any] = {}
    for photos in PLAN_PHOTOS:
        captions = photos * CAPTIONS_PER_PHOTO
        entry: dict[str, Any] = {"photos": photos, "captions": captions}
        print(f"\n{photos:,} photos, {captions:,} captions (derived from the measured figures)")
        entry["shortlist_bytes_per_replica"] = {}
        for kind, figure in shortlist.items():
            held = figure["resident_bytes_per_vector"] * (photos + captions)
            entry["shortlist_bytes_per_replica"][kind] = held
            print(f"  shortlist, both indexes, {kind:<16} {gib(held):>12} per replica")
        if database:
            per_photo = (
                database["regions (photo)"]
                + database["rerank tensors (photo)"]
                + database["pooled vector"]
            )
            per_caption = database[caption_record] + database["pooled vector"]
            total = photos * per_photo + captions * per_caption
            without_regions = total - photos * database["regions (photo)"]
            entry["database_bytes"] = total
            entry["database_bytes_without_region_features"] = without_regions
            print(
                f"  PostgreSQL records {gib(total):>12} ({gib(without_regions)} with "
                "CAMPSEARCH_KEEP_REGION_FEATURES=false)"
            )
        # What searches read per candidate: the rerank tensors (region features only when a
        # photo's tensors are missing, e.g. during a rebuild).
        tensors = photos * cache["rerank tensors (photo)"] + captions * cache[caption_record]
        everything = tensors + photos * cache["regions (photo)"]
        entry["redis_bytes_rerank_tensors"] = tensors
        entry["redis_bytes_all"] = everything
        print(
            f"  Redis, every rerank tensor {gib(tensors):>12}; 5% of them {gib(tensors / 20)}; "
            f"with region features {gib(everything)}"
        )
        out[str(photos)] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,100000", help="two or more index sizes")
    parser.add_argument("--database-url", default=os.environ.get("CAMPSEARCH_BENCH_DATABASE_URL"))
    parser.add_argument("--records", type=int, default=400, help="rows per record size")
    parser.add_argument("--redis-server", default=shutil.which("redis-server"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--plan-from", type=Path, default=None, help="print the plan from an earlier --json"
    )
    args = parser.parse_args()
    if args.plan_from:
        measured = json.loads(args.plan_from.read_text())["measured"]
        plan(measured["shortlist"], measured["postgres"], measured["redis"])
        return
    sizes = sorted(int(size) for size in args.sizes.split(","))
    print(f"faiss {faiss.__version__}, dim {DIM}, sizes {sizes}, k {K}")
    print("shortlist (measured):")
    shortlist = shortlist_figures(sizes)
    database = None
    if args.database_url:
        print("PostgreSQL (measured):")
        database = postgres_figures(args.database_url, args.records)
    else:
        print("PostgreSQL: skipped (no --database-url)")
    if not args.redis_server:
        raise SystemExit("redis-server not found: pass --redis-server")
    print("Redis (measured):")
    cache = redis_figures(args.redis_server, args.records)
    derived = plan(shortlist, database, cache)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "measured": {"shortlist": shortlist, "postgres": database, "redis": cache},
            "record_bytes": RECORD_BYTES,
            "derived_plan": derived,
            "dim": DIM,
            "captions_per_photo": CAPTIONS_PER_PHOTO,
        }
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

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

4. Search compute (`--search-compute-only` runs just this part): FLOPs of one search at the
   shipped model, counted by torch.utils.flop_counter (matrix products, two per multiply-add):
   encoding a ~12-word query and scoring K = 100 candidate pairs; both timed on one CPU thread
   against that thread's measured fp32 GEMM peak, which gives the fraction of peak the code
   achieves (median of repeats).

Then the plan: for 10M and 100M photos (5 captions each, as COCO) it multiplies these measured
unit costs out; GPUs per 1,000 searches/s = 1,000 x FLOPs per search / (a GPU's datasheet peak
x the CPU's achieved fraction, ASSUMED to carry over), beside the memory-bandwidth bound of
reading the K candidates' stored tensors. No GPU was measured: `bench/gpu_check.sh` measures
reranked pairs/s on a GPU host. Every printed number says whether it is measured, derived or
assumed.

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

# The shipped model's shortlist width: default-v3's 128-d pooled heads plus its 384-d zero-shot
# channel (model/zeroshot.py), 512-d vectors in FAISS.
DIM = 512
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
SEARCHES_PER_S = 1_000
QUERY = "a man riding a wave on top of a surfboard in the ocean"  # 12 words, 16 tokens
REGIONS = 49  # 7 x 7 grid of the shipped extractor
# NVIDIA H100 SXM datasheet figures (assumed, not measured here). The reranker runs in fp32 and
# PyTorch leaves TF32 off for matmuls (torch.backends.cuda.matmul.allow_tf32 = False), so fp32
# matmuls run on the FP32 units: FP32 is the peak used; TF32 is shown for what enabling it
# (or bf16) could buy.
GPU_NAME = "H100 SXM"
GPU_FP32_TFLOPS = 67.0
GPU_TF32_DENSE_TFLOPS = 495.0
GPU_HBM_GBPS = 3_350.0  # HBM3
PCIE_GBPS = 64.0  # PCIe Gen5 x16, one direction
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
        f"IVF_HNSW32,PQ{DIM // 8}": (f"IVF{nlist}_HNSW32,PQ{DIM // 8}", {"nprobe": 32}),
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


def search_compute_figures(threads: int, repeats: int) -> dict[str, Any]:
    """FLOPs (counted) and one-thread CPU time (measured) of encoding a query and scoring K
    pairs with the shipped model; the fraction of the measured GEMM peak they achieve."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.timing import GEMM_SIZE, interleaved
    from model.retrieval import RetrievalModel

    torch.set_num_threads(threads)
    model = RetrievalModel.load(device="cpu")
    rng = np.random.default_rng(3)
    images = model.precompute_images(rng.random((K, REGIONS, model.region_dim), dtype=np.float32))
    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            caption = model.encode_texts([QUERY]).precompute
        encode_flops = counter.get_total_flops()
        captions = caption.repeat(K)
        with FlopCounterMode(display=False) as counter:
            model.scorer.score_pairs(images, captions, trim=False)
        pair_flops = counter.get_total_flops() / K
        # Interleaved with the GEMM that measures the peak: load from other jobs on a shared
        # machine hits the peak and the work alike.
        seconds, _ = interleaved(
            {
                "gemm": lambda: torch.matmul(a, b),
                "encode": lambda: model.encode_texts([QUERY]),
                "pairs": lambda: model.scorer.score_pairs(images, captions, trim=False),
            },
            repeats,
        )
    gemm_s, encode_s, pairs_s = (float(np.median(seconds[way])) for way in seconds)
    peak_gflops = 2 * GEMM_SIZE**3 / gemm_s / 1e9
    figures = {
        "threads": threads,
        "cpu_gemm_peak_gflops": peak_gflops,
        "query_tokens": int(caption.lengths[0]),
        "encode_flops": encode_flops,
        "encode_ms": 1e3 * encode_s,
        "encode_achieved_fraction": encode_flops / encode_s / (peak_gflops * 1e9),
        "pair_flops": pair_flops,
        "k": K,
        "pairs_ms": 1e3 * pairs_s,
        "pairs_achieved_fraction": pair_flops * K / pairs_s / (peak_gflops * 1e9),
        "load_average": list(os.getloadavg()),
    }
    print(
        f"  CPU fp32 GEMM peak, {threads} thread(s): measured {peak_gflops:.1f} GFLOP/s\n"
        f"  query encoding ({figures['query_tokens']} tokens): counted "
        f"{encode_flops / 1e6:.0f} MFLOP, measured {figures['encode_ms']:.2f} ms = "
        f"{figures['encode_achieved_fraction']:.2f} of peak\n"
        f"  one reranked pair: counted {pair_flops / 1e6:.2f} MFLOP; K = {K} pairs measured "
        f"{figures['pairs_ms']:.2f} ms = {figures['pairs_achieved_fraction']:.2f} of peak",
        flush=True,
    )
    return figures


def gpu_plan(compute: dict[str, Any], candidate_bytes: float) -> dict[str, Any]:
    """GPUs per SEARCHES_PER_S searches/s, derived from the measured compute figures and the
    GPU's datasheet peak, with the CPU's achieved fractions assumed to carry over."""
    encode = compute["encode_flops"]
    rerank = compute["pair_flops"] * compute["k"]
    peak = GPU_FP32_TFLOPS * 1e12
    encode_gpus = SEARCHES_PER_S * encode / (peak * compute["encode_achieved_fraction"])
    rerank_gpus = SEARCHES_PER_S * rerank / (peak * compute["pairs_achieved_fraction"])
    tensor_bytes = SEARCHES_PER_S * compute["k"] * candidate_bytes
    hbm_gpus = tensor_bytes / (GPU_HBM_GBPS * 1e9)
    pcie_gpus = tensor_bytes / (PCIE_GBPS * 1e9)
    gpus = max(encode_gpus + rerank_gpus, hbm_gpus, pcie_gpus)
    plan = {
        "gpu": GPU_NAME,
        "assumed_gpu_fp32_tflops": GPU_FP32_TFLOPS,
        "assumed_gpu_tf32_dense_tflops": GPU_TF32_DENSE_TFLOPS,
        "assumed_hbm_gbps": GPU_HBM_GBPS,
        "assumed_pcie_gbps": PCIE_GBPS,
        "assumed_achieved_fractions": "the CPU's measured ones (encode, pairs)",
        "flops_per_search": encode + rerank,
        "encode_gpus": encode_gpus,
        "rerank_gpus": rerank_gpus,
        "tensor_bytes_per_s": tensor_bytes,
        "hbm_bound_gpus": hbm_gpus,
        "pcie_bound_gpus": pcie_gpus,
        "gpus_per_1000_searches_s": gpus,
        "gpus_per_1000_searches_s_tf32": SEARCHES_PER_S
        * (
            encode / compute["encode_achieved_fraction"]
            + rerank / compute["pairs_achieved_fraction"]
        )
        / (GPU_TF32_DENSE_TFLOPS * 1e12),
    }
    print(
        f"\nGPUs per {SEARCHES_PER_S:,} searches/s (any corpus size: K = {compute['k']} "
        "candidates a search)\n"
        f"  FLOPs per search: derived {(encode + rerank) / 1e9:.3f} GFLOP (measured counts: "
        f"encode {encode / 1e6:.0f} M + {compute['k']} x {compute['pair_flops'] / 1e6:.2f} M)\n"
        f"  {GPU_NAME} peak: assumed {GPU_FP32_TFLOPS:g} TFLOP/s fp32 (datasheet; the reranker "
        f"runs fp32, TF32 off), achieved fraction: assumed = the CPU's measured "
        f"{compute['encode_achieved_fraction']:.2f} (encode) / "
        f"{compute['pairs_achieved_fraction']:.2f} (pairs)\n"
        f"  compute: derived {encode_gpus:.4f} (encode) + {rerank_gpus:.4f} (rerank) = "
        f"{encode_gpus + rerank_gpus:.4f} GPUs ({plan['gpus_per_1000_searches_s_tf32']:.4f} "
        f"at the assumed {GPU_TF32_DENSE_TFLOPS:g} TFLOP/s TF32)\n"
        f"  memory: derived {tensor_bytes / 1e9:.2f} GB/s of stored tensors "
        f"({candidate_bytes:,.0f} B a candidate, measured record size) = {hbm_gpus:.4f} GPUs of "
        f"HBM ({GPU_HBM_GBPS:,.0f} GB/s, assumed) or {pcie_gpus:.3f} of a PCIe Gen5 x16 link "
        f"({PCIE_GBPS:g} GB/s, assumed) when copied in per search\n"
        f"  => derived {gpus:.3f} GPUs per {SEARCHES_PER_S:,} searches/s: a floor; kernel "
        "launches and the host side, not FLOPs, bound small batches (gpu_check.sh measures)"
    )
    return plan


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
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the compute part")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs (median), compute")
    parser.add_argument(
        "--search-compute-only",
        action="store_true",
        help="measure only the search compute and print the GPU plan",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--plan-from", type=Path, default=None, help="print the plan from an earlier --json"
    )
    args = parser.parse_args()
    if args.plan_from:
        measured = json.loads(args.plan_from.read_text())["measured"]
        if "shortlist" in measured:
            plan(measured["shortlist"], measured["postgres"], measured["redis"])
        if "search_compute" in measured:
            gpu_plan(measured["search_compute"], RECORD_BYTES["rerank tensors (photo)"])
        return
    print("search compute (measured):")
    compute = search_compute_figures(args.threads, args.repeats)
    result: dict[str, Any] = {"measured": {"search_compute": compute}, "record_bytes": RECORD_BYTES}
    if not args.search_compute_only:
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
        result["measured"].update({"shortlist": shortlist, "postgres": database, "redis": cache})
        result["derived_plan"] = plan(shortlist, database, cache)
    result["derived_gpu_plan"] = gpu_plan(compute, RECORD_BYTES["rerank tensors (photo)"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result.update({"dim": DIM, "captions_per_photo": CAPTIONS_PER_PHOTO})
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

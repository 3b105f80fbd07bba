"""Fetching the region features of K candidates: one Redis MGET vs K GETs vs the LMDB store.

100 ids x 49x1280 float16 regions (~125 KB each, ~12.5 MB a request), as the reranker needs
them. Starts its own redis-server on a free port (no persistence), fills both sides with the
same bytes, and times each way over repeated rounds after a warm-up.

    python bench/feature_fetch.py --json results/feature_fetch.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

from index.cache import CachedFeatureStore, RedisFeatureCache, cache_key, cache_keyspace
from index.feature_store import FeatureStore

REGIONS, FEATURE_DIM = 49, 1280
NAMESPACE = "regions:bench:v1"
KEYSPACE = cache_keyspace("bench", "v1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(500):
        try:
            client.ping()
            return process, url
        except redis.ConnectionError:
            time.sleep(0.02)
    process.kill()
    raise RuntimeError("redis-server did not start")


def _time_ms(fn, rounds: int) -> np.ndarray:
    fn()  # warm-up
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return np.asarray(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ids = list(range(1, args.ids + 1))
    with tempfile.TemporaryDirectory() as tmp:
        process, url = _start_redis(Path(tmp))
        try:
            store = FeatureStore(Path(tmp) / "features")
            store.put_many(
                NAMESPACE,
                {
                    i: {
                        "features": rng.standard_normal((REGIONS, FEATURE_DIM)).astype(np.float16),
                        "boxes": rng.random((REGIONS, 4), dtype=np.float32),
                    }
                    for i in ids
                },
            )
            cache = RedisFeatureCache(url, socket_timeout_s=5.0)
            cached = CachedFeatureStore(store, cache, namespace=NAMESPACE, keyspace=KEYSPACE)
            cached.get_many(ids)  # fills Redis (write-back)
            client = redis.Redis.from_url(url)
            keys = [cache_key(KEYSPACE, i) for i in ids]
            assert all(v is not None for v in client.mget(keys)), "write-back did not fill Redis"

            ways = {  # raw bytes each way, then the service's read-through path (decoded)
                "redis_mget": lambda: client.mget(keys),
                "redis_per_key_get": lambda: [client.get(key) for key in keys],
                "lmdb": lambda: store.get_many_encoded(NAMESPACE, ids),
                "read_through_decoded": lambda: cached.get_many(ids),
            }
            results = {}
            for name, fn in ways.items():
                samples = _time_ms(fn, args.rounds)
                results[name] = {
                    "p50_ms": float(np.percentile(samples, 50)),
                    "p99_ms": float(np.percentile(samples, 99)),
                }
            megabytes = sum(len(v) for v in store.get_many_encoded(NAMESPACE, ids).values()) / 1e6
            base = results["redis_mget"]["p50_ms"]
            print(f"{args.ids} ids x {REGIONS}x{FEATURE_DIM} float16 = {megabytes:.1f} MB a fetch")
            for name, row in results.items():
                row["ratio_to_mget"] = row["p50_ms"] / base
                print(
                    f"{name:<18} p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms  "
                    f"{row['ratio_to_mget']:5.2f}x MGET"
                )
            cache.close()
            store.close()
        finally:
            process.kill()
            process.wait()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The feature cache on one Redis against a 3-node Redis Cluster, in one run.

A search reads its K candidates' records in one `get_many`: one MGET on a single Redis; on a
cluster the same keys (no hash tags) spread over every node's slots, and redis-py's
`mget_nonatomic` sends one MGET per slot, pipelined per node. This measures what that costs:
`RedisFeatureCache.get_many` of K ids (all hits) and `set_many` of K records, median of
`--rounds` alternating rounds, on local servers started here (the test suite's helpers).

    python bench/redis_cluster.py --k 100 --json bench/results/redis_cluster.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "bench"]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

import numpy as np  # noqa: E402
from redis_server import RedisClusterServers, RedisServer  # noqa: E402

from index.cache import RedisFeatureCache, cache_keyspace  # noqa: E402

KEYSPACE = cache_keyspace("grid", "bench")


def timed_ms(action) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--record-bytes", type=int, default=73_299)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    records = {
        10_000 + i: rng.standard_normal(args.record_bytes // 2).astype(np.float16).tobytes()
        for i in range(args.k)
    }
    ids = list(records)
    with tempfile.TemporaryDirectory() as folder:
        single_server = RedisServer(Path(folder) / "single").start()
        cluster_servers = RedisClusterServers(Path(folder) / "cluster").start()
        try:
            caches = {
                "single": RedisFeatureCache(single_server.url, socket_timeout_s=5),
                "cluster": RedisFeatureCache(cluster_servers.url, socket_timeout_s=5, cluster=True),
            }
            timings: dict[str, dict[str, list[float]]] = {
                name: {"get_many": [], "set_many": []} for name in caches
            }
            for name, cache in caches.items():  # warm-up: connections, slot map
                cache.set_many(KEYSPACE, records)
                assert len(cache.get_many(KEYSPACE, ids)) == args.k, name
            for _ in range(args.rounds):
                for name, cache in caches.items():
                    timings[name]["set_many"].append(
                        timed_ms(lambda c=cache: c.set_many(KEYSPACE, records))
                    )
                    timings[name]["get_many"].append(
                        timed_ms(lambda c=cache: c.get_many(KEYSPACE, ids))
                    )
            for cache in caches.values():
                assert cache.healthy and cache.stats.errors == 0
                cache.close()
        finally:
            cluster_servers.kill()
            single_server.kill()
    medians = {
        name: {op: statistics.median(values) for op, values in ops.items()}
        for name, ops in timings.items()
    }
    print(f"K = {args.k} records of {args.record_bytes:,} B, {args.rounds} rounds, medians:")
    for op in ("get_many", "set_many"):
        single, cluster = medians["single"][op], medians["cluster"][op]
        print(
            f"  {op:<9} single {single:7.2f} ms   cluster (3 nodes) {cluster:7.2f} ms   "
            f"cluster/single {cluster / single:.2f}x"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "median_ms": medians}, indent=2
            )
        )


if __name__ == "__main__":
    main()

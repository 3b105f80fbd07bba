"""PostgreSQL mode against the embedded stores, in one run, and a replica's start on a big corpus.

1. Ingest and search latency through the same `Corpus` API, embedded (SQLite + LMDB + FAISS)
   vs PostgreSQL, on the same synthetic items: an image with 49x1280 float16 region features,
   rerank tensors (49x768 float16), a pooled vector and 5 captions; a "search" is what a query
   asks of the stores: the shortlist (FAISS, in memory either way), the catalog rows and
   captions of the K hits, and their rerank tensors (cache off: the store itself is timed).
   Round trips to the server per ingest and per search (PostgreSQL mode, the calling thread's
   work with the change follower stopped), counted from libpq's protocol trace of every
   pooled connection: each Sync or simple Query the client sends waits for one answer.
   `--compare-ref REF` runs this part for the code at git REF too (exported to a temporary
   folder, in its own process, right before this tree's), so before/after come from one run.
2. Stored record format in PostgreSQL: the codec's bytea (what the corpus uses) vs float4[]
   arrays for the same K records, fetched and decoded to numpy.
3. A replica's start on a synthetic corpus of --start-images images (and --captions-per-image
   captions each): catalog rows and pooled vectors COPYed in bulk, then a fresh process opens
   the corpus (builds both FAISS indexes from the database); its wall time and RSS are reported,
   for the first replica (trains the IVF indexes, shares the trained structures) and a later
   one (starts from them).

    python bench/postgres_stores.py --database postgresql://postgres@127.0.0.1:5432/postgres \
        [--compare-ref main] --json results/postgres_stores.json
Each run creates (and drops) its own databases on that server.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
from psycopg import sql
from psycopg.pq import Trace
from psycopg_pool import ConnectionPool

from index.cache import LocalFeatureCache
from index.codec import decode_arrays, encode_arrays
from index.corpus import Corpus, NewCaption, pooled_namespace

REGIONS, REGION_DIM, RERANK_DIM = 49, 1280, 768
CAPTIONS_PER_IMAGE = 5
WARM_UP = 12  # operations before round trips are counted


def _options(dim: int) -> dict:
    return {"dim": dim, "extractor": "grid", "extractor_version": "v1", "model_version": "m1"}


def _database_url(server: str, name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(server)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo(**info)


def _create(server: str) -> tuple[str, str]:
    name = f"campsearch_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, _database_url(server, name)


def _drop(server: str, name: str) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _item(rng: np.random.Generator, n: int, dim: int) -> dict:
    return {
        "image_bytes": f"bench-{n}-".encode() + rng.bytes(2_000),
        "width": 640,
        "height": 480,
        "region_features": rng.standard_normal((REGIONS, REGION_DIM)).astype(np.float16),
        "region_boxes": rng.random((REGIONS, 4)).astype(np.float32),
        "pooled": rng.standard_normal(dim).astype(np.float32),
        "captions": [
            NewCaption(
                f"caption {n}.{c}",
                list(range(1, 14)),
                rng.standard_normal(dim).astype(np.float32),
                {"words": rng.standard_normal((13, RERANK_DIM)).astype(np.float16)},
            )
            for c in range(CAPTIONS_PER_IMAGE)
        ],
        "extension": ".jpg",
        "rerank": {"regions": rng.standard_normal((REGIONS, RERANK_DIM)).astype(np.float16)},
    }


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {
        "p50_ms": round(statistics.median(ordered), 3),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
    }


def ingest_and_search(corpus: Corpus, items: list[dict], queries: np.ndarray, k: int) -> dict:
    ingest_ms = []
    for item in items:
        start = time.perf_counter()
        corpus.add_image(**item)
        ingest_ms.append((time.perf_counter() - start) * 1000)
    search_ms = []
    for query in queries:
        start = time.perf_counter()
        _search(corpus, query, k)
        search_ms.append((time.perf_counter() - start) * 1000)
    return {"ingest": _percentiles(ingest_ms), "search": _percentiles(search_ms)}


def compare_backends(server: str, count: int, searches: int, k: int, dim: int) -> dict:
    rng = np.random.default_rng(0)
    items = [_item(rng, n, dim) for n in range(count)]
    queries = rng.standard_normal((searches, dim)).astype(np.float32)
    results = {}
    name, url = _create(server)
    try:
        with tempfile.TemporaryDirectory() as folder:
            for backend, options in (("embedded", {}), ("postgresql", {"database_url": url})):
                with Corpus.open(
                    Path(folder) / backend,
                    cache=LocalFeatureCache(max_bytes=0),
                    **_options(dim),
                    **options,
                ) as corpus:
                    results[backend] = ingest_and_search(corpus, items, queries, k)
    finally:
        _drop(server, name)
    return results


class RoundTrips:
    """Counts round trips on every connection a psycopg pool hands out while it is entered,
    from libpq's protocol trace (one file per connection): each client message that asks the
    server to answer, a Sync (extended protocol: one per statement, or per pipeline sync) or a
    simple Query, is one round trip."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._traced: dict[int, tuple[psycopg.Connection, Path]] = {}
        self._read_to: dict[Path, int] = {}
        self._getconn = ConnectionPool.getconn

    def __enter__(self) -> RoundTrips:
        counter, getconn = self, self._getconn

        def traced_getconn(pool: ConnectionPool, *args, **kwargs) -> psycopg.Connection:
            conn = getconn(pool, *args, **kwargs)
            counter._trace(conn)
            return conn

        ConnectionPool.getconn = traced_getconn  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        ConnectionPool.getconn = self._getconn  # type: ignore[method-assign]
        for conn, _ in self._traced.values():
            if not conn.closed:
                conn.pgconn.untrace()

    def _trace(self, conn: psycopg.Connection, path: Path | None = None) -> None:
        if path is None:
            if id(conn) in self._traced:
                return
            path = self.folder / f"connection{len(self._traced)}.trace"
        conn.pgconn.trace(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND))
        conn.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS | Trace.REGRESS_MODE)
        self._traced[id(conn)] = (conn, path)

    def take(self) -> int:
        """Round trips since the last call (call it between operations: libpq buffers its
        trace, which is flushed here by stopping and restarting it)."""
        trips = 0
        for conn, path in list(self._traced.values()):
            if not conn.closed:
                conn.pgconn.untrace()  # flushes
                self._trace(conn, path)
            with path.open("rb") as trace:
                trace.seek(self._read_to.get(path, 0))
                text = trace.read()
            self._read_to[path] = self._read_to.get(path, 0) + len(text)
            for line in text.decode("utf-8", "replace").splitlines():
                fields = line.split("\t")
                if len(fields) >= 3 and fields[0] == "F" and fields[2] in ("Sync", "Query"):
                    trips += 1
        return trips


def round_trips(server: str, count: int, k: int, dim: int) -> dict:
    """Round trips per ingest and per search in PostgreSQL mode after a warm-up of WARM_UP of
    each (pool connections open, statements prepared: psycopg prepares one, with a round trip
    of its own, on its 5th run on a connection), with the change follower stopped."""
    rng = np.random.default_rng(3)
    items = [_item(rng, n, dim) for n in range(count + WARM_UP)]
    queries = rng.standard_normal((count + WARM_UP, dim)).astype(np.float32)
    name, url = _create(server)
    try:
        with (
            tempfile.TemporaryDirectory() as folder,
            RoundTrips(Path(folder)) as trips,
            Corpus.open(
                Path(folder) / "corpus",
                cache=LocalFeatureCache(max_bytes=0),
                database_url=url,
                **_options(dim),
            ) as corpus,
        ):
            if corpus.follower is not None:
                corpus.follower.stop()
            for item in items[:WARM_UP]:
                corpus.add_image(**item)
            for query in queries[:WARM_UP]:
                _search(corpus, query, k)
            trips.take()
            for item in items[WARM_UP:]:
                corpus.add_image(**item)
            ingest = trips.take() / count
            for query in queries[WARM_UP:]:
                _search(corpus, query, k)
            search = trips.take() / count
    finally:
        _drop(server, name)
    return {"per_ingest": round(ingest, 2), "per_search": round(search, 2), "operations": count}


def _search(corpus: Corpus, query: np.ndarray, k: int) -> None:
    _, ids = corpus.search_images(query[None], k)
    hits = [int(i) for i in ids[0] if i >= 0]
    corpus.get_images(hits)
    corpus.captions_of_images(hits)
    tensors = corpus.get_rerank_tensors("images", hits)
    assert len(tensors) == len(hits)


def record_formats(server: str, k: int, rounds: int) -> dict:
    """bytea codec records vs float4[] arrays for the same K region records."""
    rng = np.random.default_rng(1)
    records = [rng.standard_normal((REGIONS, REGION_DIM)).astype(np.float16) for _ in range(k)]
    name, url = _create(server)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE as_bytea (id BIGINT PRIMARY KEY, payload BYTEA NOT NULL)")
            conn.execute("ALTER TABLE as_bytea ALTER COLUMN payload SET STORAGE EXTERNAL")
            conn.execute("CREATE TABLE as_array (id BIGINT PRIMARY KEY, payload REAL[] NOT NULL)")
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO as_bytea VALUES (%s, %s)",
                    [(i, encode_arrays({"features": r})) for i, r in enumerate(records)],
                )
                cursor.executemany(
                    "INSERT INTO as_array VALUES (%s, %s)",
                    [(i, r.astype(np.float32).reshape(-1).tolist()) for i, r in enumerate(records)],
                )
            sizes = conn.execute(
                "SELECT pg_total_relation_size('as_bytea'), pg_total_relation_size('as_array')"
            ).fetchone()
            ids = list(range(k))

            def fetch_bytea() -> None:
                rows = conn.execute(
                    "SELECT payload FROM as_bytea WHERE id = ANY(%s)", (ids,), binary=True
                ).fetchall()
                [decode_arrays(row[0])["features"] for row in rows]

            def fetch_array() -> None:
                rows = conn.execute(
                    "SELECT payload FROM as_array WHERE id = ANY(%s)", (ids,), binary=True
                ).fetchall()
                [np.asarray(row[0], dtype=np.float16).reshape(REGIONS, REGION_DIM) for row in rows]

            timings = {}
            for label, fetch in (("bytea", fetch_bytea), ("float4[]", fetch_array)):
                fetch()
                samples = []
                for _ in range(rounds):
                    start = time.perf_counter()
                    fetch()
                    samples.append((time.perf_counter() - start) * 1000)
                timings[label] = _percentiles(samples)
    finally:
        _drop(server, name)
    return {
        "records": k,
        "timings": timings,
        "table_bytes": {"bytea": sizes[0], "float4[]": sizes[1]},
        "array_over_bytea_p50": round(
            timings["float4[]"]["p50_ms"] / timings["bytea"]["p50_ms"], 2
        ),
    }


def fill_for_start(url: str, images: int, captions_per_image: int, dim: int) -> float:
    """Catalog rows and pooled vectors by COPY (what a replica's start reads); seconds taken."""
    # The schema comes from the corpus's own migrations.
    from index.postgres import PostgresDatabase

    PostgresDatabase(url).close()
    rng = np.random.default_rng(2)
    started = time.perf_counter()
    with psycopg.connect(url) as conn, conn.cursor() as cursor:
        with cursor.copy(
            "COPY images (id, sha256, stored_path, width, height, created) FROM STDIN"
        ) as copy:
            for i in range(1, images + 1):
                sha = f"{i:064x}"
                copy.write_row((i, sha, f"images/{sha[:2]}/{sha}.jpg", 640, 480, 0.0))
        with cursor.copy(
            "COPY captions (id, image_id, text, token_ids, created) FROM STDIN"
        ) as copy:
            for i in range(1, images * captions_per_image + 1):
                image_id = (i - 1) // captions_per_image + 1
                copy.write_row((i, image_id, f"caption {i}", [1, 2, 3], 0.0))
        for kind, total in (("images", images), ("captions", images * captions_per_image)):
            namespace = pooled_namespace(kind, "m1")
            with cursor.copy(
                "COPY features (namespace, item_id, payload) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["text", "int8", "bytea"])
                for start in range(1, total + 1, 10_000):
                    block = rng.standard_normal((min(10_000, total - start + 1), dim)).astype(
                        np.float32
                    )
                    for offset, vector in enumerate(block):
                        copy.write_row(
                            (namespace, start + offset, encode_arrays({"vector": vector}))
                        )
        cursor.execute("SELECT setval('image_ids', %s)", (images,))
        cursor.execute("SELECT setval('caption_ids', %s)", (images * captions_per_image,))
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


START_PROBE = """
import json, os, resource, sys, time
from pathlib import Path
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
before = rss_mib()
from index.corpus import Corpus
imported = rss_mib()
started = time.perf_counter()
corpus = Corpus.open(Path(sys.argv[2]), database_url=sys.argv[1], dim=int(sys.argv[3]),
                     extractor="grid", extractor_version="v1", model_version="m1",
                     image_factory="auto", caption_factory="auto")
seconds = time.perf_counter() - started
summary = {k: {"factory": s.factory, "count": s.count}
           for k, s in corpus.index_summaries().items()}
print(json.dumps({"start_s": seconds, "rss_before_open_mib": imported,
                  "rss_after_open_mib": rss_mib(),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "indexes": summary, "applied_sequence": corpus.applied_sequence}))
corpus.close()
"""


def replica_start(server: str, images: int, captions_per_image: int, dim: int) -> dict:
    name, url = _create(server)
    try:
        fill_s = fill_for_start(url, images, captions_per_image, dim)
        starts = []
        # The first replica trains its IVF indexes and shares the trained structures; the
        # second starts from them (no k-means).
        for _ in ("first", "later"):
            with tempfile.TemporaryDirectory() as folder:
                probe = subprocess.run(
                    [sys.executable, "-c", START_PROBE, url, folder, str(dim)],
                    capture_output=True,
                    text=True,
                    check=True,
                    env={**os.environ},
                )
            result = json.loads(probe.stdout.strip().splitlines()[-1])
            starts.append(
                {k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}
            )
    finally:
        _drop(server, name)
    return {
        "images": images,
        "captions": images * captions_per_image,
        "dim": dim,
        "bulk_fill_s": round(fill_s, 1),
        "first_replica": starts[0],
        "later_replica": starts[1],
    }


def tree_figures(args: argparse.Namespace) -> dict:
    """Both backends' latency and PostgreSQL mode's round trips, for the code imported here."""
    return {
        "latency": compare_backends(args.database, args.items, args.searches, args.k, args.dim),
        "round_trips": round_trips(args.database, args.round_trip_ops, args.k, args.dim),
    }


def figures_at(ref: str | None, args: argparse.Namespace) -> dict:
    """`tree_figures` in a process of its own, for the code at git `ref` (exported to a
    temporary folder) or, with None, for this checkout."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="bench_ref_") as folder:
        tree = repo
        if ref is not None:
            archive = subprocess.run(
                ["git", "-C", str(repo), "archive", ref], capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
            tree = Path(folder)
        forwarded = ["--database", args.database, "--items", str(args.items)]
        forwarded += ["--searches", str(args.searches), "--k", str(args.k), "--dim", str(args.dim)]
        forwarded += ["--round-trip-ops", str(args.round_trip_ops)]
        run = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--tree-only", *forwarded],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(tree)},
        )
    if run.returncode:
        raise SystemExit(f"the bench at {ref or 'this checkout'} failed:\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def print_tree(label: str, figures: dict) -> dict:
    """Print one tree's figures; PostgreSQL over embedded p50 ratios."""
    backends, trips = figures["latency"], figures["round_trips"]
    ratios = {}
    for stage in ("ingest", "search"):
        ratio = backends["postgresql"][stage]["p50_ms"] / backends["embedded"][stage]["p50_ms"]
        ratios[f"{stage}_p50_postgresql_over_embedded"] = round(ratio, 2)
        print(
            f"{label}{stage:7s} p50: embedded {backends['embedded'][stage]['p50_ms']:8.2f} ms, "
            f"postgresql {backends['postgresql'][stage]['p50_ms']:8.2f} ms  "
            f"(postgresql/embedded {ratio:.2f}x); p95 "
            f"{backends['embedded'][stage]['p95_ms']:.2f} vs "
            f"{backends['postgresql'][stage]['p95_ms']:.2f} ms; "
            f"{trips[f'per_{stage}']} round trips"
        )
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--database",
        default=os.environ.get(
            "CAMPSEARCH_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a server URL; the bench creates and drops its own databases there",
    )
    parser.add_argument("--items", type=int, default=200, help="images ingested per backend")
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--k", type=int, default=50, help="shortlist hits a search reads")
    parser.add_argument("--dim", type=int, default=256, help="pooled vector dims")
    parser.add_argument(
        "--round-trip-ops", type=int, default=20, help="ingests and searches traced"
    )
    parser.add_argument(
        "--compare-ref", help="also measure the code at this git ref (before/after in one run)"
    )
    parser.add_argument("--tree-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start-images", type=int, default=100_000)
    parser.add_argument("--captions-per-image", type=int, default=CAPTIONS_PER_IMAGE)
    parser.add_argument("--skip-start", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    if args.tree_only:
        print(json.dumps(tree_figures(args)))
        return
    report: dict = {"host_cpus": os.cpu_count(), "load_average_before": os.getloadavg()}
    if args.compare_ref:
        before = figures_at(args.compare_ref, args)
        after = figures_at(None, args)
        report["compare_ref"] = args.compare_ref
        report["before"] = {**before, **print_tree(f"{args.compare_ref:>10s} ", before)}
        report["after"] = {**after, **print_tree(f"{'this tree':>10s} ", after)}
        for stage in ("ingest", "search"):
            then = before["latency"]["postgresql"][stage]["p50_ms"]
            now = after["latency"]["postgresql"][stage]["p50_ms"]
            report[f"{stage}_postgresql_p50_after_over_before"] = round(now / then, 2)
            print(
                f"PostgreSQL {stage} p50 this tree / {args.compare_ref}: {now / then:.2f}x; "
                f"round trips {before['round_trips'][f'per_{stage}']} -> "
                f"{after['round_trips'][f'per_{stage}']}"
            )
    else:
        figures = tree_figures(args)
        report.update(figures)
        report.update(print_tree("", figures))
    formats = record_formats(args.database, args.k, rounds=30)
    report["record_format"] = formats
    print(
        f"{args.k} region records: bytea p50 {formats['timings']['bytea']['p50_ms']:.2f} ms, "
        f"float4[] p50 {formats['timings']['float4[]']['p50_ms']:.2f} ms "
        f"(array/bytea {formats['array_over_bytea_p50']}x); table bytes "
        f"{formats['table_bytes']}"
    )
    if not args.skip_start:
        start = replica_start(args.database, args.start_images, args.captions_per_image, args.dim)
        report["replica_start"] = start
        for which in ("first_replica", "later_replica"):
            run = start[which]
            print(
                f"{which} start on {start['images']} images + {start['captions']} captions "
                f"({args.dim}-d): {run['start_s']} s, RSS {run['rss_before_open_mib']} -> "
                f"{run['rss_after_open_mib']} MiB (peak {run['peak_rss_mib']} MiB), indexes "
                f"{run['indexes']}"
            )
        print(f"(bulk COPY of the corpus took {start['bulk_fill_s']} s)")
    report["self_peak_rss_mib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

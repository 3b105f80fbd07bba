"""Prometheus metrics: request counts, per-stage latency histograms, cache and batcher state,
and where each stage runs.

Each app gets its own `CollectorRegistry`, so several apps in one process (tests, benchmarks)
never collide. Routes are labelled by their template (`/v1/images/{image_id}`), never by the
raw path, so label cardinality stays bounded whatever clients send.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STAGES = (
    "decode",
    "encode",
    "shortlist",
    "features",
    "precompute",
    "rerank",
    "explain",
    "extract",
    "store",
)
# Seconds; from sub-millisecond cache hits to multi-second CPU extraction.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServiceMetrics:
    """The service's metrics and a registry to expose them with."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "campsearch_http_requests",
            "HTTP requests by method, route template and status code.",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "campsearch_http_request_seconds",
            "HTTP request latency by route template.",
            ("method", "route"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_latency = Histogram(
            "campsearch_stage_seconds",
            "Latency of one pipeline stage (encode, shortlist, features, rerank, extract, ...).",
            ("stage",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rerank_batch_jobs = Histogram(
            "campsearch_rerank_batch_jobs",
            "Queries fused into one reranker call by the micro-batcher.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.shortlist_batch_jobs = Histogram(
            "campsearch_shortlist_batch_jobs",
            "Queries searched together in one shortlist batch by the micro-batcher.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.precompute_cache = Counter(
            "campsearch_precompute_cache_lookups",
            "Per-item rerank tensors looked up, by kind and result: hit (in-process LRU), "
            "stored (read from the feature cache or LMDB), miss (computed on the fly).",
            ("kind", "result"),
            registry=self.registry,
        )
        self.upload_region_cache = Counter(
            "campsearch_upload_region_lookups",
            "Region features of an upload: found by sha256 in the corpus/cache, or extracted.",
            ("source",),
            registry=self.registry,
        )
        for stage in STAGES:  # exported at 0 from the start, so dashboards see every stage
            self.stage_latency.labels(stage)

    @contextmanager
    def time_stage(self, stage: str, timings: dict[str, float] | None = None) -> Iterator[None]:
        """Observe the block's duration for `stage`; also add milliseconds to `timings`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.stage_latency.labels(stage).observe(elapsed)
            if timings is not None:
                timings[stage] = timings.get(stage, 0.0) + elapsed * 1000.0

    def watch(self, collect: Callable[[], dict[str, Any]]) -> None:
        """Export live state (cache stats, queue depth, corpus sizes) read at scrape time."""
        self.registry.register(_StateCollector(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges read from the running service at scrape time (never stale, never double-kept)."""

    def __init__(self, collect: Callable[[], dict[str, Any]]) -> None:
        self._collect = collect

    def describe(self) -> list[Any]:
        return []  # values only exist once the service is ready

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._collect()
        if not state:
            return
        cache = state["cache"]
        stats = GaugeMetricFamily(
            "campsearch_feature_cache_events",
            "Feature cache counters since start (hits, misses, errors, bypassed).",
            labels=("backend", "event"),
        )
        for event, value in cache["stats"].items():
            stats.add_metric((cache["backend"], event), float(value))
        yield stats
        healthy = GaugeMetricFamily(
            "campsearch_feature_cache_healthy",
            "1 when the feature cache answers, 0 while the service reads the store directly.",
            labels=("backend",),
        )
        healthy.add_metric((cache["backend"],), 1.0 if cache["healthy"] else 0.0)
        yield healthy
        yield GaugeMetricFamily(
            "campsearch_rerank_queue_depth",
            "Queries waiting for the reranker.",
            value=float(state["queued"]),
        )
        yield GaugeMetricFamily(
            "campsearch_shortlist_queue_depth",
            "Queries waiting for the shortlist search.",
            value=float(state["shortlist_queued"]),
        )
        stages = GaugeMetricFamily(
            "campsearch_stage_info",
            "Where each stage runs (cpu or cuda:N) and its precision; the value is always 1.",
            labels=("stage", "device", "precision"),
        )
        for stage, where in state["stages"].items():
            stages.add_metric((stage, where["device"], where["precision"]), 1.0)
        yield stages
        copies = GaugeMetricFamily(
            "campsearch_shortlist_device_copies",
            "Full copies of a shortlist index to the GPU since start (writes update the copy "
            "in place; a copy follows training, compaction or many deletes).",
            labels=("kind",),
        )
        for kind, count in state["device_copies"].items():
            copies.add_metric((kind,), float(count))
        yield copies
        sizes = GaugeMetricFamily(
            "campsearch_corpus_items", "Items in the corpus.", labels=("kind",)
        )
        for kind in ("images", "captions"):
            sizes.add_metric((kind,), float(state[kind]))
        yield sizes
        held = GaugeMetricFamily(
            "campsearch_memory_cache_bytes",
            "Bytes held now by an in-process cache (image_tensors, caption_tensors, features).",
            labels=("cache",),
        )
        budget = GaugeMetricFamily(
            "campsearch_memory_cache_budget_bytes",
            "The byte budget of an in-process cache (CAMPSEARCH_*_CACHE_MIB).",
            labels=("cache",),
        )
        for name, (used, limit) in state["memory_caches"].items():
            held.add_metric((name,), float(used))
            budget.add_metric((name,), float(limit))
        yield held
        yield budget
        search_memory = state["search_memory"]
        reserved = GaugeMetricFamily(
            "campsearch_search_memory_bytes",
            "Bytes of tensors reserved by searches in flight, and their budget "
            "(CAMPSEARCH_SEARCH_MEMORY_MIB; 0: unbounded).",
            labels=("state",),
        )
        reserved.add_metric(("held",), float(search_memory.held))
        reserved.add_metric(("budget",), float(search_memory.capacity))
        yield reserved
        yield GaugeMetricFamily(
            "campsearch_search_memory_waiting",
            "Searches waiting for room in the search memory budget.",
            value=float(search_memory.waiting),
        )
        rebuild = state.get("tensor_rebuild")
        if rebuild is not None:
            yield _rebuild_gauge(
                "campsearch_rerank_tensor_rebuild_items",
                "The background rebuild of rerank tensors after a model change: items done "
                "and the total to do, by kind (equal when finished; 0/0 when nothing was "
                "missing). PostgreSQL mode: items with tensors of the model and all items, "
                "read from the database (apart by the items skipped, if any).",
                rebuild,
            )
        pooled = state.get("pooled_rebuild")
        if pooled is not None:
            yield _rebuild_gauge(
                "campsearch_pooled_vector_rebuild_items",
                "The background re-embedding of pooled (shortlist) vectors after a model "
                "version change (items without them are not searchable until then): items "
                "done and the total to do, by kind; read like "
                "campsearch_rerank_tensor_rebuild_items.",
                pooled,
            )
        regions = state.get("region_rebuild")
        if regions is not None:
            yield _rebuild_gauge(
                "campsearch_region_feature_rebuild_items",
                "The background re-extraction of region features from the stored photos after "
                "a change of extractor (the pooled and tensor rebuilds wait for it): images "
                "done and the total to do; read like campsearch_rerank_tensor_rebuild_items.",
                regions,
            )
        built = state.get("tensors_built")
        if built is not None:
            here = CounterMetricFamily(
                "campsearch_rerank_tensors_built",
                "Items whose rerank tensors this process stored in a rebuild after a model "
                "change (in PostgreSQL mode one replica at a time builds for the database).",
                labels=("kind",),
            )
            for kind, count in built.items():
                here.add_metric((kind,), float(count))
            yield here
        decode_memory = state.get("decode_memory")
        if decode_memory is not None:
            decoding = GaugeMetricFamily(
                "campsearch_decode_memory_bytes",
                "Bytes of pixels reserved by photo uploads being decoded, and their budget "
                "(CAMPSEARCH_DECODE_MEMORY_MIB; 0: unbounded).",
                labels=("state",),
            )
            decoding.add_metric(("held",), float(decode_memory.held))
            decoding.add_metric(("budget",), float(decode_memory.capacity))
            yield decoding
            yield GaugeMetricFamily(
                "campsearch_decode_memory_waiting",
                "Photo uploads waiting for room in the decode memory budget.",
                value=float(decode_memory.waiting),
            )
        if state.get("heap") is not None:
            heap = GaugeMetricFamily(
                "campsearch_heap_bytes",
                "Bytes the C allocator holds: in_use and free in its arenas, mapped blocks "
                "(glibc mallinfo2; free growing under steady load is fragmentation).",
                labels=("state",),
            )
            for name, value in state["heap"].items():
                heap.add_metric((name,), float(value))
            yield heap


def _rebuild_gauge(
    name: str, documentation: str, progress: dict[str, tuple[int, int]]
) -> GaugeMetricFamily:
    """A background rebuild's progress as one gauge: done and total items by kind."""
    gauge = GaugeMetricFamily(name, documentation, labels=("kind", "state"))
    for kind, (done, total) in progress.items():
        gauge.add_metric((kind, "done"), float(done))
        gauge.add_metric((kind, "total"), float(total))
    return gauge

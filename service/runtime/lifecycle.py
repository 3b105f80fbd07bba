"""Everything a running service holds, built from `Settings`, and its lifecycle.

`ServiceRuntime.build` loads the model, the region extractor, the feature cache and the corpus
(blocking: run it in a thread). `ServiceState` is what the app keeps: "starting" until the
runtime is built, then "ready" (or "failed" with the reason), so `/healthz` answers at once and
`/readyz` says 503 until search can work.

Embedded mode: one process owns a data directory: `DataDirLock` (an advisory `flock`) refuses
a second server or a local bulk ingest on the same folder, whose in-memory indexes would
silently diverge.
PostgreSQL mode (CAMPSEARCH_DATABASE_URL) takes no lock: replicas share the database and
follow its changes (`index.follower`). A primary that does not answer at start is waited for
(capped back-off, `CAMPSEARCH_DATABASE_RETRY_MAX_S`) while the model loads: the phase stays
"starting" and `waiting_for_database` says why, so /healthz is 200 and /readyz 503 with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import psycopg
import torch

from index.cache import FeatureCache, LocalFeatureCache, RedisFeatureCache
from index.corpus import Corpus
from index.device import CPU, faiss_gpu_id
from index.errors import DatabaseUnavailableError
from index.postgres import ping, redacted_url
from index.read_routing import ReadRouter
from index.shortlist import SearchResult
from model.checkpoints.release import PRECOMPUTED
from model.vision.extractors import RegionExtractor, create_extractor
from service.ingest.indexer import Indexer
from service.runtime.heap import (
    can_trim_heap,
    fix_mmap_threshold,
    heap_usage,
    set_top_pad,
    trim_heap,
)
from service.runtime.metrics import ServiceMetrics
from service.runtime.settings import MEBIBYTE, Settings
from service.search.batching import MicroBatcher, OnTheWay
from service.search.encoding import QueryEncoder
from service.search.pipeline import SearchPipeline
from service.search.regions import UploadRegions
from service.search.rerank import PairReranker, RerankJob
from service.search.shortlist import ShortlistJob, ShortlistSearcher
from service.search.tensor_rebuild import (
    PooledRebuild,
    RegionRebuild,
    TensorRebuild,
    refuse_unbuildable,
)

if TYPE_CHECKING:
    from model.retrieval import EncodedTexts, RetrievalModel

logger = logging.getLogger(__name__)

LOCK_FILE = ".campsearch.lock"
SAVE_INTERVAL_S = 60.0  # indexes are also rebuilt from the store on start, so this is a speed-up
# PostgreSQL mode: the first retry of a primary that does not answer at start; it doubles up to
# CAMPSEARCH_DATABASE_RETRY_MAX_S.
DATABASE_RETRY_FIRST_S = 0.5

Phase = Literal["starting", "ready", "failed"]


class DataDirBusyError(RuntimeError):
    """Another process (a server or a bulk ingest) is using the data directory."""


class DataDirLock:
    """An exclusive advisory lock on `data_dir/.campsearch.lock`, held while the corpus is open."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirBusyError(
                f"{self.path.parent} is in use by another camp-search process (a running "
                "server?); stop it, or ingest into it over HTTP with --server URL"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def build_cache(settings: Settings) -> FeatureCache:
    """Redis when `CAMPSEARCH_REDIS_URL` is set (a dead Redis only makes it unhealthy), else
    an in-process LRU of `CAMPSEARCH_FEATURE_CACHE_MIB`."""
    if settings.redis_url:
        cache = RedisFeatureCache(
            settings.redis_url, ttl_s=settings.cache_ttl_s, cluster=settings.redis_cluster
        )
        if not cache.check():
            logger.warning("Redis is not answering; serving from the durable store meanwhile")
        return cache
    return LocalFeatureCache(
        max_bytes=settings.feature_cache_mib * MEBIBYTE, ttl_s=settings.cache_ttl_s
    )


def build_read_router(settings: Settings) -> ReadRouter | None:
    """Connections to the PostgreSQL primary and, with `CAMPSEARCH_DATABASE_READ_URL`, to a
    streaming replica that serves reads while it is within `CAMPSEARCH_DATABASE_MAX_LAG_S`;
    None for the embedded stores (no `CAMPSEARCH_DATABASE_URL`)."""
    if not settings.database_url:
        return None
    return ReadRouter(
        settings.database, settings.database_read, max_lag_s=settings.database_max_lag_s
    )


def extractor_settings(settings: Settings, model: RetrievalModel) -> tuple[str, dict[str, Any]]:
    """(name, config) of the extractor to build: the one the checkpoint's metadata records,
    with the device and any detectron2 files the settings give instead. Refuses a
    CAMPSEARCH_EXTRACTOR that differs from the model's: its features would be foreign."""
    if model.extractor_name == PRECOMPUTED:
        raise ValueError(
            "the model was imported with --extractor precomputed: it reads regions made outside "
            "the service, so it can be evaluated on precomputed folders but cannot ingest or "
            "search photos; import it with --extractor detectron2 (2048-d) or grid (1280-d)"
        )
    name = settings.extractor or model.extractor_name
    if name != model.extractor_name:
        raise ValueError(
            f"the model was trained on {model.extractor_name!r} regions, but "
            f"CAMPSEARCH_EXTRACTOR is {name!r}: use the model's extractor"
        )
    config: dict[str, Any] = {**model.extractor_config, "device": settings.device}
    if name == "detectron2":
        if settings.detectron2_config is not None:
            config["config_file"] = settings.detectron2_config
        if settings.detectron2_weights is not None:
            config["weights"] = settings.detectron2_weights
    return name, config


def build_extractor(settings: Settings, model: RetrievalModel) -> RegionExtractor:
    """The extractor the model was trained on, on the configured device; a version that
    differs from the one the checkpoint recorded is logged (other weights or box counts give
    other features than the model saw)."""
    name, config = extractor_settings(settings, model)
    extractor = create_extractor(name, config)
    if model.extractor_version and extractor.version != model.extractor_version:
        logger.warning(
            "the model's features came from extractor version %s; this service extracts %s",
            model.extractor_version,
            extractor.version,
        )
    return extractor


def load_model(
    settings: Settings,
    model: RetrievalModel | None = None,
    extractor: RegionExtractor | None = None,
) -> tuple[RetrievalModel, RegionExtractor]:
    """The checkpoint's model and its extractor (seconds; blocking); one passed in is kept."""
    if settings.threads_per_torch_call:
        torch.set_num_threads(settings.threads_per_torch_call)  # every thread started after
    if model is None:
        from model.retrieval import RetrievalModel

        model = RetrievalModel.load(
            settings.checkpoint,
            device=settings.device,
            precision=settings.rerank_precision,
            query_precision=settings.query_precision,
        )
    return model, extractor or build_extractor(settings, model)


def open_corpus(
    settings: Settings,
    model: RetrievalModel,
    extractor: RegionExtractor,
    cache: FeatureCache,
    gpu_id: int | None = None,
    read_router: ReadRouter | None = None,
) -> Corpus:
    """The corpus; in PostgreSQL mode its storage uses `read_router`'s connections (the
    process's one set: writes on the primary, reads on the replica when fresh enough)."""
    return Corpus.open(
        settings.data_dir,
        dim=model.pooled_dim,
        extractor=extractor.name,
        extractor_version=extractor.version,
        model_version=model.version,
        image_factory=settings.index_factory,
        caption_factory=settings.index_factory,
        nprobe=settings.nprobe,
        ef_search=settings.ef_search,
        gpu_id=gpu_id,
        cache=cache,
        tensor_version=model.tensor_version,
        keep_region_features=settings.keep_region_features,
        read_router=read_router,
    )


def build_shortlist_batcher(
    settings: Settings, corpus: Corpus, metrics: ServiceMetrics, gpu_id: int | None
) -> MicroBatcher[ShortlistJob, SearchResult]:
    """Every shortlist search goes through this batcher's one thread (the only thread that
    searches a GPU index). On a GPU it waits `batch_max_wait_ms` to gather queries, as the
    reranker does: one launch serves them all. On a CPU it never waits and batches only what
    queued while it was searching (an idle service adds no latency)."""
    return MicroBatcher(
        ShortlistSearcher(corpus, on_call=metrics.shortlist_batch_jobs.observe),
        max_batch_size=settings.batch_max_size,
        max_wait_s=settings.batch_max_wait_ms / 1000.0 if gpu_id is not None else 0.0,
        max_queue_size=settings.queue_max_size,
        name="shortlist",
    )


@dataclass
class ServiceRuntime:
    """The loaded service: model, extractor, corpus, cache, batchers, pipeline and indexer."""

    settings: Settings
    model: RetrievalModel
    extractor: RegionExtractor
    cache: FeatureCache
    corpus: Corpus
    batcher: MicroBatcher[RerankJob, np.ndarray]
    shortlist: MicroBatcher[ShortlistJob, SearchResult]
    pipeline: SearchPipeline
    regions: UploadRegions
    indexer: Indexer
    metrics: ServiceMetrics
    lock: DataDirLock | None  # None in PostgreSQL mode: replicas share the database
    rebuild: TensorRebuild
    pooled_rebuild: PooledRebuild
    region_rebuild: RegionRebuild
    saved_sequence: int = -1
    # The PostgreSQL primary and read replica; None with the embedded stores.
    read_router: ReadRouter | None = None

    @classmethod
    def build(
        cls,
        settings: Settings,
        metrics: ServiceMetrics,
        *,
        model: RetrievalModel | None = None,
        extractor: RegionExtractor | None = None,
    ) -> ServiceRuntime:
        """Load everything (seconds: model weights, extractor weights, index files).

        `model` / `extractor` may be passed in already loaded (tests, benchmarks).
        """
        if settings.threads_per_torch_call:
            torch.set_num_threads(settings.threads_per_torch_call)  # every thread started after
        # PostgreSQL mode: many replicas share the data (images folder + database); no lock.
        lock = None if settings.database else DataDirLock(settings.data_dir).acquire()
        read_router: ReadRouter | None = None
        try:
            model, extractor = load_model(settings, model, extractor)
            cache = build_cache(settings)
            read_router = build_read_router(settings)
            gpu_id = faiss_gpu_id(settings.device)
            corpus = open_corpus(settings, model, extractor, cache, gpu_id, read_router)
            try:
                refuse_unbuildable(corpus)
            except BaseException:
                corpus.close()
                raise
        except BaseException:
            if read_router is not None:
                read_router.close()
            if lock is not None:
                lock.release()
            raise
        reranker = PairReranker(
            model,
            on_call=lambda jobs, _s: metrics.rerank_batch_jobs.observe(jobs),
            workers=settings.rerank_threads,
        )
        # The reranker waits up to batch_max_wait_ms for company only while other searches are
        # on their way to it (encoding, shortlist, tensors): a lone search never waits.
        on_the_way = OnTheWay()
        batcher: MicroBatcher[RerankJob, np.ndarray] = MicroBatcher(
            reranker,
            max_batch_size=settings.batch_max_size,
            max_wait_s=settings.batch_max_wait_ms / 1000.0,
            max_queue_size=settings.queue_max_size,
            name="rerank",
            expected=lambda: on_the_way.count,
        )
        shortlist = build_shortlist_batcher(settings, corpus, metrics, gpu_id)
        # Query texts of concurrent searches share one encoder call; it never waits (a lone
        # search pays nothing), it batches what queued while the last call ran.
        encoder: MicroBatcher[str, EncodedTexts | ValueError] = MicroBatcher(
            QueryEncoder(model),
            max_batch_size=settings.batch_max_size,
            max_wait_s=0.0,
            max_queue_size=settings.queue_max_size,
            name="encode",
        )
        pipeline = SearchPipeline(
            model,
            corpus,
            batcher,
            metrics,
            shortlist=shortlist,
            request_timeout_s=settings.request_timeout_s,
            image_cache_bytes=settings.image_cache_mib * MEBIBYTE,
            caption_cache_bytes=settings.caption_cache_mib * MEBIBYTE,
            search_memory_bytes=settings.search_memory_mib * MEBIBYTE,
            max_regions=extractor.num_regions,
            encoder=encoder,
            rerank_on_the_way=on_the_way,
        )
        regions = UploadRegions(
            corpus, extractor, cache, metrics=metrics, max_waiting=settings.queue_max_size
        )
        indexer = Indexer(
            model,
            corpus,
            regions,
            pipeline,
            metrics,
            max_image_bytes=settings.max_upload_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_caption_chars=settings.max_query_chars,
            decode_memory_bytes=settings.decode_memory_mib * MEBIBYTE,
            decode_wait_s=settings.request_timeout_s,
        )
        # Region features of a new extractor first (re-extracted from the stored photos), then
        # pooled vectors (items without them are not searchable), then rerank tensors.
        region_rebuild = RegionRebuild(
            corpus, pipeline, extractor, max_image_pixels=settings.max_image_pixels
        )
        region_rebuild.plan()
        pooled_rebuild = PooledRebuild(corpus, pipeline, after=region_rebuild)
        pooled_rebuild.plan()
        rebuild = TensorRebuild(
            corpus,
            pipeline,
            drop_region_features=not settings.keep_region_features,
            after=pooled_rebuild,
        )
        rebuild.plan()
        runtime = cls(
            settings=settings,
            model=model,
            extractor=extractor,
            cache=cache,
            corpus=corpus,
            batcher=batcher,
            shortlist=shortlist,
            pipeline=pipeline,
            regions=regions,
            indexer=indexer,
            metrics=metrics,
            lock=lock,
            rebuild=rebuild,
            pooled_rebuild=pooled_rebuild,
            region_rebuild=region_rebuild,
            read_router=read_router,
        )
        runtime.saved_sequence = corpus.sequence
        return runtime

    def save_if_changed(self) -> bool:
        """Save the indexes when the catalog changed since the last save (blocking)."""
        sequence = self.corpus.sequence
        if sequence == self.saved_sequence:
            return False
        self.corpus.save()
        self.saved_sequence = sequence
        return True

    def live_state(self) -> dict[str, object]:
        """Cheap numbers for metrics scraping."""
        indexes = self.corpus.index_summaries()
        return {
            "cache": self.cache.status().as_dict(),
            "memory_caches": self.memory_caches(),
            "heap": heap_usage(),
            "search_memory": self.pipeline.search_memory,
            "decode_memory": self.indexer.decode_memory,
            "queued": self.batcher.queued,
            "shortlist_queued": self.shortlist.queued,
            "stages": self.stages(),
            "device_copies": {
                kind: summary.full_copies
                for kind, summary in indexes.items()
                if summary.full_copies is not None
            },
            "images": indexes["images"].count,
            "captions": indexes["captions"].count,
            "tensor_rebuild": {
                kind: (progress.done, progress.total)
                for kind, progress in self.rebuild.progress().items()
            },
            "tensors_built": dict(self.rebuild.built),
            "pooled_rebuild": {
                kind: (progress.done, progress.total)
                for kind, progress in self.pooled_rebuild.progress().items()
            },
            "region_rebuild": {
                kind: (progress.done, progress.total)
                for kind, progress in self.region_rebuild.progress().items()
            },
        }

    def stages(self) -> dict[str, dict[str, Any]]:
        """Where each stage runs ("cpu" / "cuda:N") and in what precision. The text encoder
        runs queries in `model.query_precision` (stored captions in fp32); the extractor runs
        fp32; the reranker autocasts to `model.precision` on CUDA only; the
        shortlist is float32 FAISS, on the GPU where its index type can go (shortlist
        `indexes` says per index)."""
        index_devices = {
            kind: summary.device for kind, summary in self.corpus.index_summaries().items()
        }
        on_device = sorted({device for device in index_devices.values() if device != CPU})
        model_device = _device_name(self.model.device)
        reranker_precision = self.model.precision if model_device != CPU else "fp32"
        return {
            "text_encoder": {"device": model_device, "precision": self.model.query_precision},
            "extractor": {"device": _device_name(self.extractor.device), "precision": "fp32"},
            "shortlist": {
                "device": on_device[0] if on_device else CPU,
                "precision": "fp32",
                "indexes": index_devices,
            },
            "reranker": {"device": model_device, "precision": reranker_precision},
        }

    def memory_caches(self) -> dict[str, tuple[int, int]]:
        """{cache: (bytes held, byte budget)} of the caches that live in this process's heap:
        the rerank-tensor LRUs, and the feature cache when it is the in-process one."""
        caches = {
            "image_tensors": (
                self.pipeline.image_tensors.bytes_used,
                self.pipeline.image_tensors.max_bytes,
            ),
            "caption_tensors": (
                self.pipeline.caption_tensors.bytes_used,
                self.pipeline.caption_tensors.max_bytes,
            ),
        }
        if isinstance(self.cache, LocalFeatureCache):
            caches["features"] = (self.cache.bytes_used, self.cache.max_bytes)
        return caches

    async def stop_batchers(self) -> None:
        """Stop the shortlist, rerank, query-encoding and extraction batchers (searches still
        queued get an error)."""
        await self.shortlist.stop()
        await self.batcher.stop()
        await self.pipeline.encoder.stop()
        await self.regions.stop()

    def close(self) -> None:
        """Save and release everything (blocking); the batchers must be stopped first."""
        try:
            self.region_rebuild.stop()
            self.pooled_rebuild.stop()
            self.rebuild.stop()
            self.corpus.close()
            close_cache = getattr(self.cache, "close", None)
            if close_cache is not None:
                close_cache()
        finally:
            # After the corpus (its follower and storage use the router's connections).
            if self.read_router is not None:
                self.read_router.close()
            if self.lock is not None:
                self.lock.release()


@dataclass
class ServiceState:
    """What the app holds: the phase, the runtime once built, and why it failed if it did."""

    settings: Settings
    metrics: ServiceMetrics
    model: RetrievalModel | None = None
    extractor: RegionExtractor | None = None
    phase: Phase = "starting"
    runtime: ServiceRuntime | None = None
    error: str = ""
    # PostgreSQL mode, while the primary does not answer at start: why (no password), else "".
    waiting_for_database: str = ""
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _last_database_problem: str = ""

    async def start(self) -> None:
        """Build the runtime in a worker thread, then start the batcher and the saver."""
        threshold_kib = self.settings.malloc_mmap_threshold_kib
        if threshold_kib > 0 and not fix_mmap_threshold(threshold_kib * 1024):
            logger.info("malloc mmap threshold not set: not glibc")
        top_pad_kib = self.settings.malloc_top_pad_kib
        if top_pad_kib > 0 and not set_top_pad(top_pad_kib * 1024):
            logger.info("malloc top pad not set: not glibc")
        try:
            if self.settings.database:
                runtime = await self._build_once_the_database_answers(self.settings.database)
            else:
                runtime = await asyncio.to_thread(
                    ServiceRuntime.build,
                    self.settings,
                    self.metrics,
                    model=self.model,
                    extractor=self.extractor,
                )
            await runtime.shortlist.start()
            await runtime.batcher.start()
            # Each waits for the one before it to end: regions, pooled vectors, tensors.
            runtime.region_rebuild.start()
            runtime.pooled_rebuild.start()
            runtime.rebuild.start()
        except Exception as error:  # reported by /readyz and /healthz; the process stays up
            logger.exception("the service failed to start")
            self.phase, self.error = "failed", f"{type(error).__name__}: {error}"
            self._ready.set()
            return
        self.runtime = runtime
        self.phase = "ready"
        self._tasks.append(asyncio.create_task(self._save_periodically()))
        if self.settings.heap_trim_interval_s > 0 and can_trim_heap():
            self._tasks.append(asyncio.create_task(self._trim_heap_periodically()))
        self._ready.set()
        indexes = runtime.corpus.index_summaries()  # in memory: no SQLite on the event loop
        logger.info(
            "ready: model %s, extractor %s on %s, %d images, %d captions",
            runtime.model.version,
            runtime.extractor.version,
            runtime.extractor.device,
            indexes["images"].count,
            indexes["captions"].count,
        )

    async def _build_once_the_database_answers(self, url: str) -> ServiceRuntime:
        """PostgreSQL mode: load the model while waiting for the primary to answer, then build
        (migrations, indexes, follower); a primary that goes away before the build is done is
        waited for again. A database that is down at start (compose's start order, a
        restart) is a wait, not a failure: the process stays live and says so on /readyz."""
        waiting = asyncio.create_task(self._wait_for_database(url))
        try:
            model, extractor = await asyncio.to_thread(
                load_model, self.settings, self.model, self.extractor
            )
            await waiting
        except BaseException:
            waiting.cancel()
            raise
        while True:
            try:
                return await asyncio.to_thread(
                    ServiceRuntime.build,
                    self.settings,
                    self.metrics,
                    model=model,
                    extractor=extractor,
                )
            except (DatabaseUnavailableError, psycopg.OperationalError) as error:
                self._database_unreachable(f"database {redacted_url(url)}: {error}")
                await self._wait_for_database(url)

    async def _wait_for_database(self, url: str) -> None:
        """Until the primary answers a query: retry after 0.5 s, doubling up to
        CAMPSEARCH_DATABASE_RETRY_MAX_S, logging once per change of what fails."""
        delay_s = DATABASE_RETRY_FIRST_S
        attempts = 0
        while True:
            attempts += 1
            try:
                await asyncio.to_thread(ping, url)
            except DatabaseUnavailableError as error:
                self._database_unreachable(str(error), attempts=attempts, retry_in_s=delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(2 * delay_s, self.settings.database_retry_max_s)
                continue
            if self.waiting_for_database:
                logger.warning(
                    "database %s answers (after %d attempts): building the indexes",
                    redacted_url(url),
                    attempts,
                )
            self.waiting_for_database = self._last_database_problem = ""
            return

    def _database_unreachable(
        self, reason: str, *, attempts: int = 1, retry_in_s: float = DATABASE_RETRY_FIRST_S
    ) -> None:
        """Record why the replica is not ready yet; log only when the reason changes."""
        if reason != self._last_database_problem:
            logger.warning(
                "%s; retrying (at most %.1f s apart)", reason, self.settings.database_retry_max_s
            )
            self._last_database_problem = reason
        self.waiting_for_database = (
            f"{reason}; attempt {attempts}, next in {retry_in_s:.1f} s (the replica becomes "
            "ready once it answers)"
        )

    def begin(self) -> None:
        """Start loading in the background (the server accepts requests meanwhile)."""
        self._tasks.append(asyncio.create_task(self.start()))

    async def wait_ready(self, timeout_s: float | None = None) -> Phase:
        await asyncio.wait_for(self._ready.wait(), timeout_s)
        return self.phase

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        runtime, self.runtime = self.runtime, None
        if runtime is not None:
            await runtime.stop_batchers()
            await asyncio.to_thread(runtime.close)

    async def _trim_heap_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heap_trim_interval_s)
            await asyncio.to_thread(trim_heap)

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(SAVE_INTERVAL_S)
            runtime = self.runtime
            if runtime is None:
                return
            try:
                await asyncio.to_thread(runtime.save_if_changed)
            except Exception:  # the next start rebuilds from the store; keep serving
                logger.exception("saving the indexes failed; will retry")


def _device_name(device: str | torch.device) -> str:
    """ "cpu" or "cuda:N" (a bare "cuda" means the current CUDA device)."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(resolved)

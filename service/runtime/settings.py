"""Service settings, read from `CAMPSEARCH_*` environment variables (and a `.env` file).

One class holds every knob an operator may turn; validators refuse unsafe combinations at
start-up rather than at the first request. A default that a lower layer also uses (upload and
pixel limits, FAISS search parameters, the feature cache's size and TTL) is that layer's
constant, imported here, so each number is defined once.
"""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from index.cache import DEFAULT_LOCAL_MAX_BYTES, DEFAULT_TTL_S
from index.read_routing import DEFAULT_MAX_LAG_S
from index.shortlist import DEFAULT_EF_SEARCH, DEFAULT_NPROBE
from model.vision.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

MEBIBYTE = 1024 * 1024


# The model stages that may run torch at the same time, each on its own thread.
CONCURRENT_MODEL_STAGES = 3
# Worker threads of one rerank call by default at most: beyond a few the parts get small.
MAX_DEFAULT_RERANK_WORKERS = 4


def usable_cores() -> int:
    """The process's CPU affinity (what a container limits it to)."""
    return len(os.sched_getaffinity(0))


def default_torch_threads() -> int:
    """Threads per torch call when `CAMPSEARCH_TORCH_THREADS` is unset: the usable cores
    shared by the concurrent model stages."""
    return max(1, usable_cores() // CONCURRENT_MODEL_STAGES)


class Settings(BaseSettings):
    """Every setting of the service; the defaults are the embedded laptop setup."""

    model_config = SettingsConfigDict(
        env_prefix="CAMPSEARCH_", env_file=".env", extra="ignore", frozen=True
    )

    data_dir: Path = Path("data")
    checkpoint: Path | None = Field(
        default=None, description="Model checkpoint; None means the shipped default model."
    )
    extractor: Literal["grid", "detectron2"] | None = Field(
        default=None,
        description="The region extractor; unset: the one the checkpoint's metadata names "
        "(its features are what the model was trained on). Set, it must agree with it.",
    )
    detectron2_config: Path | None = Field(
        default=None,
        description="detectron2 only: the bottom-up-attention config yaml; unset: the one the "
        "checkpoint's metadata names.",
    )
    detectron2_weights: Path | None = Field(
        default=None,
        description="detectron2 only: the detector's weights; unset: the checkpoint's.",
    )
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu', 'cuda:0'")
    torch_threads: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Threads each torch call may use on the CPU (torch.set_num_threads); unset: a third "
            "of the usable cores, at least 1 (`default_torch_threads`); 0: torch's default, one "
            "per core. The service runs its model stages (query encoding, reranking, "
            "extraction) on their own threads at once, so one team per core oversubscribes: on "
            "a busy 2-core host one rerank of 100 pairs took 52 ms on 1 thread and 293 ms on 2 "
            "(README, speed)."
        ),
    )
    rerank_workers: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Threads one rerank call splits its pairs over on the CPU (each runs torch calls "
            "of CAMPSEARCH_TORCH_THREADS threads; parts of at least 32 pairs); unset: the "
            f"usable cores / CAMPSEARCH_TORCH_THREADS, at most {MAX_DEFAULT_RERANK_WORKERS} "
            "(1 when torch threads are 0); 1: no split. One search's 100 pairs then use a "
            "second idle core: 22.4 -> 15.2 ms on the 2-core dev box (README, speed)."
        ),
    )
    rerank_precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description=(
            "The reranker's pair scoring on the model's device (CUDA or CPU): fp32, or "
            "autocast in bf16/fp16 (softmaxes, norms and the fused score stay fp32)."
        ),
    )
    query_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description=(
            "A search query's text encoder (MiniLM): fp32, or bf16 linear layers with the "
            "residual stream and norms in fp32 (1.46x faster on a CPU with AVX512-BF16; "
            "rankings of real queries kept, tests/test_precision.py). auto: bf16 where the "
            "device multiplies bf16 in hardware, else fp32. Stored captions are always "
            "encoded in fp32."
        ),
    )
    redis_url: str | None = Field(
        default=None, description="redis://host:port/db; without it an in-process cache serves."
    )
    redis_cluster: bool = Field(
        default=False,
        description="CAMPSEARCH_REDIS_URL names one node of a Redis Cluster: use a "
        "cluster-aware client (it discovers the other nodes; same keys).",
    )
    cache_ttl_s: int = Field(default=DEFAULT_TTL_S, ge=1)
    database_url: SecretStr | None = Field(
        default=None,
        description="postgresql://user:password@host:5432/db, the PostgreSQL primary (every "
        "write): keep the catalog and stored features there, shared by several API replicas "
        "(each follows the database's changes); CAMPSEARCH_DATA_DIR then only holds the images "
        "folder, which every replica mounts. Unset: the embedded stores (SQLite + LMDB + FAISS "
        "files), one process per data dir.",
    )
    database_read_url: SecretStr | None = Field(
        default=None,
        description="A streaming replica of CAMPSEARCH_DATABASE_URL for metadata and feature "
        "reads; while it is down or further behind than CAMPSEARCH_DATABASE_MAX_LAG_S (or "
        "behind what this replica already indexed), reads go to the primary.",
    )
    database_max_lag_s: float = Field(
        default=DEFAULT_MAX_LAG_S,
        gt=0,
        description="Seconds of writes a read replica may miss and still serve reads.",
    )
    database_retry_max_s: float = Field(
        default=5.0,
        gt=0,
        description="While the PostgreSQL primary does not answer at start, retry after 0.5 s, "
        "doubling up to this many seconds; the replica is live (/healthz) but not ready "
        "(/readyz 503 says why) meanwhile.",
    )
    index_factory: str = Field(
        default="auto", description="A FAISS factory string, or 'auto' to pick by corpus size."
    )
    nprobe: int = Field(default=DEFAULT_NPROBE, ge=1)
    ef_search: int = Field(default=DEFAULT_EF_SEARCH, ge=1)

    image_cache_mib: int = Field(
        default=512,
        ge=0,
        description="In-process LRU of per-image rerank tensors (~0.14 MiB an image with the "
        "default model, ~1 MiB at d=1024); 0 turns it off.",
    )
    caption_cache_mib: int = Field(
        default=128,
        ge=0,
        description="In-process LRU of per-caption rerank tensors (~20x smaller than an image's).",
    )
    feature_cache_mib: int = Field(
        default=DEFAULT_LOCAL_MAX_BYTES // MEBIBYTE,
        ge=0,
        description="In-process cache of stored records in front of LMDB (region features "
        "~0.12 MiB a photo with 49 grid regions, rerank tensors ~0.07 MiB a photo), used only "
        "without CAMPSEARCH_REDIS_URL.",
    )
    keep_region_features: bool = Field(
        default=True,
        description="Keep each photo's raw region features beside its stored rerank tensors "
        "(float16: ~123 KiB a photo with 49 grid regions). false drops them once the tensors "
        "are stored (~71 KiB a photo left): searches never need them; a new model then "
        "re-extracts them from the stored photos in the background before it rebuilds.",
    )
    search_memory_mib: int = Field(
        default=256,
        ge=0,
        description="Rerank tensors and region features that searches in flight may hold "
        "together (with the default model an image candidate ~0.14 MiB, +0.12 MiB when it misses "
        "the cache, a caption candidate ~0.14 MiB); past it a search waits its turn, within "
        "CAMPSEARCH_REQUEST_TIMEOUT_S. 0 turns the bound off.",
    )
    decode_memory_mib: int = Field(
        default=512,
        ge=0,
        description="Decoded pixels that photo uploads (searches and ingest) may hold together, "
        "reserved from the header's size before decoding (7 bytes a pixel: the decoded pixels "
        "and an upright RGB copy, + 8 MiB for the extractor's resized input; a 12-megapixel "
        "photo ~88 MiB); past it an upload waits its turn, within CAMPSEARCH_REQUEST_TIMEOUT_S, "
        "then 503. 0 turns the bound off.",
    )

    heap_trim_interval_s: float = Field(
        default=30.0,
        ge=0,
        description="Seconds between handing freed heap memory back to the OS (glibc "
        "malloc_trim; service/runtime/heap.py); 0 turns it off.",
    )
    malloc_mmap_threshold_kib: int = Field(
        default=64,
        ge=0,
        description="Allocations of at least this many KiB get their own memory mapping, "
        "returned to the OS when freed (glibc mallopt M_MMAP_THRESHOLD, fixed; "
        "service/runtime/heap.py); 0 keeps glibc's self-raising threshold.",
    )
    malloc_top_pad_kib: int = Field(
        default=32 * 1024,
        ge=0,
        le=1024 * 1024,
        description="Free space each allocator arena keeps above its top (glibc mallopt "
        "M_TOP_PAD; service/runtime/heap.py), so the reranker's intermediates stay in its "
        "worker's arena between calls instead of being mapped and faulted in on each; "
        "0 sets no pad.",
    )

    max_upload_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1024)
    max_image_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    max_query_chars: int = Field(default=2_000, ge=1)
    max_limit: int = Field(default=100, ge=1)
    max_candidates: int = Field(default=1_000, ge=1)

    batch_max_size: int = Field(default=16, ge=1, description="Queries per reranker call.")
    batch_max_wait_ms: float = Field(default=5.0, ge=0)
    queue_max_size: int = Field(default=256, ge=1, description="Waiting queries before 429.")
    request_timeout_s: float = Field(default=30.0, gt=0)

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    allow_anonymous_writes: bool = False
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins a browser may call the API from; none by default"
    )

    rate_limit_window_s: int = Field(
        default=60, ge=1, description="Length of one rate-limit window (fixed windows)."
    )
    rate_limit_requests: int = Field(
        default=3_000, ge=0, description="/v1 requests per client per window; 0 turns it off."
    )
    rate_limit_writes: int = Field(
        default=1_200, ge=0, description="Of those, writes (POST/DELETE of images and captions)."
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    expose_metrics: bool | None = Field(
        default=None,
        description="Whether the API port answers /metrics; unset: only when it binds a "
        "loopback host (a public bind keeps them for a proxy's allow-list or the local network).",
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        """Accept a comma-separated string from the environment as well as a list."""
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_are_long(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(len(key.get_secret_value()) < 16 for key in keys):
            raise ValueError("every API key must have at least 16 characters")
        return keys

    @model_validator(mode="after")
    def _refuse_open_writes_on_the_network(self) -> Settings:
        """Without API keys, writes are anonymous: only allow that on a loopback address."""
        if not self.api_keys and not self.allow_anonymous_writes and not _is_loopback(self.host):
            raise ValueError(
                f"refusing to bind {self.host!r} without API keys: set CAMPSEARCH_API_KEYS, "
                "or CAMPSEARCH_ALLOW_ANONYMOUS_WRITES=true to accept anonymous writes"
            )
        return self

    @field_validator("database_url", "database_read_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, url: object) -> object:
        """compose passes `${CAMPSEARCH_DATABASE_READ_URL:-}`: an empty value means none."""
        return None if isinstance(url, str) and not url.strip() else url

    @field_validator("database_url", "database_read_url")
    @classmethod
    def _is_postgresql(cls, url: SecretStr | None) -> SecretStr | None:
        if url is not None and not url.get_secret_value().startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError("must be a postgresql:// URL")
        return url

    @model_validator(mode="after")
    def _read_replica_needs_a_primary(self) -> Settings:
        if self.database_read_url and not self.database_url:
            raise ValueError(
                "CAMPSEARCH_DATABASE_READ_URL is a replica of CAMPSEARCH_DATABASE_URL: set both"
            )
        return self

    @property
    def threads_per_torch_call(self) -> int | None:
        """What `torch.set_num_threads` gets at start; None leaves torch's default."""
        if self.torch_threads is None:
            return default_torch_threads()
        return self.torch_threads or None

    @property
    def rerank_threads(self) -> int:
        """Threads one CPU rerank call splits its pairs over (`PairReranker`'s `workers`)."""
        if self.rerank_workers is not None:
            return self.rerank_workers
        per_call = self.threads_per_torch_call
        if per_call is None:  # torch's default already puts every core on each call
            return 1
        return max(1, min(MAX_DEFAULT_RERANK_WORKERS, usable_cores() // per_call))

    @property
    def database(self) -> str | None:
        """The PostgreSQL primary's URL (with its password), or None in the embedded mode."""
        return self.database_url.get_secret_value() if self.database_url else None

    @property
    def database_read(self) -> str | None:
        """The read replica's URL (with its password), or None."""
        return self.database_read_url.get_secret_value() if self.database_read_url else None

    @property
    def writes_need_key(self) -> bool:
        return bool(self.api_keys)

    @property
    def metrics_exposed(self) -> bool:
        """/metrics on the API port: as set, or by default only on a loopback bind."""
        if self.expose_metrics is not None:
            return self.expose_metrics
        return _is_loopback(self.host)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests build their own `Settings(...)` instead."""
    return Settings()

"""The feature cache in front of the durable store: Redis, or an in-process LRU without Redis.

Keys are ``campsearch:{extractor}:{version}:{id}`` where ``{extractor}:{version}`` is the
*keyspace* (`cache_keyspace`): the producer of the bytes (an extractor and its version for raw
region features, an extractor and a model version for per-image precomputed projections). A
new version therefore never reads stale values; old keys simply expire (TTL).

Values are `index.codec` records, the same bytes the durable store holds.

With `cluster=True` (CAMPSEARCH_REDIS_CLUSTER=true) the URL names one node of a Redis Cluster
and a cluster-aware client (`redis.cluster.RedisCluster`) finds the rest. The keys are the same,
without hash tags, so a batch's keys spread over every node; MGET becomes `mget_nonatomic`
(one MGET per hash slot, pipelined per node), DEL is split by slot the same way, and the
write-back pipeline is sent node by node (bench/redis_cluster.py measures what that costs).

A cache is an optimisation, never a dependency: every failure (refused connection, timeout,
OOM) is counted, turns the cache unhealthy and returns "miss" so the caller reads the durable
store. While unhealthy, Redis is not touched for `retry_after_s`; the next call after that
tries again, so a Redis that comes back is used again without a restart.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from index.codec import decode_arrays
from index.feature_store import FeatureStore

logger = logging.getLogger(__name__)

KEY_PREFIX = "campsearch"
DEFAULT_TTL_S = 7 * 24 * 3600
DEFAULT_SOCKET_TIMEOUT_S = 0.25  # a cache slower than this is worse than the durable store
DEFAULT_RETRY_AFTER_S = 1.0
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_LOCAL_MAX_BYTES = 512 * 1024 * 1024
# What a failed cache call may raise: a server's errors, and a cluster client's own (no node
# reachable, slots not covered).
CACHE_ERRORS = (redis.RedisError, RedisClusterException)
KEYSPACE_PART = re.compile(r"^[A-Za-z0-9_.@+-]{1,100}$")


def cache_keyspace(extractor: str, version: str) -> str:
    """The keyspace ``{extractor}:{version}``; both parts must be short and colon-free."""
    for part in (extractor, version):
        if not KEYSPACE_PART.match(part):
            raise ValueError(f"cache keyspace part {part!r} must match {KEYSPACE_PART.pattern}")
    return f"{extractor}:{version}"


def cache_key(keyspace: str, item_id: int, prefix: str = KEY_PREFIX) -> str:
    return f"{prefix}:{keyspace}:{int(item_id)}"


@dataclass
class CacheStats:
    """Counters since start, per id (not per request). The service exports them as metrics."""

    hits: int = 0
    misses: int = 0
    errors: int = 0  # calls that failed (Redis down, slow, OOM)
    bypassed: int = 0  # calls skipped because the cache was unhealthy and backing off


@dataclass(frozen=True)
class CacheStatus:
    backend: str  # "redis" or "local"
    healthy: bool
    detail: str  # the last error when unhealthy, else a short description
    stats: CacheStats

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "stats": asdict(self.stats)}


class FeatureCache(Protocol):
    """What `CachedFeatureStore` needs from a cache. Implementations never raise on I/O."""

    @property
    def healthy(self) -> bool: ...

    def get_many(self, keyspace: str, ids: Sequence[int]) -> dict[int, bytes]: ...

    def set_many(self, keyspace: str, values: Mapping[int, bytes]) -> None: ...

    def delete_many(self, keyspace: str, ids: Iterable[int]) -> None: ...

    def check(self) -> bool: ...

    def status(self) -> CacheStatus: ...


class RedisFeatureCache:
    """Redis as the feature cache: one MGET per batch, write-back in one pipeline with a TTL.

    Thread-safe (redis-py's connection pools). Works with a single Redis, a replica behind a
    proxy, or (`cluster=True`) a Redis Cluster.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_s: int = DEFAULT_TTL_S,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        retry_after_s: float = DEFAULT_RETRY_AFTER_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        prefix: str = KEY_PREFIX,
        cluster: bool = False,
    ) -> None:
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.retry_after_s = retry_after_s
        self.cluster = cluster
        self._url = url
        # No client-side retries: a failed call falls back to the store at once and the
        # back-off below decides when Redis is tried again.
        self._options = {
            "socket_connect_timeout": socket_timeout_s,
            "socket_timeout": socket_timeout_s,
            "max_connections": max_connections,
            "retry": Retry(NoBackoff(), 0),
        }
        self._pool: redis.ConnectionPool | None = None
        self._cluster_client: RedisCluster | None = None
        if not cluster:
            self._pool = redis.ConnectionPool.from_url(url, **self._options)
            self._single_client = redis.Redis(connection_pool=self._pool)
        self._address = _redacted(url) + (" (cluster)" if cluster else "")
        self._lock = threading.Lock()
        self._healthy = True
        self._last_error = ""
        self._retry_at = 0.0
        self.stats = CacheStats()

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def _client(self) -> redis.Redis | RedisCluster:
        """The client; a cluster client is made on first use, since making one asks a node
        for the slot map (raising when none answers)."""
        if not self.cluster:
            return self._single_client
        with self._lock:
            if self._cluster_client is None:
                self._cluster_client = RedisCluster.from_url(self._url, **self._options)
            return self._cluster_client

    def _mget(self, keys: list[str]) -> list[bytes | None]:
        client = self._client
        if isinstance(client, RedisCluster):
            return client.mget_nonatomic(keys)
        return client.mget(keys)

    def get_many(self, keyspace: str, ids: Sequence[int]) -> dict[int, bytes]:
        """Cached values of `ids` (ONE MGET, one per slot in a cluster); absent ids are
        misses. Never raises on I/O."""
        ids = [int(i) for i in ids]
        if not ids or not self._may_try():
            return {}
        try:
            values = self._mget([cache_key(keyspace, i, self.prefix) for i in ids])
        except CACHE_ERRORS as error:
            self._fail(error)
            return {}
        self._succeed()
        found = {i: value for i, value in zip(ids, values, strict=True) if value is not None}
        with self._lock:
            self.stats.hits += len(found)
            self.stats.misses += len(ids) - len(found)
        return found

    def set_many(self, keyspace: str, values: Mapping[int, bytes]) -> None:
        """Write `values` back with the TTL, in one pipeline round trip. Never raises on I/O."""
        if not values or not self._may_try():
            return
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for item_id, value in values.items():
                    pipe.set(cache_key(keyspace, item_id, self.prefix), value, ex=self.ttl_s)
                pipe.execute()
        except CACHE_ERRORS as error:
            self._fail(error)
            return
        self._succeed()

    def delete_many(self, keyspace: str, ids: Iterable[int]) -> None:
        """Drop `ids` (after a delete in the store). A failure only leaves values to expire."""
        keys = [cache_key(keyspace, i, self.prefix) for i in ids]
        if not keys or not self._may_try():
            return
        try:
            self._client.delete(*keys)
        except CACHE_ERRORS as error:
            self._fail(error)
            return
        self._succeed()

    def check(self) -> bool:
        """PING now, ignoring the back-off (for readiness probes); updates `healthy`."""
        try:
            self._client.ping()
        except CACHE_ERRORS as error:
            self._fail(error)
            return False
        self._succeed()
        return True

    def status(self) -> CacheStatus:
        detail = self._address if self._healthy else f"{self._address}: {self._last_error}"
        return CacheStatus("redis", self._healthy, detail, self.stats)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.disconnect()
        with self._lock:
            if self._cluster_client is not None:
                self._cluster_client.close()
                self._cluster_client = None

    def _may_try(self) -> bool:
        if self._healthy or time.monotonic() >= self._retry_at:
            return True
        with self._lock:
            self.stats.bypassed += 1
        return False

    def _fail(self, error: Exception) -> None:
        with self._lock:
            self.stats.errors += 1
            if self._healthy:
                logger.warning(
                    "Redis cache at %s failed (%s); reading the durable store, retrying in %.1fs",
                    self._address,
                    error,
                    self.retry_after_s,
                )
            self._healthy = False
            self._last_error = f"{type(error).__name__}: {error}"
            self._retry_at = time.monotonic() + self.retry_after_s
        # Drop sockets to the dead server so the next try opens fresh ones; a cluster client
        # is made anew (it re-reads the slot map from whichever node answers).
        if self._pool is not None:
            self._pool.disconnect(inuse_connections=False)
        with self._lock:
            stale, self._cluster_client = self._cluster_client, None
        if stale is not None:
            stale.close()

    def _succeed(self) -> None:
        if not self._healthy:
            with self._lock:
                if not self._healthy:
                    logger.warning("Redis cache at %s is back", self._address)
                self._healthy = True
                self._last_error = ""


class LocalFeatureCache:
    """In-process LRU with a byte budget and a TTL, for when no Redis URL is configured."""

    def __init__(self, *, max_bytes: int = DEFAULT_LOCAL_MAX_BYTES, ttl_s: int = DEFAULT_TTL_S):
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @property
    def healthy(self) -> bool:
        return True

    @property
    def bytes_used(self) -> int:
        """Bytes of cached values held now (at most `max_bytes`)."""
        return self._bytes

    def get_many(self, keyspace: str, ids: Sequence[int]) -> dict[int, bytes]:
        now = time.monotonic()
        found: dict[int, bytes] = {}
        with self._lock:
            for item_id in ids:
                key = cache_key(keyspace, item_id)
                entry = self._entries.get(key)
                if entry is None:
                    continue
                if entry[0] <= now:
                    self._drop(key)
                    continue
                self._entries.move_to_end(key)
                found[int(item_id)] = entry[1]
            self.stats.hits += len(found)
            self.stats.misses += len(ids) - len(found)
        return found

    def set_many(self, keyspace: str, values: Mapping[int, bytes]) -> None:
        expires_at = time.monotonic() + self.ttl_s
        with self._lock:
            for item_id, value in values.items():
                if len(value) > self.max_bytes:
                    continue
                key = cache_key(keyspace, item_id)
                self._drop(key)
                self._entries[key] = (expires_at, value)
                self._bytes += len(value)
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def delete_many(self, keyspace: str, ids: Iterable[int]) -> None:
        with self._lock:
            for item_id in ids:
                self._drop(cache_key(keyspace, item_id))

    def check(self) -> bool:
        return True

    def status(self) -> CacheStatus:
        detail = f"in-process LRU, {self._bytes} of {self.max_bytes} bytes"
        return CacheStatus("local", True, detail, self.stats)

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[1])


class CachedFeatureStore:
    """Read-through access to one namespace of the durable store via a cache.

    `get_many` costs one cache round trip (MGET), one store transaction for the misses and
    one write-back pipeline. With the cache down it is one store transaction.
    """

    def __init__(
        self, store: FeatureStore, cache: FeatureCache, *, namespace: str, keyspace: str
    ) -> None:
        self.store = store
        self.cache = cache
        self.namespace = namespace
        self.keyspace = keyspace

    def get_many_encoded(self, ids: Sequence[int]) -> dict[int, bytes]:
        """Encoded records of the ids that exist (absent ids are absent), in `ids` order."""
        ids = [int(i) for i in ids]
        cached = self.cache.get_many(self.keyspace, ids)
        missing = [i for i in ids if i not in cached]
        loaded = self.store.get_many_encoded(self.namespace, missing) if missing else {}
        if loaded:
            self.cache.set_many(self.keyspace, loaded)
        return {
            i: cached[i] if i in cached else loaded[i] for i in ids if i in cached or i in loaded
        }

    def get_many(self, ids: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
        """{id: {name: array}} for the ids that exist; arrays are read-only."""
        return {i: decode_arrays(value) for i, value in self.get_many_encoded(ids).items()}

    def invalidate(self, ids: Iterable[int]) -> None:
        self.cache.delete_many(self.keyspace, ids)


def _redacted(url: str) -> str:
    """The URL without its password, for logs and status."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)

"""The Redis cache against a real redis-server and a real 3-node Redis Cluster (each Redis
test runs against both): hits, misses, write-back, namespacing, and a Redis killed and
restarted in the middle of a run."""

from __future__ import annotations

import time

import numpy as np
import pytest

from index.cache import (
    CachedFeatureStore,
    LocalFeatureCache,
    RedisFeatureCache,
    cache_key,
    cache_keyspace,
)
from index.codec import encode_arrays
from index.feature_store import FeatureStore

NAMESPACE = "regions:grid:v1"
KEYSPACE = cache_keyspace("grid", "v1")
RETRY_AFTER_S = 0.3


def _records(count: int, seed: int = 0) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        i: {
            "features": rng.standard_normal((49, 64)).astype(np.float16),
            "boxes": rng.random((49, 4), dtype=np.float32),
        }
        for i in range(1, count + 1)
    }


@pytest.fixture
def store(tmp_path):
    with FeatureStore(tmp_path / "features") as feature_store:
        feature_store.put_many(NAMESPACE, _records(10))
        yield feature_store


@pytest.fixture(params=["single", "cluster"])
def redis_server(request, tmp_path_factory):
    """One redis-server, or a Redis Cluster of three (the same key behaviours must hold)."""
    from redis_server import RedisClusterServers, RedisServer

    workdir = tmp_path_factory.mktemp("redis")
    if request.param == "cluster":
        server = RedisClusterServers(workdir).start()
    else:
        server = RedisServer(workdir).start()
    yield server
    server.kill()


@pytest.fixture
def cache(redis_server):
    from redis_server import RedisClusterServers

    redis_cache = RedisFeatureCache(
        redis_server.url,
        ttl_s=60,
        retry_after_s=RETRY_AFTER_S,
        cluster=isinstance(redis_server, RedisClusterServers),
    )
    yield redis_cache
    redis_cache.close()


def _assert_same(got: dict[int, dict[str, np.ndarray]], ids: list[int]) -> None:
    expected = _records(10)
    assert sorted(got) == sorted(ids)
    for i in ids:
        np.testing.assert_array_equal(got[i]["features"], expected[i]["features"])
        np.testing.assert_array_equal(got[i]["boxes"], expected[i]["boxes"])


def test_miss_then_write_back_then_hit(store, cache, redis_server):
    cached = CachedFeatureStore(store, cache, namespace=NAMESPACE, keyspace=KEYSPACE)
    _assert_same(cached.get_many([1, 2, 3, 99]), [1, 2, 3])
    assert (cache.stats.hits, cache.stats.misses) == (0, 4)

    client = redis_server.client()
    assert client.get(cache_key(KEYSPACE, 2)) == store.get_many_encoded(NAMESPACE, [2])[2]
    assert 0 < client.ttl(cache_key(KEYSPACE, 2)) <= 60
    assert client.get(cache_key(KEYSPACE, 99)) is None

    _assert_same(cached.get_many([1, 2, 3, 4]), [1, 2, 3, 4])
    assert (cache.stats.hits, cache.stats.misses) == (3, 5)
    assert cache.healthy


def test_hits_come_from_redis_not_the_store(store, cache):
    """A value present only in Redis is served: the cache really is read first."""
    cached = CachedFeatureStore(store, cache, namespace=NAMESPACE, keyspace=KEYSPACE)
    marker = {"features": np.full((2, 3), 7, np.float16), "boxes": np.zeros((2, 4), np.float32)}
    cache.set_many(KEYSPACE, {5: encode_arrays(marker)})
    got = cached.get_many([5])
    np.testing.assert_array_equal(got[5]["features"], marker["features"])


def test_keys_are_namespaced_by_extractor_and_version(store, cache, redis_server):
    v1 = CachedFeatureStore(store, cache, namespace=NAMESPACE, keyspace=KEYSPACE)
    v1.get_many([1])
    other = cache.get_many(cache_keyspace("grid", "v2"), [1])
    assert other == {}
    assert redis_server.keys("campsearch:*") == [b"campsearch:grid:v1:1"]
    with pytest.raises(ValueError):
        cache_keyspace("grid:evil", "v1")


def test_invalidate_removes_keys(store, cache, redis_server):
    cached = CachedFeatureStore(store, cache, namespace=NAMESPACE, keyspace=KEYSPACE)
    cached.get_many([1, 2])
    cached.invalidate([1])
    assert redis_server.client().exists(cache_key(KEYSPACE, 1)) == 0
    assert redis_server.client().exists(cache_key(KEYSPACE, 2)) == 1


def test_redis_killed_then_restarted(store, cache, redis_server):
    cached = CachedFeatureStore(store, cache, namespace=NAMESPACE, keyspace=KEYSPACE)
    _assert_same(cached.get_many([1, 2]), [1, 2])
    assert cache.healthy

    redis_server.kill()
    started = time.monotonic()
    _assert_same(cached.get_many([1, 2, 3]), [1, 2, 3])  # straight from LMDB
    assert time.monotonic() - started < 1.0
    assert not cache.healthy
    status = cache.status()
    assert not status.healthy and status.detail and status.stats.errors >= 1
    _assert_same(cached.get_many([4]), [4])  # backing off: Redis not even tried
    assert cache.stats.bypassed >= 1
    assert not cache.check()

    redis_server.start()  # same port, empty (no persistence)
    time.sleep(RETRY_AFTER_S + 0.1)
    _assert_same(cached.get_many([1, 2]), [1, 2])  # miss, written back to the new server
    assert cache.healthy
    hits_before = cache.stats.hits
    _assert_same(cached.get_many([1, 2]), [1, 2])
    assert cache.stats.hits == hits_before + 2
    assert redis_server.client().exists(cache_key(KEYSPACE, 1)) == 1


@pytest.mark.parametrize("cluster", [False, True], ids=["single", "cluster"])
def test_unreachable_redis_from_the_start(store, cluster):
    from redis_server import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    cache = RedisFeatureCache(url, retry_after_s=RETRY_AFTER_S, cluster=cluster)
    cached = CachedFeatureStore(store, cache, namespace=NAMESPACE, keyspace=KEYSPACE)
    _assert_same(cached.get_many([1, 2]), [1, 2])
    assert not cache.healthy and cache.status().backend == "redis"
    assert not cache.check()


def test_a_cluster_batch_spans_every_node(store, tmp_path):
    """Ten ids land on all three nodes (no hash tags: the keys are the single-Redis keys), and
    one get_many still answers every one of them."""
    from redis_server import RedisClusterServers

    with RedisClusterServers(tmp_path / "cluster") as servers:
        cache = RedisFeatureCache(servers.url, ttl_s=60, cluster=True)
        try:
            cached = CachedFeatureStore(store, cache, namespace=NAMESPACE, keyspace=KEYSPACE)
            ids = list(range(1, 11))
            _assert_same(cached.get_many(ids), ids)
            nodes = {servers.node_of(cache_key(KEYSPACE, i)) for i in ids}
            assert nodes == {0, 1, 2}
            hits_before = cache.stats.hits
            _assert_same(cached.get_many(ids), ids)
            assert cache.stats.hits == hits_before + 10
            cache.delete_many(KEYSPACE, ids)
            assert servers.keys("campsearch:*") == []
            assert "(cluster)" in cache.status().detail
        finally:
            cache.close()


def test_local_cache_lru_budget_and_ttl(store):
    one_record = len(store.get_many_encoded(NAMESPACE, [1])[1])
    cache = LocalFeatureCache(max_bytes=3 * one_record, ttl_s=60)
    cached = CachedFeatureStore(store, cache, namespace=NAMESPACE, keyspace=KEYSPACE)
    _assert_same(cached.get_many([1, 2, 3, 4]), [1, 2, 3, 4])
    assert sorted(cache.get_many(KEYSPACE, [1, 2, 3, 4])) == [2, 3, 4]  # 1 evicted (LRU)

    expiring = LocalFeatureCache(ttl_s=0)
    expiring.set_many(KEYSPACE, {1: b"x"})
    assert expiring.get_many(KEYSPACE, [1]) == {}

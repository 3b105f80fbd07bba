"""The corpus over the service's one `ReadRouter` (a real primary and a streaming read replica):
searches' reads go to the replica only once it holds everything this process has indexed, the
follower reads the change log on the primary, and a paused (lagging) replica never hides a
just-written item, on the writer or on another process."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import psycopg
import pytest
from postgres_cluster import (
    PostgresServer,
    current_wal_lsn,
    postgres_available,
    primary_and_replica,
)
from test_postgres_corpus import OPTIONS, REPLICA_DEADLINE_S, _add, _eventually, _top_image

from index.corpus import Corpus
from index.read_routing import ReadRouter

pytestmark = pytest.mark.skipif(not postgres_available(), reason="no PostgreSQL binaries")


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    with primary_and_replica() as servers:
        yield servers


def _router(primary: PostgresServer, replica: PostgresServer) -> ReadRouter:
    return ReadRouter(primary.url, replica.url, check_interval_s=0.1, max_lag_s=30.0)


def _set_replay(replica: PostgresServer, paused: bool) -> None:
    with replica.connect() as conn:
        conn.execute("SELECT pg_wal_replay_pause()" if paused else "SELECT pg_wal_replay_resume()")


def _fresh_schema(primary: PostgresServer) -> None:
    """Each test starts on empty tables (the module shares one cluster)."""
    with psycopg.connect(primary.url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")


def test_a_lagging_replica_never_hides_a_just_indexed_item(tmp_path, cluster):
    primary, replica = cluster
    _fresh_schema(primary)
    rng = np.random.default_rng(3)
    with (
        _router(primary, replica) as router_a,
        _router(primary, replica) as router_b,
        Corpus.open(tmp_path / "shared", read_router=router_a, **OPTIONS) as writer,
        Corpus.open(tmp_path / "shared", read_router=router_b, **OPTIONS) as other,
    ):
        _add(writer, 0, rng)
        replica.wait_replayed(current_wal_lsn(primary))
        router_a.probe()
        assert router_a.reads_from() == "replica"
        _set_replay(replica, paused=True)
        try:
            added = _add(writer, 1, rng)
            image_id = added.image.id
            # The writer reads its own write: the paused replica has not replayed it, so the
            # read goes to the primary (min_lsn = the write's WAL position).
            assert writer.get_image(image_id) == added.image
            assert set(writer.captions_of_images([image_id])[image_id]) == set(added.captions)
            # Another process finds it through its follower (change log on the primary) and
            # reads its metadata and features although the replica still lacks them.
            vector = writer.get_pooled("images", [image_id])[image_id]
            assert _eventually(lambda: _top_image(other, vector) == image_id, REPLICA_DEADLINE_S)
            assert other.get_image(image_id) == added.image
            assert other.get_region_features([image_id])
            with replica.connect() as conn:
                rows = conn.execute("SELECT count(*) FROM images WHERE id = %s", (image_id,))
                assert rows.fetchone()[0] == 0  # the replica really lags
        finally:
            _set_replay(replica, paused=False)


def test_reads_are_served_by_the_replica_once_it_caught_up(tmp_path, cluster):
    """With the primary stopped, a caught-up replica still serves the corpus's reads (so they
    were going there); writes answer DatabaseUnavailableError, and work again after."""
    primary, replica = cluster
    _fresh_schema(primary)
    rng = np.random.default_rng(4)
    with (
        _router(primary, replica) as router,
        Corpus.open(tmp_path / "shared", read_router=router, **OPTIONS) as corpus,
    ):
        added = _add(corpus, 0, rng)
        replica.wait_replayed(current_wal_lsn(primary))
        primary.stop()
        try:
            assert _eventually(lambda: not router.status()["primary"]["up"], 5.0) is not None
            assert router.can_read and router.reads_from() == "replica"
            assert corpus.get_image(added.image.id) == added.image
            from index.errors import DatabaseUnavailableError

            with pytest.raises(DatabaseUnavailableError):
                _add(corpus, 1, rng)
        finally:
            primary.start()
        assert _eventually(lambda: router.status()["primary"]["up"], 5.0) is not None
        again = _add(corpus, 2, rng)
        assert corpus.get_image(again.image.id) == again.image
        assert corpus.count_images() == 2

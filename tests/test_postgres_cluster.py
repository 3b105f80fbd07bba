"""tests/postgres_cluster.py itself: a real primary streams to a real hot standby, and a
killed standby catches up when it starts again."""

from __future__ import annotations

import psycopg
import pytest
from postgres_cluster import current_wal_lsn, postgres_available, primary_and_replica

pytestmark = pytest.mark.skipif(
    not postgres_available(), reason="Debian's PostgreSQL 15 binaries are not installed"
)


@pytest.fixture(scope="module")
def cluster():
    with primary_and_replica() as servers:
        yield servers


def test_ports_are_not_the_default_one(cluster):
    primary, replica = cluster
    assert 5432 not in (primary.port, replica.port)
    assert primary.port != replica.port


def test_a_row_written_on_the_primary_appears_on_the_replica(cluster):
    primary, replica = cluster
    with primary.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS notes (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO notes VALUES (1, 'streamed')")
    replica.wait_replayed(current_wal_lsn(primary))
    with replica.connect() as conn:
        assert conn.execute("SELECT body FROM notes WHERE id = 1").fetchone() == ("streamed",)
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        # A hot standby refuses writes.
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO notes VALUES (2, 'nope')")


def test_killed_replica_catches_up_after_restart(cluster):
    primary, replica = cluster
    with primary.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS later (id int PRIMARY KEY)")
    replica.kill()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(replica.url, connect_timeout=2)
    with primary.connect() as conn:
        conn.execute("INSERT INTO later SELECT generate_series(1, 500)")
    replica.start()
    replica.wait_replayed(current_wal_lsn(primary))
    with replica.connect() as conn:
        assert conn.execute("SELECT count(*) FROM later").fetchone() == (500,)


def test_killed_primary_keeps_every_committed_row(cluster):
    primary, replica = cluster
    with primary.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS durable (id int PRIMARY KEY)")
        conn.execute("INSERT INTO durable SELECT generate_series(1, 100)")
    primary.kill()
    primary.start()  # crash recovery replays the WAL
    with primary.connect() as conn:
        assert conn.execute("SELECT count(*) FROM durable").fetchone() == (100,)
    replica.wait_replayed(current_wal_lsn(primary))

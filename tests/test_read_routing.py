"""index/read_routing.py against a real primary and a real streaming replica
(tests/postgres_cluster.py): reads on the replica, back on the primary while the replica is
down or lagging, read-your-writes, and a killed primary refusing writes with a typed error
while losing nothing it acknowledged."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from postgres_cluster import (
    current_wal_lsn,
    free_port,
    postgres_available,
    primary_and_replica,
)

from index.errors import DatabaseUnavailableError
from index.read_routing import ReadRouter, lsn_to_int

pytestmark = pytest.mark.skipif(
    not postgres_available(), reason="Debian's PostgreSQL 15 binaries are not installed"
)

WAIT_S = 30.0


@pytest.fixture(scope="module")
def cluster():
    with primary_and_replica() as (primary, replica):
        with primary.connect() as conn:
            conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, body text NOT NULL)")
        replica.wait_replayed(current_wal_lsn(primary))
        yield primary, replica


@pytest.fixture
def router(cluster):
    primary, replica = cluster
    with ReadRouter(primary.url, replica.url, max_lag_s=1.0, check_interval_s=0.1) as router:
        wait_until(lambda: router.reads_from() == "replica", "reads on the replica")
        yield router


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached in {timeout_s} s: {what}")
        time.sleep(0.02)


def on_standby(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    assert row is not None
    return bool(row[0])


def insert(router: ReadRouter, item_id: int, body: str = "x") -> None:
    router.write(lambda conn: conn.execute("INSERT INTO items VALUES (%s, %s)", (item_id, body)))


def body_of(item_id: int) -> Callable[[psycopg.Connection], str | None]:
    def read(conn: psycopg.Connection) -> str | None:
        row = conn.execute("SELECT body FROM items WHERE id = %s", (item_id,)).fetchone()
        return None if row is None else str(row[0])

    return read


def test_reads_go_to_the_replica_and_writes_to_the_primary(router):
    assert router.read(on_standby) is True
    assert router.write(on_standby) is False
    with router.connection() as conn:
        assert on_standby(conn)
    with router.connection(for_write=True) as conn:
        assert not on_standby(conn)
    status = router.status()
    assert status["reads_from"] == "replica"
    assert status["primary"]["up"] and status["replica"]["up"]
    assert status["replica"]["lag_bytes"] == 0 and status["replica"]["lag_s"] == 0.0
    assert "reads from the replica" in router.summary()


def test_an_idle_primary_does_not_count_as_lag(router):
    """The replica misses nothing while the primary writes nothing: its lag stays 0 however
    long ago the last transaction was (the trap of now() - pg_last_xact_replay_timestamp())."""
    insert(router, 10)
    time.sleep(3 * router.max_lag_s)
    router.probe()
    assert router.status()["replica"]["lag_s"] == 0.0
    assert router.reads_from() == "replica"


def test_a_killed_replica_sends_reads_to_the_primary_without_one_error(cluster, router):
    _, replica = cluster
    insert(router, 20, "kept")
    seen: list[bool] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def read_constantly() -> None:
        def where_and_what(conn: psycopg.Connection) -> tuple[bool, str | None]:
            return on_standby(conn), body_of(20)(conn)

        while not stop.is_set():
            try:
                standby, body = router.read(where_and_what)
                if body == "kept":  # on the replica before it replayed the insert: None
                    seen.append(standby)
                elif not standby:
                    raise AssertionError("the primary lost a row")
            except BaseException as error:
                failures.append(error)
                return
            time.sleep(0.003)

    reader = threading.Thread(target=read_constantly)
    reader.start()
    try:
        wait_until(lambda: True in seen, "a read on the replica")
        replica.kill()
        wait_until(lambda: router.reads_from() == "primary", "reads on the primary")
        answered_while_down = len(seen)
        time.sleep(0.5)
        assert router.status()["replica"]["up"] is False
        assert "replica down" in router.summary()
        assert len(seen) > answered_while_down + 20  # reads went on, on the primary
        assert seen[-1] is False
        replica.start()
        wait_until(lambda: router.reads_from() == "replica", "reads back on the replica")
        count = len(seen)
        wait_until(lambda: len(seen) > count + 10, "reads after the restart")
        assert seen[-1] is True
    finally:
        stop.set()
        reader.join(timeout=30)
        replica.start()
    assert failures == []


def test_a_lagging_replica_sends_reads_to_the_primary(cluster, router):
    _, replica = cluster
    with replica.connect() as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
    try:
        insert(router, 30, "fresh")
        wait_until(lambda: router.reads_from() == "primary", "reads on the primary")
        status = router.status()["replica"]
        assert status["up"] and status["lag_bytes"] > 0
        assert status["lag_s"] is None or status["lag_s"] > router.max_lag_s
        # Past the samples the router remembers, the lag still reads as growing, not unknown.
        time.sleep(3 * router.max_lag_s)
        router.probe()
        assert router.status()["replica"]["lag_s"] >= 2 * router.max_lag_s
        assert router.reads_from() == "primary"
        assert router.read(body_of(30)) == "fresh"
    finally:
        with replica.connect() as conn:
            conn.execute("SELECT pg_wal_replay_resume()")
    wait_until(lambda: router.reads_from() == "replica", "reads back on the replica")
    assert router.read(body_of(30)) == "fresh"


def test_min_lsn_reads_your_own_writes(cluster):
    primary, replica = cluster
    # A generous bound: only min_lsn can send these reads to the primary.
    with ReadRouter(primary.url, replica.url, max_lag_s=60, check_interval_s=0.1) as router:
        wait_until(lambda: router.reads_from() == "replica", "reads on the replica")
        with replica.connect() as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
        try:
            insert(router, 40, "mine")
            written_at = router.current_lsn()
            assert router.reads_from() == "replica"
            assert router.read(body_of(40)) is None  # the paused replica has not got it
            assert router.reads_from(min_lsn=written_at) == "primary"
            assert router.read(body_of(40), min_lsn=written_at) == "mine"
            with router.connection(min_lsn=written_at) as conn:
                assert not on_standby(conn)
        finally:
            with replica.connect() as conn:
                conn.execute("SELECT pg_wal_replay_resume()")
        replica.wait_replayed(written_at)
        # Replayed now, even before the next probe notices: the replica serves it.
        with router.connection(min_lsn=written_at) as conn:
            assert on_standby(conn)
            assert body_of(40)(conn) == "mine"
    assert lsn_to_int(written_at) <= lsn_to_int(current_wal_lsn(primary))


def test_a_killed_primary_refuses_writes_and_loses_nothing_acknowledged(cluster, router):
    primary, _ = cluster
    acknowledged: list[int] = []
    refused: list[DatabaseUnavailableError] = []
    unexpected: list[BaseException] = []
    stop = threading.Event()

    def write_constantly() -> None:
        item_id = 1000
        while not stop.is_set():
            item_id += 1
            try:
                insert(router, item_id)
                acknowledged.append(item_id)
            except DatabaseUnavailableError as error:
                refused.append(error)
                time.sleep(0.05)
            except BaseException as error:
                unexpected.append(error)
                return

    writer = threading.Thread(target=write_constantly)
    writer.start()
    try:
        wait_until(lambda: len(acknowledged) >= 20, "writes before the crash")
        primary.kill()
        wait_until(lambda: len(refused) >= 3, "writes refused while the primary is down")
        # Reads go on from the replica meanwhile.
        assert router.read(on_standby) is True
        assert "primary down" in router.summary()
        assert not router.status()["primary"]["up"]
        primary.start()
        count = len(acknowledged)
        wait_until(lambda: len(acknowledged) > count + 20, "writes after the restart")
    finally:
        stop.set()
        writer.join(timeout=30)
        primary.start()
    assert unexpected == []
    assert all(error.retry_after_s == router.retry_after_s for error in refused)
    assert "unreachable" in str(refused[0])
    with primary.connect() as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM items WHERE id > 1000")}
    assert set(acknowledged) <= stored
    # At most the one write in flight at the crash may have committed without its answer.
    assert len(stored - set(acknowledged)) <= 1


def test_no_replica_configured_reads_the_primary(cluster):
    primary, _ = cluster
    with ReadRouter(primary.url, None) as router:
        assert router.reads_from() == "primary"
        assert router.read(on_standby) is False
        assert router.status()["replica"] is None
        assert "no read replica" in router.summary()


def test_a_primary_down_from_the_start_is_a_typed_error():
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with ReadRouter(url, None, checkout_timeout_s=0.5) as router:
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError):
            router.write(on_standby)
        assert time.monotonic() - started < 5
        assert router.can_read is False

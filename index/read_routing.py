"""Reads on a streaming read replica, writes on the primary, and reads back on the primary
whenever the replica is down or further behind than a bound.

How far behind the replica is, and why this rule: `pg_last_xact_replay_timestamp()` is the
commit time of the last transaction the replica replayed; `now()` minus it keeps growing while
the primary is idle, although the replica then misses nothing, and it mixes two hosts' clocks.
So the router measures lag against the primary's WAL position instead. A prober thread reads
the primary's `pg_current_wal_lsn()` every `check_interval_s` and remembers when it saw each
position; then it reads the replica's `pg_last_wal_replay_lsn()`:

* replayed at least the primary's position just read: the replica misses nothing, lag 0 s;
* otherwise it holds everything the primary had at the latest sample that it has replayed,
  so it misses at most the writes since that sample: lag = now - that sample's time (an
  upper bound, exact to within `check_interval_s`, on this process's one clock);
* no sample it has replayed yet (just after start, the replica behind): lag unknown, treated
  as beyond the bound.

Byte lag is the primary's position minus the replayed one. Reads use the replica while it
answers and its lag is within `max_lag_s`; a read that must see a write (read-your-writes)
passes that write's `min_lsn` and goes to the primary unless the replica has replayed it.

A replica that fails is marked down at once (requests stop trying it without waiting for a
connect timeout); the prober re-probes it every interval and brings it back. A primary that
cannot be reached raises `DatabaseUnavailableError` (the API answers 503 with Retry-After);
nothing half-written is acknowledged, because a write is committed or raises.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

from index.errors import DatabaseUnavailableError

logger = logging.getLogger(__name__)

DEFAULT_MAX_LAG_S = 5.0
DEFAULT_CHECK_INTERVAL_S = 0.5
DEFAULT_CONNECT_TIMEOUT_S = 2  # libpq's smallest connect_timeout
DEFAULT_CHECKOUT_TIMEOUT_S = 3.0  # waiting for a primary connection before answering 503
DEFAULT_REPLICA_CHECKOUT_TIMEOUT_S = 0.25  # a replica slower than this: read the primary
DEFAULT_RETRY_AFTER_S = 2
DEFAULT_POOL_MAX_SIZE = 8
# How long a failed pool reconnection keeps retrying with back-off before giving up: short, so
# that a server that comes back is connected to by the next request, not after a long back-off.
POOL_RECONNECT_TIMEOUT_S = 2.0
# libpq socket options: a server that vanishes without closing its connections (a host down, a
# partition) fails the query waiting on it within seconds instead of TCP's many minutes.
SOCKET_OPTIONS = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
    "tcp_user_timeout": 5_000,  # ms
}

T = TypeVar("T")
ReadsFrom = Literal["replica", "primary"]
# Errors that mean "this server is unreachable or going away", not "this query is wrong".
UNREACHABLE_ERRORS = (
    pg_errors.AdminShutdown,
    pg_errors.CrashShutdown,
    pg_errors.CannotConnectNow,
)


def lsn_to_int(lsn: str) -> int:
    """'16/B374D848' -> the byte position it names."""
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass(frozen=True)
class ReplicaHealth:
    """What the last probe saw; `lag_s` is None when unknown (see the module docstring)."""

    up: bool
    in_recovery: bool = False
    replay_lsn: int | None = None
    lag_bytes: int | None = None
    lag_s: float | None = None
    error: str = ""
    checked_at: float = 0.0


@dataclass(frozen=True)
class PrimaryHealth:
    up: bool
    wal_lsn: int | None = None
    error: str = ""
    checked_at: float = 0.0


class ReadRouter:
    """Connections for reads (replica when fresh enough, else primary) and writes (primary).

    Thread-safe. `read(work)` is the robust way to read: it reruns `work` on the primary when
    the replica fails under it. `connection()` hands out a connection for code that cannot be
    wrapped in a function (a failure on the replica then propagates, and the next call reads
    the primary).
    """

    def __init__(
        self,
        primary_url: str,
        replica_url: str | None = None,
        *,
        max_lag_s: float = DEFAULT_MAX_LAG_S,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        connect_timeout_s: int = DEFAULT_CONNECT_TIMEOUT_S,
        checkout_timeout_s: float = DEFAULT_CHECKOUT_TIMEOUT_S,
        replica_checkout_timeout_s: float = DEFAULT_REPLICA_CHECKOUT_TIMEOUT_S,
        retry_after_s: int = DEFAULT_RETRY_AFTER_S,
        pool_max_size: int = DEFAULT_POOL_MAX_SIZE,
        name: str = "campsearch",
    ) -> None:
        self.primary_url = primary_url
        self.replica_url = replica_url or None
        self.max_lag_s = max_lag_s
        self.check_interval_s = check_interval_s
        self.connect_timeout_s = max(2, int(connect_timeout_s))
        self.checkout_timeout_s = checkout_timeout_s
        self.replica_checkout_timeout_s = replica_checkout_timeout_s
        self.retry_after_s = retry_after_s
        self._primary_pool = self._pool(primary_url, f"{name}-primary", pool_max_size)
        self._replica_pool = (
            self._pool(self.replica_url, f"{name}-replica", pool_max_size)
            if self.replica_url
            else None
        )
        # (monotonic time, primary WAL position) of recent probes, oldest first.
        self._primary_samples: deque[tuple[float, int]] = deque()
        # The latest of those samples the replica is known to have replayed (kept when the
        # samples move on, so a replica stuck for long reads as ever further behind).
        self._replayed: tuple[float, int] | None = None
        self._primary = PrimaryHealth(up=True)
        self._replica = ReplicaHealth(up=False, error="not probed yet")
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()  # one probe at a time (the prober's, or a caller's)
        self._stop = threading.Event()
        self._probe_connections: dict[str, psycopg.Connection] = {}
        self._probed = threading.Event()
        self._prober = threading.Thread(target=self._probe_forever, name=f"{name}-db-probe")
        self._prober.daemon = True
        self._prober.start()
        self._probed.wait(timeout=max(5.0, 3 * self.connect_timeout_s))

    def _pool(self, url: str, name: str, max_size: int) -> ConnectionPool:
        pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            name=name,
            open=False,
            timeout=self.checkout_timeout_s,
            reconnect_timeout=POOL_RECONNECT_TIMEOUT_S,
            # A connection a server restart broke is dropped at checkout instead of failing
            # the caller's query, without a round trip for the healthy ones.
            check=check_if_suspect,
            # Autocommit: a single-statement read is one round trip (no BEGIN and COMMIT);
            # writes open their transaction explicitly (`connection`, `write`).
            kwargs={
                "connect_timeout": self.connect_timeout_s,
                "autocommit": True,
                **SOCKET_OPTIONS,
            },
        )
        pool.open(wait=False)
        return pool

    # --- handing out connections ---------------------------------------------------------

    @contextmanager
    def connection(
        self, *, for_write: bool = False, min_lsn: str | None = None
    ) -> Iterator[psycopg.Connection]:
        """A connection in a transaction, committed when the block ends (rolled back on error).

        Writes, and reads the replica cannot serve, get the primary; its failure raises
        `DatabaseUnavailableError`.
        """
        with self.session(for_write=for_write, min_lsn=min_lsn) as conn, conn.transaction():
            yield conn

    @contextmanager
    def session(
        self, *, for_write: bool = False, min_lsn: str | None = None
    ) -> Iterator[psycopg.Connection]:
        """An autocommit connection, chosen as `connection` chooses: each statement commits on
        its own (a lone read is one round trip); open `conn.transaction()` for more."""
        replica_conn = None if for_write else self._replica_connection(min_lsn)
        if replica_conn is None:
            with self._primary_connection() as conn:
                yield conn
            return
        assert self._replica_pool is not None
        try:
            yield replica_conn
        except psycopg.OperationalError as error:
            if replica_conn.broken or isinstance(error, UNREACHABLE_ERRORS):
                self._replica_failed(error)
            raise
        finally:
            self._replica_pool.putconn(replica_conn)

    def read(self, work: Callable[[psycopg.Connection], T], *, min_lsn: str | None = None) -> T:
        """`work(conn)` on the replica when it may serve the read, else (or when the replica
        fails during it, or cancels it for a recovery conflict) on the primary. `conn` is in
        autocommit (see `session`): work that needs one snapshot opens `conn.transaction()`."""
        replica_conn = self._replica_connection(min_lsn)
        if replica_conn is not None:
            assert self._replica_pool is not None
            try:
                return work(replica_conn)
            except (psycopg.OperationalError, pg_errors.SerializationFailure) as error:
                if replica_conn.broken or isinstance(error, UNREACHABLE_ERRORS):
                    self._replica_failed(error)
                logger.info("read on the replica failed (%s); reading the primary", error)
            finally:
                self._replica_pool.putconn(replica_conn)
        with self._primary_connection() as conn:
            return work(conn)

    def write(self, work: Callable[[psycopg.Connection], T]) -> T:
        """`work(conn)` in one transaction on the primary, committed before this returns."""
        with self._primary_connection() as conn, conn.transaction():
            return work(conn)

    def current_lsn(self) -> str:
        """The primary's WAL position now: after a commit, pass it as `min_lsn` to read it."""
        with self._primary_connection() as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        return str(row[0])

    def reads_from(self, min_lsn: str | None = None) -> ReadsFrom:
        """Where a read would go now (from the last probe; `min_lsn` checked against it)."""
        if not self._replica_may_serve():
            return "primary"
        replay = self._replica.replay_lsn
        if min_lsn is not None and (replay is None or replay < lsn_to_int(min_lsn)):
            return "primary"
        return "replica"

    @contextmanager
    def _primary_connection(self) -> Iterator[psycopg.Connection]:
        try:
            conn = self._primary_pool.getconn(timeout=self.checkout_timeout_s)
        except (PoolTimeout, psycopg.OperationalError) as error:
            raise self._unavailable(error) from error
        try:
            yield conn
        except psycopg.OperationalError as error:
            if conn.broken or isinstance(error, UNREACHABLE_ERRORS):
                raise self._unavailable(error) from error
            raise
        finally:
            self._primary_pool.putconn(conn)

    def _unavailable(self, error: Exception) -> DatabaseUnavailableError:
        with self._lock:
            self._primary = PrimaryHealth(
                up=False, error=_describe(error), checked_at=time.monotonic()
            )
        return DatabaseUnavailableError(
            f"the primary database is unreachable ({_describe(error)}); nothing was written",
            retry_after_s=self.retry_after_s,
        )

    def _replica_connection(self, min_lsn: str | None) -> psycopg.Connection | None:
        """A replica connection that may serve this read, or None (read the primary)."""
        if self._replica_pool is None or not self._replica_may_serve():
            return None
        try:
            conn = self._replica_pool.getconn(timeout=self.replica_checkout_timeout_s)
        except (PoolTimeout, psycopg.OperationalError) as error:
            self._replica_failed(error)
            return None
        if min_lsn is None or self.reads_from(min_lsn) == "replica":
            return conn
        # The last probe (or the last answer here) is older than the write: ask the replica
        # itself, one round trip, and remember its answer: replay only moves forward while the
        # replica is up, so later reads up to that position need not ask again.
        try:
            row = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
        except psycopg.OperationalError as error:
            self._replica_pool.putconn(conn)
            self._replica_failed(error)
            return None
        replayed = None if row is None or row[0] is None else lsn_to_int(str(row[0]))
        if replayed is not None:
            self._replayed_at_least(replayed)
            if replayed >= lsn_to_int(min_lsn):
                return conn
        self._replica_pool.putconn(conn)
        return None

    def _replayed_at_least(self, position: int) -> None:
        """The replica answered that it replayed `position`: keep the larger replay position."""
        with self._lock:
            replica = self._replica
            if replica.up and replica.in_recovery and (replica.replay_lsn or 0) < position:
                self._replica = dataclasses.replace(replica, replay_lsn=position)

    def _replica_may_serve(self) -> bool:
        replica = self._replica
        if self._replica_pool is None or not replica.up or not replica.in_recovery:
            return False
        if replica.lag_s is None:
            # Unknown lag: only when the primary is the reason (down), the replica is all
            # there is, and a dead primary takes no writes it could miss.
            return not self._primary.up
        return replica.lag_s <= self.max_lag_s

    def _replica_failed(self, error: Exception) -> None:
        """Stop sending reads to the replica until a probe finds it answering again."""
        with self._lock:
            if self._replica.up:
                logger.warning("read replica failed (%s); reading the primary", error)
            self._replica = ReplicaHealth(
                up=False, error=_describe(error), checked_at=time.monotonic()
            )

    # --- probing ---------------------------------------------------------------------------

    def _probe_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.probe()
            except Exception:  # the prober must outlive anything a probe meets
                logger.exception("database probe failed")
            self._probed.set()
            self._stop.wait(self.check_interval_s)

    def probe(self) -> None:
        """Measure the primary's position and the replica's replay now (the prober calls
        this every `check_interval_s`; tests call it to skip the wait)."""
        with self._probe_lock:
            primary = self._probe_primary()
            replica = self._probe_replica(primary) if self.replica_url else None
            self._record(primary, replica)

    def _record(self, primary: PrimaryHealth, replica: ReplicaHealth | None) -> None:
        primary_back = primary.up and not self._primary.up
        replica_back = replica is not None and replica.up and not self._replica.up
        # Before reads go back to a server, drop the pooled connections its outage broke, so
        # that no caller meets one.
        if replica_back and self._replica_pool is not None:
            logger.warning("read replica is back")
            self._replica_pool.check()
        if primary_back:
            logger.warning("primary database is back")
            self._primary_pool.check()
        with self._lock:
            self._primary = primary
            if replica is not None:
                self._replica = replica

    def _probe_primary(self) -> PrimaryHealth:
        now = time.monotonic()
        try:
            row = self._probe_query("primary", self.primary_url, "SELECT pg_current_wal_lsn()")
        except psycopg.Error as error:
            return PrimaryHealth(up=False, error=_describe(error), checked_at=now)
        position = lsn_to_int(str(row[0]))
        self._primary_samples.append((now, position))
        horizon = now - max(2 * self.max_lag_s, 10 * self.check_interval_s)
        while len(self._primary_samples) > 1 and self._primary_samples[0][0] < horizon:
            self._primary_samples.popleft()
        return PrimaryHealth(up=True, wal_lsn=position, checked_at=now)

    def _probe_replica(self, primary: PrimaryHealth) -> ReplicaHealth:
        assert self.replica_url is not None
        now = time.monotonic()
        try:
            row = self._probe_query(
                "replica",
                self.replica_url,
                "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text",
            )
        except psycopg.Error as error:
            return ReplicaHealth(up=False, error=_describe(error), checked_at=now)
        in_recovery, replay_text = bool(row[0]), row[1]
        if not in_recovery or replay_text is None:
            error = "not a standby (pg_is_in_recovery() is false): not used for reads"
            return ReplicaHealth(up=True, in_recovery=False, error=error, checked_at=now)
        replay = lsn_to_int(str(replay_text))
        if not primary.up or primary.wal_lsn is None:
            return ReplicaHealth(up=True, in_recovery=True, replay_lsn=replay, checked_at=now)
        lag_bytes = max(0, primary.wal_lsn - replay)
        if lag_bytes == 0:
            lag_s: float | None = 0.0
        else:
            replayed = [sample for sample in self._primary_samples if sample[1] <= replay]
            if replayed and (self._replayed is None or replayed[-1][0] > self._replayed[0]):
                self._replayed = replayed[-1]
            if self._replayed is not None and self._replayed[1] <= replay:
                lag_s = now - self._replayed[0]
            else:
                lag_s = None
        return ReplicaHealth(
            up=True,
            in_recovery=True,
            replay_lsn=replay,
            lag_bytes=lag_bytes,
            lag_s=lag_s,
            checked_at=now,
        )

    def _probe_query(self, role: str, url: str, query: str) -> tuple[Any, ...]:
        """One query on the prober's own connection to `role` (reopened when broken)."""
        conn = self._probe_connections.get(role)
        if conn is None or conn.closed or conn.broken:
            conn = psycopg.connect(
                url, autocommit=True, connect_timeout=self.connect_timeout_s, **SOCKET_OPTIONS
            )
            self._probe_connections[role] = conn
        try:
            row = conn.execute(query).fetchone()
        except psycopg.Error:
            conn.close()
            self._probe_connections.pop(role, None)
            raise
        assert row is not None
        return tuple(row)

    # --- reporting and closing -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For /readyz: where reads go now and why, each database's state and the lag."""
        primary, replica = self._primary, self._replica
        status: dict[str, Any] = {
            "reads_from": self.reads_from(),
            "primary": {"url": redacted(self.primary_url), "up": primary.up},
            "replica": None,
        }
        if primary.error:
            status["primary"]["error"] = primary.error
        if self.replica_url:
            status["replica"] = {
                "url": redacted(self.replica_url),
                "up": replica.up,
                "lag_bytes": replica.lag_bytes,
                "lag_s": None if replica.lag_s is None else round(replica.lag_s, 3),
                "max_lag_s": self.max_lag_s,
            }
            if replica.error:
                status["replica"]["error"] = replica.error
        return status

    def summary(self) -> str:
        """One line for /readyz's detail."""
        status = self.status()
        text = f"reads from the {status['reads_from']}"
        replica = status["replica"]
        if replica is None:
            text += " (no read replica configured)"
        elif not replica["up"]:
            text += f"; replica down: {replica.get('error', '')}"
        elif replica["lag_s"] is None:
            text += f"; replica lag unknown ({replica['lag_bytes']} bytes)"
        else:
            text += f"; replica {replica['lag_s']} s / {replica['lag_bytes']} bytes behind"
            text += f" (bound {self.max_lag_s} s)"
        if not status["primary"]["up"]:
            text += f"; primary down: {status['primary'].get('error', '')}"
        return text

    @property
    def can_read(self) -> bool:
        return self._primary.up or self._replica_may_serve()

    def close(self) -> None:
        self._stop.set()
        self._prober.join(timeout=10)
        with self._probe_lock:
            for conn in self._probe_connections.values():
                conn.close()
            self._probe_connections.clear()
        self._primary_pool.close()
        if self._replica_pool is not None:
            self._replica_pool.close()

    def __enter__(self) -> ReadRouter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_if_suspect(conn: psycopg.Connection) -> None:
    """The pool's checkout check, without a round trip for a healthy connection: an idle one
    has nothing to read, so a readable socket means the server closed it (a restart, a
    terminated backend: their FATAL and the close arrive unasked) or sent a notice; only then
    is the connection tried with a round trip (which fails, and the pool drops it). A server
    host that vanishes without closing is caught by the socket options (`SOCKET_OPTIONS`)."""
    try:
        poller = select.poll()
        poller.register(conn.pgconn.socket, select.POLLIN | select.POLLERR | select.POLLHUP)
        suspect = bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error):
        suspect = True
    if suspect:
        ConnectionPool.check_connection(conn)


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def redacted(url: str) -> str:
    """The URL without its password, for logs and status."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)

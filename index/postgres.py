"""PostgreSQL as the shared truth: catalog, stored features and the change log of a corpus that
several API replicas serve at once (``CAMPSEARCH_DATABASE_URL=postgresql://...``).

Tables (schema versioned by `MIGRATIONS`, run at start under an advisory lock so replicas
starting together do not race):
  * ``images`` / ``captions``: the same columns as the SQLite catalog; ids come from the
    sequences ``image_ids`` / ``caption_ids`` (never reused);
  * ``features (namespace, item_id, payload bytea)``: `index.codec` records, the same bytes
    LMDB and Redis hold, so one encoder serves all three;
  * ``changes (seq, kind, item_id, op)``: every committed add/delete, in commit order.

ONE transaction per write: features, catalog rows and change rows, then ``NOTIFY``; the
commit is the acknowledgement (no feature orphans can exist, unlike the embedded two-step).

The change-sequence rule: a writer takes ``pg_advisory_xact_lock(CHANGES_LOCK)`` right before
it draws sequence numbers for its change rows and keeps it until it commits. Sequence numbers
are therefore drawn in commit order, and a committed change is visible before the next writer
can draw a number (PostgreSQL makes a commit visible before it releases its locks). A follower
that has read every change up to N can never later find a committed change below N: reading
``WHERE seq > applied`` never skips one. (Without the lock, writer A could draw 5, writer B
draw 6 and commit first; a follower reading 6 would then skip 5 for ever.) Numbers of rolled
back transactions are gaps, which ``seq > applied`` does not mind.

Connections come from the process's `index.read_routing.ReadRouter`: writes through
`PostgresDatabase.write_transaction` (the primary), reads through `PostgresDatabase.read` (a
read replica when it holds everything this process has indexed, else the primary; see
`PostgresDatabase` for which reads must be on the primary and why).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg_pool import PoolTimeout

from index.catalog import CaptionRecord, ImageRecord, captions_by_image
from index.codec import decode_arrays, encode_arrays
from index.errors import (
    CatalogSchemaError,
    DatabaseUnavailableError,
    StorageError,
    StorageFullError,
)
from index.namespaces import CAPTION_PREFIXES, IMAGE_PREFIXES
from index.read_routing import SOCKET_OPTIONS, ReadRouter, lsn_to_int

logger = logging.getLogger(__name__)

Table = Literal["images", "captions"]
Op = Literal["add", "delete"]
Arrays = Mapping[str, np.ndarray]

NOTIFY_CHANNEL = "campsearch_changes"
MIGRATION_LOCK = 0x43414D50_0001  # "CAMP" + 1: schema migrations, one replica at a time
CHANGES_LOCK = 0x43414D50_0002  # "CAMP" + 2: change sequence numbers drawn in commit order
# "CAMP": the class of two-key advisory locks whose second key names one piece of shared work
# (a rerank-tensor rebuild of one model); one-key locks (above, and content locks) are apart.
WORK_LOCK_CLASS = 0x43414D50
CONNECT_TIMEOUT_S = 5.0
T = TypeVar("T")

MIGRATIONS: tuple[str, ...] = (
    # 1: the catalog, stored features, id sequences and the change log.
    """
    CREATE TABLE images (
        id BIGINT PRIMARY KEY,
        sha256 TEXT NOT NULL UNIQUE,
        stored_path TEXT NOT NULL,
        width INTEGER NOT NULL CHECK (width > 0),
        height INTEGER NOT NULL CHECK (height > 0),
        created DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE captions (
        id BIGINT PRIMARY KEY,
        image_id BIGINT REFERENCES images(id) ON DELETE CASCADE,
        text TEXT NOT NULL,
        token_ids INTEGER[] NOT NULL,
        created DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX captions_by_image ON captions(image_id);
    CREATE SEQUENCE image_ids;
    CREATE SEQUENCE caption_ids;
    CREATE TABLE features (
        namespace TEXT NOT NULL,
        item_id BIGINT NOT NULL,
        payload BYTEA NOT NULL,
        PRIMARY KEY (namespace, item_id)
    );
    -- float16 features do not compress: store them out of line without trying.
    ALTER TABLE features ALTER COLUMN payload SET STORAGE EXTERNAL;
    CREATE SEQUENCE change_seq;
    CREATE TABLE changes (
        seq BIGINT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('images', 'captions')),
        item_id BIGINT NOT NULL,
        op TEXT NOT NULL CHECK (op IN ('add', 'delete')),
        at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    """,
    # 2: trained shortlist structures (IVF centroids, PQ codebooks) that replicas share, so a
    # replica's start adds vectors instead of training k-means again.
    """
    CREATE TABLE index_templates (
        kind TEXT NOT NULL,
        model_version TEXT NOT NULL,
        factory TEXT NOT NULL,
        dim INTEGER NOT NULL,
        payload BYTEA NOT NULL,
        created TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (kind, model_version, factory, dim)
    );
    """,
    # 3: the change log's retention: changes up to `pruned_through` may have been deleted.
    """
    CREATE TABLE change_horizon (pruned_through BIGINT NOT NULL);
    INSERT INTO change_horizon VALUES (0);
    """,
)


# The last committed change: the log's largest sequence, or the pruned horizon when the log was
# emptied by pruning.
LAST_CHANGE_QUERY = (
    "SELECT greatest(coalesce(max(seq), 0), (SELECT pruned_through FROM change_horizon)) "
    "FROM changes"
)


class DuplicateImageError(StorageError):
    """Another writer committed an image with the same sha256 first."""


@dataclass(frozen=True)
class Change:
    seq: int
    kind: Table
    item_id: int
    op: Op


def redacted_url(url: str) -> str:
    """The URL without its password, for logs and status pages."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


def ping(url: str, timeout_s: int = int(CONNECT_TIMEOUT_S)) -> None:
    """Connect to `url` and run one query, or raise `DatabaseUnavailableError` saying why (the
    URL without its password): a replica starting before its database waits on this."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=max(2, timeout_s)) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as error:
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
        raise DatabaseUnavailableError(
            f"database {redacted_url(url)} is not reachable ({reason})"
        ) from error


@contextmanager
def database_errors(url: str) -> Iterator[None]:
    """psycopg's failures as the storage errors the service maps to HTTP statuses."""
    try:
        yield
    except psycopg.errors.UniqueViolation as error:
        if "sha256" in str(error):
            raise DuplicateImageError(str(error)) from error
        raise StorageError(f"database {redacted_url(url)}: {error}") from error
    except psycopg.errors.DiskFull as error:
        raise StorageFullError(f"database {redacted_url(url)}: disk full ({error})") from error
    except (psycopg.OperationalError, PoolTimeout) as error:
        raise DatabaseUnavailableError(
            f"database {redacted_url(url)} is unavailable: {error}"
        ) from error
    except psycopg.Error as error:
        raise StorageError(f"database {redacted_url(url)}: {error}") from error


class PostgresDatabase:
    """The schema, and the write and read seams of one database, over a `ReadRouter`'s
    connections (the process's one set: writes on the primary, reads on a read replica when
    it may serve them).

    Which reads go where:
      * reads of what a writer decides on (under `primary_reads()`, which the corpus's write
        lock holds: does this sha256 exist, does this image exist, which captions it has), the
        follower's (change log, the vectors of changed items) and a replica's start (the
        pooled-vector snapshot) read the PRIMARY: a read replica may lack another replica's
        latest commit, and the follower must never read a change whose rows it then cannot
        find (the change log is not read from the read replica at all);
      * every other read (search results' metadata, rerank tensors, region features) goes to
        the router with ``min_lsn`` = the newest primary WAL position whose state this process
        has put in its indexes (`observed_lsn`: after its own writes and each batch of changes
        the follower applied). The read replica serves it only once it has replayed that far,
        so a search never finds in its index an item the replica does not hold yet (a
        just-written item's metadata included); else the read goes to the primary.
    """

    def __init__(self, database: str | ReadRouter) -> None:
        # A URL: this object owns a router of its own (tools, tests); a router: its owner
        # (the service's runtime) closes it.
        self._owns_router = isinstance(database, str)
        self.router = ReadRouter(database) if isinstance(database, str) else database
        self.url = self.router.primary_url
        self._has_replica = self.router.replica_url is not None
        self._observed_lock = threading.Lock()
        self.observed_lsn: str | None = None  # None: no read replica, or nothing written yet
        self._observed_position = 0
        self._primary_reads = threading.local()
        # The connection a thread's content lock holds: that thread's primary work reuses it
        # (no second checkout while one is held; see `content_lock`).
        self._pinned = threading.local()
        try:
            self.migrate()
        except BaseException:
            self.close()
            raise

    @property
    def display_url(self) -> str:
        return redacted_url(self.url)

    def migrate(self) -> int:
        """Run the migrations this database lacks (under an advisory lock); the version."""
        with self.write_transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version VALUES (0)")
                version = 0
            else:
                version = int(row[0])
            if version > len(MIGRATIONS):
                raise CatalogSchemaError(
                    f"database {self.display_url} has schema version {version}, this "
                    f"camp-search knows up to {len(MIGRATIONS)}: upgrade camp-search"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                conn.execute(script)
                conn.execute("UPDATE schema_version SET version = %s", (number,))
                version = number
        return version

    @contextmanager
    def write_transaction(
        self, *, observe: bool = False, pipelined: bool = False
    ) -> Iterator[psycopg.Connection]:
        """One transaction on the primary: committed when the block ends, rolled back on error.
        `observe`: afterwards, reads wait for a read replica to have replayed this commit.
        `pipelined`: statements are queued in psycopg's pipeline mode and sent together; the
        transaction (and the `observe` query after its COMMIT) is one round trip unless the
        block fetches a result itself. Statements must be single (no scripts) in it."""
        with database_errors(self.url), self._primary_session() as conn:
            if not pipelined:
                with conn.transaction():
                    yield conn
                if observe:
                    self.observe_primary(conn)
                return
            # BEGIN and COMMIT are queued as plain statements: psycopg's `transaction()` syncs
            # the pipeline on entering and leaving, a round trip each.
            position = None
            try:
                with conn.pipeline():
                    conn.execute("BEGIN")
                    yield conn
                    conn.execute("COMMIT")
                    position = self._queue_position_query(conn) if observe else None
            except BaseException:
                # A failed statement aborted the rest (COMMIT included): end the transaction.
                if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                    with contextlib.suppress(psycopg.Error):
                        conn.rollback()
                raise
            if position is not None:
                self._observed(position)

    @contextmanager
    def primary_connection(self) -> Iterator[psycopg.Connection]:
        """An autocommit connection to the primary for reads that must see its latest commits
        (each statement its own snapshot; open `conn.transaction()` for one)."""
        with database_errors(self.url), self._primary_session() as conn:
            yield conn

    @contextmanager
    def _primary_session(self) -> Iterator[psycopg.Connection]:
        """This thread's pinned connection (its content lock's), else one from the pool."""
        pinned = getattr(self._pinned, "conn", None)
        if pinned is not None:
            yield pinned
            return
        with self.router.session(for_write=True) as conn:
            yield conn

    def read(self, work: Callable[[psycopg.Connection], T]) -> T:
        """`work(conn)` where reads go now (see the class docstring): on the primary under
        `primary_reads()`, else through the router, no older than `observed_lsn`. `conn` is
        in autocommit (one round trip per lone statement)."""
        with database_errors(self.url):
            if getattr(self._primary_reads, "depth", 0):
                with self._primary_session() as conn:
                    return work(conn)
            return self.router.read(work, min_lsn=self.observed_lsn)

    @contextmanager
    def primary_reads(self) -> Iterator[None]:
        """This thread's reads go to the primary inside the block (a writer's decisions)."""
        local = self._primary_reads
        local.depth = getattr(local, "depth", 0) + 1
        try:
            yield
        finally:
            local.depth -= 1

    def observe_primary(self, conn: psycopg.Connection) -> None:
        """Record the primary's WAL position now (after `conn` read or committed what this
        process is about to index): later reads need a replica that replayed it. Nothing to
        do (no query) without a read replica."""
        if not self._has_replica:
            return
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        self._observed(str(row[0]))

    def _queue_position_query(self, conn: psycopg.Connection) -> psycopg.Cursor | None:
        """`observe_primary`'s query queued in a pipeline (read once it is synced)."""
        if not self._has_replica:
            return None
        return conn.execute("SELECT pg_current_wal_lsn()::text")

    def _observed(self, position: psycopg.Cursor | str) -> None:
        if not isinstance(position, str):
            row = position.fetchone()
            assert row is not None
            position = str(row[0])
        value = lsn_to_int(position)
        with self._observed_lock:
            if value > self._observed_position:
                self._observed_position, self.observed_lsn = value, position

    def index_template(self, kind: str, model_version: str, factory: str, dim: int) -> bytes | None:
        """The shared trained structure of an index (`ShortlistIndex.trained_template`)."""
        row = self.read(
            lambda conn: conn.execute(
                "SELECT payload FROM index_templates "
                "WHERE kind = %s AND model_version = %s AND factory = %s AND dim = %s",
                (kind, model_version, factory, dim),
                binary=True,
            ).fetchone()
        )
        return None if row is None else bytes(row[0])

    def save_index_template(
        self, kind: str, model_version: str, factory: str, dim: int, payload: bytes
    ) -> None:
        """Share a trained structure (the first replica to train one keeps it)."""
        with self.write_transaction() as conn:
            conn.execute(
                "INSERT INTO index_templates (kind, model_version, factory, dim, payload) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (kind, model_version, factory, dim, payload),
            )

    @contextmanager
    def content_lock(self, sha256: str) -> Iterator[None]:
        """Hold a session advisory lock on one photo's content address across replicas.

        A photo file is shared by path (its sha256), and written or unlinked outside the
        database's transactions: an add (file written, row committed), a delete (row deleted,
        file unlinked) and the orphan sweep of the same bytes on two replicas must not
        interleave, or a committed image could lose its file."""
        key = int.from_bytes(bytes.fromhex(sha256[:16]), "big", signed=True)
        pinned = getattr(self._pinned, "conn", None)
        with database_errors(self.url), contextlib.ExitStack() as stack:
            # The lock's connection serves this thread's primary work while it is held (the
            # lookups and the write of an add): one checkout instead of one per step.
            conn = pinned or stack.enter_context(self.router.session(for_write=True))
            conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            self._pinned.conn = conn
            try:
                yield
            finally:
                self._pinned.conn = pinned
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def connect(self, **options: Any) -> psycopg.Connection:
        """A dedicated connection (the follower's LISTEN); autocommit."""
        with database_errors(self.url):
            return psycopg.connect(
                self.url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_S), **options
            )

    def close(self) -> None:
        if self._owns_router:
            self.router.close()


def work_lock_key(name: str) -> tuple[int, int]:
    """The two-key advisory lock of the shared work `name` (any text): ("CAMP", a digest)."""
    digest = hashlib.sha256(name.encode()).digest()
    return WORK_LOCK_CLASS, int.from_bytes(digest[:4], "big", signed=True)


class SessionLock:
    """A session advisory lock on a dedicated connection, for work that one replica at a time
    does for the whole database.

    The server ends the lock with the session: on `release`, and also when the holder's
    process dies (a SIGKILL closes its socket) or its connection breaks (a server restart),
    so a holder that vanishes mid-work never blocks the others (a claim row would stay until
    someone guessed it was stale). Not thread-safe: one thread uses it.
    """

    def __init__(self, database: PostgresDatabase, name: str) -> None:
        self.database = database
        self.name = name
        self.key = work_lock_key(name)
        self._conn: psycopg.Connection | None = None
        self._held = False

    def try_acquire(self) -> bool:
        """Take the lock unless another session holds it (no waiting). Raises
        `DatabaseUnavailableError` when the primary cannot be reached."""
        if self._held and self.held():
            return True
        conn = self._connection()
        with database_errors(self.database.url):
            try:
                row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", self.key).fetchone()
            except psycopg.Error:
                self._drop()
                raise
        self._held = bool(row and row[0])
        return self._held

    def held(self) -> bool:
        """Still held: the session answers (one round trip). False once it broke (the server
        then released the lock, and another replica may have taken it)."""
        if not self._held or self._conn is None:
            return False
        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error:
            self._drop()
        return self._held

    def release(self) -> None:
        if self._held and self._conn is not None:
            try:
                self._conn.execute("SELECT pg_advisory_unlock(%s, %s)", self.key)
            except psycopg.Error:
                self._drop()  # the session ended: nothing is held any more
        self._held = False

    def close(self) -> None:
        """Release (by ending the session) and close the connection."""
        self._drop()

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self.database.connect(**SOCKET_OPTIONS)
        return self._conn

    def _drop(self) -> None:
        self._held = False
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class PrimaryReadsLock:
    """A lock whose holder's reads go to the primary: the corpus's write lock in PostgreSQL
    mode, so everything a writer (or the follower, which applies changes under it) reads to
    decide what to write or index is the primary's latest state."""

    def __init__(self, database: PostgresDatabase) -> None:
        self._lock = threading.Lock()
        self._database = database
        self._reads: list[contextlib.AbstractContextManager[None]] = []

    def __enter__(self) -> PrimaryReadsLock:
        self._lock.acquire()
        reads = self._database.primary_reads()
        reads.__enter__()
        self._reads.append(reads)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._reads.pop().__exit__(None, None, None)
        finally:
            self._lock.release()


@dataclass(frozen=True)
class DrawnChanges:
    """The sequence numbers a write drew, readable once its statement has run (after the
    commit in a pipelined transaction: no round trip while the changes lock is held)."""

    cursor: psycopg.Cursor | None

    def range(self) -> tuple[int, int]:
        """(first, last) sequence numbers (consecutive: drawn under the lock); (0, 0) for none."""
        if self.cursor is None:
            return 0, 0
        row = self.cursor.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


def record_changes(
    conn: psycopg.Connection, changes: Sequence[tuple[Table, int, Op]]
) -> DrawnChanges:
    """Append change rows in commit order (see the module docstring) and NOTIFY the last
    sequence. Call it LAST in the transaction: it serialises writers until commit. Two
    statements (the lock, then one that draws, inserts and notifies) that need no answer
    before the commit: read `DrawnChanges.range()` after it."""
    if not changes:
        return DrawnChanges(None)
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHANGES_LOCK,))
    cursor = conn.execute(
        "WITH drawn AS ("
        " INSERT INTO changes (seq, kind, item_id, op)"
        " SELECT nextval('change_seq'), c.kind, c.item_id, c.op"
        " FROM unnest(%s::text[], %s::bigint[], %s::text[]) WITH ORDINALITY"
        " AS c(kind, item_id, op, n) ORDER BY c.n RETURNING seq)"
        " SELECT first, last, pg_notify(%s, last::text)"
        " FROM (SELECT min(seq) AS first, max(seq) AS last FROM drawn) AS s",
        (
            [kind for kind, _, _ in changes],
            [int(item_id) for _, item_id, _ in changes],
            [op for _, _, op in changes],
            NOTIFY_CHANNEL,
        ),
    )
    return DrawnChanges(cursor)


def write_features(
    conn: psycopg.Connection, puts: Mapping[str, Mapping[int, bytes]], *, replace: bool
) -> None:
    """Insert encoded records; `replace` overwrites existing ones (else they are kept)."""
    conflict = (
        "DO UPDATE SET payload = EXCLUDED.payload" if replace else "DO NOTHING"
    )  # a rebuild replaces; a copy (migrate) keeps what is there
    with conn.cursor() as cursor:
        for namespace, items in puts.items():
            if not items:
                continue
            cursor.executemany(
                "INSERT INTO features (namespace, item_id, payload) VALUES (%s, %s, %s) "
                f"ON CONFLICT (namespace, item_id) {conflict}",
                [(namespace, int(i), value) for i, value in items.items()],
            )


def _encoded(puts: Mapping[str, Mapping[int, Arrays]] | None) -> dict[str, dict[int, bytes]]:
    return {
        namespace: {int(i): encode_arrays(arrays) for i, arrays in items.items()}
        for namespace, items in (puts or {}).items()
    }


class PostgresCatalog:
    """The catalog API of `index.catalog.Catalog` over PostgreSQL, whose writes also carry the
    features and the change rows in the same transaction."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.database = database
        self.written_sequence = 0  # the last change this process committed
        self.last_write = (0, 0)  # the first and last change of the latest write

    def _written(self, first: int, last: int) -> None:
        self.last_write = (first, last)
        self.written_sequence = max(self.written_sequence, last)

    # --- writes -----------------------------------------------------------------------------

    def allocate_ids(self, table: Table, count: int) -> list[int]:
        """`count` fresh ids of `table` (a sequence: never handed out again)."""
        if count <= 0:
            return []
        sequence = "image_ids" if table == "images" else "caption_ids"
        # nextval is not transactional: one autocommit statement, no BEGIN and COMMIT.
        with self.database.primary_connection() as conn:
            rows = conn.execute(
                sql.SQL("SELECT nextval({}) FROM generate_series(1, %s)").format(
                    sql.Literal(sequence)
                ),
                (count,),
            ).fetchall()
        return [int(row[0]) for row in rows]

    def insert(
        self,
        images: Sequence[ImageRecord] = (),
        captions: Sequence[CaptionRecord] = (),
        *,
        features: Mapping[str, Mapping[int, Arrays]] | None = None,
    ) -> int:
        """Features, catalog rows and change rows in ONE transaction: the acknowledgement.
        Returns the change sequence of the write. Raises DuplicateImageError when another
        writer committed the same sha256 first."""
        encoded = _encoded(features)
        # Pipelined: the whole transaction is one round trip to the server.
        with self.database.write_transaction(observe=True, pipelined=True) as conn:
            write_features(conn, encoded, replace=True)
            insert_catalog_rows(conn, images, captions)
            drawn = record_changes(
                conn,
                [("images", r.id, "add") for r in images]
                + [("captions", r.id, "add") for r in captions],
            )
        first, sequence = drawn.range()
        self._written(first, sequence)
        return sequence

    def delete_image(self, image_id: int) -> list[int] | None:
        """Delete an image, its captions and all their features in one transaction; the ids
        of its captions, or None when it did not exist."""
        # Pipelined: the row lock and the caption ids (one round trip), then the rest with the
        # commit (another). The ids are a statement of their own, after the lock: its snapshot
        # then holds a caption another writer committed while the lock was awaited.
        with self.database.write_transaction(observe=True, pipelined=True) as conn:
            locked = conn.execute("SELECT 1 FROM images WHERE id = %s FOR UPDATE", (image_id,))
            captions = conn.execute(
                "SELECT id FROM captions WHERE image_id = %s ORDER BY id", (image_id,)
            )
            caption_ids = [int(row[0]) for row in captions.fetchall()]
            if locked.fetchone() is None:
                return None
            conn.execute("DELETE FROM images WHERE id = %s", (image_id,))
            _delete_features(conn, [image_id], caption_ids)
            drawn = record_changes(
                conn,
                [("images", image_id, "delete")]
                + [("captions", cid, "delete") for cid in caption_ids],
            )
        self._written(*drawn.range())
        return caption_ids

    def delete_caption(self, caption_id: int) -> bool:
        with self.database.write_transaction(observe=True, pipelined=True) as conn:
            deleted = conn.execute(
                "DELETE FROM captions WHERE id = %s RETURNING id", (caption_id,)
            ).fetchone()  # a result, not rowcount: a pipeline sets that only once synced
            if deleted is None:
                return False
            _delete_features(conn, [], [caption_id])
            drawn = record_changes(conn, [("captions", caption_id, "delete")])
        self._written(*drawn.range())
        return True

    # --- reads ------------------------------------------------------------------------------

    def get_image(self, image_id: int) -> ImageRecord | None:
        return self.get_images([image_id]).get(int(image_id))

    def get_images(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        wanted = [int(i) for i in ids]
        if not wanted:
            return {}
        return self.database.read(lambda conn: self.images_in(conn, wanted))

    @staticmethod
    def images_in(conn: psycopg.Connection, ids: Sequence[int]) -> dict[int, ImageRecord]:
        """{id: record} of the ids that exist, read on `conn` (inside its transaction)."""
        rows = conn.execute(
            "SELECT id, sha256, stored_path, width, height, created FROM images WHERE id = ANY(%s)",
            (list(ids),),
        ).fetchall()
        return {int(row[0]): ImageRecord(*row) for row in rows}

    @staticmethod
    def captions_in(conn: psycopg.Connection, ids: Sequence[int]) -> dict[int, CaptionRecord]:
        rows = conn.execute(
            "SELECT id, image_id, text, token_ids, created FROM captions WHERE id = ANY(%s)",
            (list(ids),),
        ).fetchall()
        return {int(row[0]): _caption(row) for row in rows}

    def find_image_by_sha256(self, sha256: str) -> ImageRecord | None:
        """On the primary: a writer's dedupe and the orphan sweep decide on the answer."""
        rows = self._fetch(
            "SELECT id, sha256, stored_path, width, height, created FROM images WHERE sha256 = %s",
            (sha256,),
            on_primary=True,
        )
        return ImageRecord(*rows[0]) if rows else None

    def get_caption(self, caption_id: int) -> CaptionRecord | None:
        return self.get_captions([caption_id]).get(int(caption_id))

    def get_captions(self, ids: Iterable[int]) -> dict[int, CaptionRecord]:
        wanted = [int(i) for i in ids]
        if not wanted:
            return {}
        return self.database.read(lambda conn: self.captions_in(conn, wanted))

    def captions_of(self, image_id: int) -> list[CaptionRecord]:
        rows = self._fetch(
            "SELECT id, image_id, text, token_ids, created FROM captions "
            "WHERE image_id = %s ORDER BY id",
            (image_id,),
        )
        return [_caption(row) for row in rows]

    def captions_of_images(self, image_ids: Iterable[int]) -> dict[int, list[CaptionRecord]]:
        wanted = [int(i) for i in image_ids]
        if not wanted:
            return {}
        rows = self._fetch(
            "SELECT images.id, captions.id, captions.image_id, captions.text, "
            "captions.token_ids, captions.created FROM images "
            "LEFT JOIN captions ON captions.image_id = images.id "
            "WHERE images.id = ANY(%s) ORDER BY images.id, captions.id",
            (wanted,),
        )
        return captions_by_image(rows, _caption)

    def image_ids(self) -> np.ndarray:
        return self._ids("SELECT id FROM images ORDER BY id")

    def caption_ids(self) -> np.ndarray:
        return self._ids("SELECT id FROM captions ORDER BY id")

    def count_images(self) -> int:
        return int(self._fetch("SELECT count(*) FROM images")[0][0])

    def count_captions(self) -> int:
        return int(self._fetch("SELECT count(*) FROM captions")[0][0])

    @property
    def sequence(self) -> int:
        """The last committed change sequence in the database (the primary's)."""
        return int(self._fetch(LAST_CHANGE_QUERY, on_primary=True)[0][0])

    def changes_after(self, seq: int, limit: int) -> list[Change]:
        """Committed changes with a sequence above `seq`, in order (at most `limit`), read on
        the primary; when there are some, reads afterwards need a read replica that holds them
        (the follower reads their rows next, and searches find them in the index)."""
        with self.database.primary_connection() as conn:
            rows = conn.execute(
                "SELECT seq, kind, item_id, op FROM changes WHERE seq > %s ORDER BY seq LIMIT %s",
                (seq, limit),
            ).fetchall()
            if rows:
                self.database.observe_primary(conn)
        return [Change(int(s), kind, int(item_id), op) for s, kind, item_id, op in rows]

    def change_horizon(self) -> int:
        """Changes up to this sequence may have been pruned from the log."""
        return int(self._fetch("SELECT pruned_through FROM change_horizon", on_primary=True)[0][0])

    def prune_changes(self, older_than_s: float) -> int:
        """Delete the log's prefix of changes older than `older_than_s` and move the horizon
        past it (a replica behind the horizon rebuilds from the tables). Returns rows deleted."""
        with self.database.write_transaction() as conn:
            (through,) = conn.execute(
                "SELECT max(seq) FROM changes WHERE at < now() - make_interval(secs => %s)",
                (float(older_than_s),),
            ).fetchone()
            if through is None:
                return 0
            deleted = conn.execute("DELETE FROM changes WHERE seq <= %s", (through,)).rowcount
            conn.execute(
                "UPDATE change_horizon SET pruned_through = greatest(pruned_through, %s)",
                (through,),
            )
        return int(deleted)

    def close(self) -> None:
        """The database (shared with the feature store) is closed by its owner."""

    def _fetch(
        self, query: str, params: Sequence[Any] = (), *, on_primary: bool = False
    ) -> list[tuple]:
        if on_primary:
            with self.database.primary_connection() as conn:
                return conn.execute(query, params).fetchall()
        return self.database.read(lambda conn: conn.execute(query, params).fetchall())

    def _ids(self, query: str) -> np.ndarray:
        return np.asarray([row[0] for row in self._fetch(query)], dtype=np.int64)


def insert_catalog_rows(
    conn: psycopg.Connection,
    images: Sequence[ImageRecord],
    captions: Sequence[CaptionRecord],
    *,
    skip_present: bool = False,
) -> tuple[list[int], list[int]]:
    """Insert catalog rows; with `skip_present` rows whose id exists are kept (a resumed copy).
    Returns the ids inserted. Without `skip_present` nothing is read back (every row is
    inserted or the transaction fails), so a pipeline sends it without waiting."""
    if not skip_present:
        if images:
            conn.execute(
                "INSERT INTO images (id, sha256, stored_path, width, height, created) "
                "SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::int[], "
                "%s::int[], %s::float8[])",
                _image_columns(images),
            )
        if captions:
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO captions (id, image_id, text, token_ids, created) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    [(r.id, r.image_id, r.text, list(r.token_ids), r.created) for r in captions],
                )
        return [r.id for r in images], [r.id for r in captions]
    inserted_images: list[int] = []
    inserted_captions: list[int] = []
    if images:
        inserted_images = [
            int(row[0])
            for row in conn.execute(
                "INSERT INTO images (id, sha256, stored_path, width, height, created) "
                "SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::int[], "
                "%s::int[], %s::float8[]) ON CONFLICT (id) DO NOTHING RETURNING id",
                _image_columns(images),
            )
        ]
    if captions:
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO captions (id, image_id, text, token_ids, created) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING id",
                [(r.id, r.image_id, r.text, list(r.token_ids), r.created) for r in captions],
                returning=True,
            )
            while True:
                row = cursor.fetchone()
                if row is not None:
                    inserted_captions.append(int(row[0]))
                if not cursor.nextset():
                    break
    return inserted_images, inserted_captions


def _image_columns(images: Sequence[ImageRecord]) -> tuple[list, ...]:
    return (
        [r.id for r in images],
        [r.sha256 for r in images],
        [r.stored_path for r in images],
        [r.width for r in images],
        [r.height for r in images],
        [r.created for r in images],
    )


def _delete_features(
    conn: psycopg.Connection, image_ids: list[int], caption_ids: list[int]
) -> None:
    """Every stored record of these items, whatever the namespace (same transaction)."""
    for prefixes, ids in ((IMAGE_PREFIXES, image_ids), (CAPTION_PREFIXES, caption_ids)):
        if ids:
            conn.execute(
                "DELETE FROM features WHERE item_id = ANY(%s) AND ("
                + " OR ".join("starts_with(namespace, %s)" for _ in prefixes)
                + ")",
                (ids, *prefixes),
            )


class PostgresFeatureStore:
    """The part of the `index.feature_store.FeatureStore` API that `Corpus` uses, over the
    ``features`` table."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.database = database

    def write(
        self,
        puts: Mapping[str, Mapping[int, Arrays]] | None = None,
        deletes: Mapping[str, Iterable[int]] | None = None,
    ) -> None:
        """Puts (replacing) and deletes across namespaces in ONE transaction."""
        with self.database.write_transaction() as conn:
            write_features(conn, _encoded(puts), replace=True)
            for namespace, ids in (deletes or {}).items():
                conn.execute(
                    "DELETE FROM features WHERE namespace = %s AND item_id = ANY(%s)",
                    (namespace, [int(i) for i in ids]),
                )

    def write_owned(
        self,
        table: Table,
        namespace: str,
        items: Mapping[int, Arrays],
        *,
        announce: bool = False,
    ) -> list[int]:
        """Store records of items that still exist in `table`, locking their catalog rows so
        a concurrent delete (another replica's) waits: nothing is left that no row owns.
        `announce`: also append an "add" change per stored item, in the same transaction, so
        every replica's follower adds its (new) pooled vector to its index. Returns the ids
        stored."""
        encoded = {int(i): encode_arrays(arrays) for i, arrays in items.items()}
        with self.database.write_transaction() as conn:
            present = {
                int(row[0])
                for row in conn.execute(
                    sql.SQL("SELECT id FROM {} WHERE id = ANY(%s) FOR SHARE").format(
                        sql.Identifier(table)
                    ),
                    (list(encoded),),
                )
            }
            kept = {i: value for i, value in encoded.items() if i in present}
            write_features(conn, {namespace: kept}, replace=True)
            if announce:
                record_changes(conn, [(table, i, "add") for i in kept])
        return list(kept)

    def get_many(self, namespace: str, ids: Iterable[int]) -> dict[int, dict[str, np.ndarray]]:
        return {
            i: decode_arrays(value) for i, value in self.get_many_encoded(namespace, ids).items()
        }

    def get_many_encoded(self, namespace: str, ids: Iterable[int]) -> dict[int, bytes]:
        """The stored bytes of the ids present, in `ids` order, in one query."""
        wanted = [int(i) for i in ids]
        if not wanted:
            return {}
        # Binary results: bytea arrives as raw bytes, not hex text twice its size.
        rows = self.database.read(
            lambda conn: conn.execute(
                "SELECT item_id, payload FROM features WHERE namespace = %s AND item_id = ANY(%s)",
                (namespace, wanted),
                binary=True,
            ).fetchall()
        )
        found = {int(item_id): bytes(payload) for item_id, payload in rows}
        return {i: found[i] for i in wanted if i in found}

    def count(self, namespace: str) -> int:
        """Records in `namespace` (an index-only scan of the primary key)."""
        rows = self.database.read(
            lambda conn: conn.execute(
                "SELECT count(*) FROM features WHERE namespace = %s", (namespace,)
            ).fetchall()
        )
        return int(rows[0][0])

    def ids(self, namespace: str) -> np.ndarray:
        rows = self.database.read(
            lambda conn: conn.execute(
                "SELECT item_id FROM features WHERE namespace = %s ORDER BY item_id", (namespace,)
            ).fetchall()
        )
        return np.asarray([row[0] for row in rows], dtype=np.int64)

    def namespaces(self) -> list[str]:
        """Distinct namespaces by a skip scan of the primary key (cheap on a big table)."""
        rows = self.database.read(
            lambda conn: conn.execute(
                "WITH RECURSIVE t(ns) AS ("
                " SELECT min(namespace) FROM features"
                " UNION ALL SELECT (SELECT min(namespace) FROM features WHERE namespace > t.ns)"
                " FROM t WHERE t.ns IS NOT NULL) SELECT ns FROM t WHERE ns IS NOT NULL"
            ).fetchall()
        )
        return [row[0] for row in rows]

    def iter_pooled(
        self, namespace: str, table: Table, batch: int
    ) -> Iterator[tuple[int, list[int], np.ndarray]]:
        """(snapshot sequence, ids, vectors [n, dim]) batches of every catalog item's pooled
        record, from ONE snapshot (repeatable read, server-side cursor) on the primary: the
        snapshot holds exactly the changes up to its sequence, so a follower goes on from there
        (and a long cursor on a read replica could be cancelled by a recovery conflict)."""
        key = "vector"
        with (
            self.database.primary_connection() as conn,
            conn.transaction(),
        ):
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            (sequence,) = conn.execute(LAST_CHANGE_QUERY).fetchone()
            self.database.observe_primary(conn)  # searches then need this snapshot's rows
            with conn.cursor(name="campsearch_pooled", binary=True) as cursor:
                cursor.itersize = batch
                cursor.execute(
                    sql.SQL(
                        "SELECT f.item_id, f.payload FROM features f "
                        "JOIN {} c ON c.id = f.item_id WHERE f.namespace = %s ORDER BY f.item_id"
                    ).format(sql.Identifier(table)),
                    (namespace,),
                )
                while rows := cursor.fetchmany(batch):
                    ids = [int(row[0]) for row in rows]
                    yield int(sequence), ids, stacked_vectors([row[1] for row in rows], key)
            yield int(sequence), [], np.empty((0, 0), dtype=np.float32)

    def close(self) -> None:
        """The database (shared with the catalog) is closed by its owner."""


def stacked_vectors(payloads: Sequence[bytes], key: str) -> np.ndarray:
    """[n, dim] from codec records of one array each: when every record has the first one's
    header (the usual case), one join of their data instead of n decodes (~10x faster)."""
    first = payloads[0]
    arrays = decode_arrays(first)
    vector = arrays[key]
    header = len(first) - vector.nbytes  # a lone array's data ends the record
    prefix = first[:header]
    if len(arrays) == 1 and all(len(p) == len(first) and p[:header] == prefix for p in payloads):
        data = b"".join(p[header:] for p in payloads)
        return np.frombuffer(data, dtype=vector.dtype).reshape(len(payloads), *vector.shape)
    return np.stack([decode_arrays(p)[key] for p in payloads])


def _caption(row: Sequence[Any]) -> CaptionRecord:
    caption_id, image_id, text, token_ids, created = row
    return CaptionRecord(
        int(caption_id),
        None if image_id is None else int(image_id),
        text,
        tuple(int(t) for t in token_ids),
        float(created),
    )

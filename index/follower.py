"""Keeps a replica's in-memory indexes current with the shared database (PostgreSQL mode).

A thread LISTENs on a dedicated connection; each notification, and every `POLL_INTERVAL_S`
without one, it reads ``changes WHERE seq > applied`` (in order, in batches) and hands them to
`Corpus.apply_changes`. The catch-up by sequence is what makes it exact: a notification that
is lost (the listen connection dropped, a replica restarting) only delays a change until the
next poll; after a reconnect it catches up at once. Change sequences are drawn in commit order
(see `index.postgres`), so reading past `applied` never skips a committed change.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING

import psycopg

from index.errors import StorageError
from index.postgres import NOTIFY_CHANNEL

if TYPE_CHECKING:
    from index.corpus import Corpus

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
CATCH_UP_BATCH = 5_000
RECONNECT_DELAY_S = 1.0
# Changes are kept this long: a replica offline for longer rebuilds its indexes at start anyway,
# and one that lags that far (never, while it runs) rebuilds from the tables.
CHANGE_RETENTION_S = 7 * 24 * 3600.0
PRUNE_INTERVAL_S = 3600.0


class ChangeFollower:
    """Applies other replicas' committed changes to one corpus, within ~POLL_INTERVAL_S."""

    def __init__(self, corpus: Corpus, *, poll_interval_s: float = POLL_INTERVAL_S) -> None:
        if corpus.database is None:
            raise ValueError("a change follower needs a corpus in PostgreSQL mode")
        self.corpus = corpus
        self.database = corpus.database
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._listen: psycopg.Connection | None = None
        self._listen_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="change-follower", daemon=True)
        self.notifications = 0
        self.reconnects = 0
        self.rebuilds = 0
        self.retention_s = CHANGE_RETENTION_S
        self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
        self.last_error = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._drop_listen()
        self._thread.join(timeout=10)

    def wake(self) -> None:
        """Catch up now (a search waits for a sequence this replica has not applied)."""
        self._wake.set()

    @property
    def listen_backend_pid(self) -> int | None:
        """The server process of the LISTEN connection (a test may terminate it)."""
        with self._listen_lock:
            return None if self._listen is None else self._listen.info.backend_pid

    @property
    def listening(self) -> bool:
        with self._listen_lock:
            return self._listen is not None and not self._listen.closed

    def catch_up(self) -> int:
        """Apply every committed change past the applied sequence; how many were read. A
        replica behind the log's retention horizon (changes it missed were pruned) rebuilds
        its indexes from the tables instead."""
        catalog = self.corpus.catalog
        horizon = catalog.change_horizon()  # type: ignore[union-attr]
        if self.corpus.applied_sequence < horizon:
            self.corpus.rebuild_from_database(
                f"applied change {self.corpus.applied_sequence} is behind the change log's "
                f"retention horizon {horizon}"
            )
            self.rebuilds += 1
        total = 0
        while True:
            after = self.corpus.applied_sequence
            changes = self.corpus.catalog.changes_after(after, CATCH_UP_BATCH)  # type: ignore[union-attr]
            if not changes:
                return total
            self.corpus.apply_changes(changes, through=changes[-1].seq)
            total += len(changes)
            if len(changes) < CATCH_UP_BATCH:
                return total

    # --- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.listening:
                    self._connect()
                self.catch_up()
                self._prune_when_due()
                self._wait_for_news()
            except (StorageError, psycopg.Error) as error:
                if self._stop.is_set():
                    return
                self.last_error = f"{type(error).__name__}: {error}"
                logger.warning("following the database's changes: %s; retrying", error)
                self._drop_listen()
                self._stop.wait(RECONNECT_DELAY_S)
            except Exception:  # keep following: a replica that stops following serves stale
                logger.exception("applying the database's changes failed; retrying")
                self._stop.wait(RECONNECT_DELAY_S)

    def _prune_when_due(self) -> None:
        """Keep the change log to `retention_s` (every replica may prune; it is idempotent)."""
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
        deleted = self.corpus.catalog.prune_changes(self.retention_s)  # type: ignore[union-attr]
        if deleted:
            logger.info(
                "pruned %d changes older than %.0f s from the log", deleted, self.retention_s
            )

    def _connect(self) -> None:
        connection = self.database.connect()
        connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
        with self._listen_lock:
            self._listen = connection
        self.reconnects += 1

    def _wait_for_news(self) -> None:
        """Until a notification, a wake-up or the poll interval, whichever comes first."""
        deadline = time.monotonic() + self.poll_interval_s
        while not self._stop.is_set() and not self._wake.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with self._listen_lock:
                connection = self._listen
            if connection is None:
                return
            # Short slices so a wake() (a waiting search) is honoured within ~50 ms.
            for notify in connection.notifies(timeout=min(remaining, 0.05), stop_after=1):
                self.notifications += 1
                if not self._applied_already(notify.payload):
                    return
        self._wake.clear()

    def _applied_already(self, payload: str) -> bool:
        """A notification names the last sequence of one commit; when this replica applied it
        already (its own write, applied as it committed), there is nothing to read. Every
        commit notifies, and the poll catches up on any lost notification either way."""
        try:
            return int(payload) <= self.corpus.applied_sequence
        except ValueError:
            return False

    def _drop_listen(self) -> None:
        with self._listen_lock:
            connection, self._listen = self._listen, None
        if connection is not None:
            with contextlib.suppress(psycopg.Error):
                connection.close()

"""Real PostgreSQL servers for tests: a primary and streaming replicas from Debian's binaries.

Each `PostgresServer` is its own cluster (`initdb`) in a temp folder, on a free port, listening
on 127.0.0.1 only (no Unix socket), with trust authentication (replication included) and fsync
on, so that a SIGKILL is a crash that loses nothing committed. A replica is a `pg_basebackup -R
-X stream` copy of a primary, with a replication slot so the primary keeps the WAL a killed
replica needs to catch up. Nothing here uses a server on 5432.

PostgreSQL refuses to run as root: when the tests are root, the cluster folder belongs to the
`postgres` system user and every binary runs as that user (Popen's `user=`, the same setuid
that `runuser -u postgres --` does, but the server stays our direct child so that `kill` can
SIGKILL its whole process group like a crash).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

BIN_DIR = Path(os.environ.get("CAMPSEARCH_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = "postgres"  # who runs the servers when the tests are root
DB_USER = "postgres"  # the superuser initdb creates
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
# Small, fast clusters: a test writes a few rows, not gigabytes.
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "wal_level": "replica",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_wal_senders": "5",
    "max_replication_slots": "5",
    "hot_standby": "on",
    "shared_buffers": "16MB",
    "max_connections": "40",
    "wal_receiver_status_interval": "1s",
    "log_min_messages": "warning",
}
PG_HBA = """\
# written by tests/postgres_cluster.py: trust on loopback, replication included
host    all             all             127.0.0.1/32            trust
host    replication     all             127.0.0.1/32            trust
"""


def postgres_available() -> bool:
    return (BIN_DIR / "initdb").is_file() and (os.geteuid() != 0 or _os_user_exists())


def _os_user_exists() -> bool:
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_owner() -> dict[str, Any]:
    """Popen arguments that drop root to the `postgres` user (nothing when we are not root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": OS_USER, "group": OS_USER, "extra_groups": []}


def _run(*command: str | Path, timeout_s: float = 120.0) -> None:
    result = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "LC_ALL": "C.UTF-8", "PGCONNECT_TIMEOUT": "5"},
        **_as_owner(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def make_owned_dir(parent: Path | None = None) -> Path:
    """A fresh folder that the server's user owns (pytest's tmp dirs are root's, mode 700)."""
    folder = Path(tempfile.mkdtemp(prefix="campsearch-pg-", dir=parent))
    if os.geteuid() == 0:
        owner = pwd.getpwnam(OS_USER)
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    return folder


class PostgresServer:
    """One PostgreSQL cluster; `url` stays the same across kill/stop and start."""

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/postgres"

    @classmethod
    def create(cls, root: Path | None = None) -> PostgresServer:
        """initdb a new cluster in a new folder under `root` (a temp dir by default)."""
        folder = make_owned_dir(root)
        server = cls(folder / "data")
        _run(
            BIN_DIR / "initdb",
            "-D", server.data_dir,
            "-U", DB_USER,
            "--auth=trust",
            "--encoding=UTF8",
            # initdb's own fsync of its template files only: the server runs with fsync on.
            "--no-sync",
        )  # fmt: skip
        server._write_hba()
        return server

    @classmethod
    def replica_of(cls, primary: PostgresServer, root: Path | None = None) -> PostgresServer:
        """A hot standby streaming from `primary` (running): base backup with -R, then start."""
        folder = make_owned_dir(root)
        server = cls(folder / "data")
        slot = f"replica_{server.port}"
        _run(
            BIN_DIR / "pg_basebackup",
            "-h", "127.0.0.1",
            "-p", str(primary.port),
            "-U", DB_USER,
            "-D", server.data_dir,
            "-R",  # standby.signal + primary_conninfo
            "-X", "stream",
            "-C", "-S", slot,  # a slot keeps the WAL a stopped replica still needs
            "--checkpoint=fast",
            "--no-sync",
        )  # fmt: skip
        return server.start()

    def _write_hba(self) -> None:
        (self.data_dir / "pg_hba.conf").write_text(PG_HBA)

    def start(self) -> PostgresServer:
        """Start the server in its own process group and wait until it accepts connections."""
        if self.running:
            return self
        command = [str(BIN_DIR / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        for name, value in SERVER_SETTINGS.items():
            command += ["-c", f"{name}={value}"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "LC_ALL": "C.UTF-8"},
                **_as_owner(),
            )
        self.wait_ready()
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until a connection succeeds (a hot standby accepts them once consistent)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"postgres exited on {self.port}:\n{self.log_tail()}")
            try:
                with psycopg.connect(self.url, connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as error:
                if time.monotonic() > deadline:
                    message = f"postgres not ready on {self.port}: {error}\n{self.log_tail()}"
                    raise TimeoutError(message) from error
                time.sleep(0.05)

    def stop(self) -> None:
        """A clean shutdown (SIGINT: fast mode, a checkpoint, then exit)."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend at once, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT_S)
            self._wait_children_gone()
        self.process = None

    def _wait_children_gone(self) -> None:
        """A new postmaster refuses to start while old backends hold the shared memory."""
        assert self.process is not None
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)

    def restart(self) -> PostgresServer:
        self.stop()
        return self.start()

    def connect(self, **kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=5, **kwargs)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def remove(self) -> None:
        """Kill the server and delete its folder."""
        self.kill()
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def wait_replayed(self, lsn: str, timeout_s: float = 30.0) -> None:
        """Until this standby has replayed the primary's `lsn`."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.connect() as conn:
                row = conn.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)
                ).fetchone()
            if row is not None and row[0]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica on {self.port} did not replay {lsn}")
            time.sleep(0.02)


def current_wal_lsn(primary: PostgresServer) -> str:
    with primary.connect() as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


@contextmanager
def primary_and_replica() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """A running primary and a hot standby streaming from it; both removed afterwards."""
    primary = PostgresServer.create()
    replica: PostgresServer | None = None
    try:
        primary.start()
        replica = PostgresServer.replica_of(primary)
        yield primary, replica
    finally:
        if replica is not None:
            replica.remove()
        primary.remove()

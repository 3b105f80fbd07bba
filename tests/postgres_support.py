"""A real PostgreSQL for tests: the one at CAMPSEARCH_TEST_POSTGRES_URL (default
127.0.0.1:5432), or, when none answers there, a server started in a tmp dir with the Debian
binaries (initdb/pg_ctl) as the `postgres` user on a free port. Each test gets a fresh
database (`fresh_database`), dropped after."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BIN_DIR = Path(os.environ.get("CAMPSEARCH_TEST_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
SERVER_USER = "postgres"


def reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalPostgres:
    """A throw-away server in a fresh folder of the system tmp dir (run as the `postgres` user:
    PostgreSQL refuses root; pytest's own tmp dirs are private to root, so not there)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="campsearch-pg-"))
        self.data = self.root / "pgdata"
        self.port = free_port()
        self.url = f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/postgres"

    def _as_server_user(self, *command: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", SERVER_USER, "--", *command]
        return list(command)

    def start(self) -> LocalPostgres:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam(SERVER_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        subprocess.run(
            self._as_server_user(
                str(BIN_DIR / "initdb"), "-D", str(self.data), "-A", "trust", "-U", SERVER_USER
            ),
            check=True,
            capture_output=True,
            text=True,
        )
        subprocess.run(
            self._as_server_user(
                str(BIN_DIR / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.root / "server.log"),
                "-o",
                f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off",
                "-w",
                "start",
            ),
            check=True,
            capture_output=True,
        )
        return self

    def stop(self) -> None:
        subprocess.run(
            self._as_server_user(
                str(BIN_DIR / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"
            ),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """CREATE DATABASE a unique name on the server; its URL; DROP it after."""
    name = f"campsearch_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(server_url)
    info["dbname"] = name
    url = "postgresql://{user}@{host}:{port}/{dbname}".format(
        user=info.get("user", SERVER_USER),
        host=info.get("host", "127.0.0.1"),
        port=info.get("port", 5432),
        dbname=name,
    )
    try:
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

"""A real PostgreSQL for tests: the one at CAMPSEARCH_TEST_POSTGRES_URL (default
127.0.0.1:5432), or, when none answers there, a `postgres_cluster.PostgresServer` started in a
tmp dir (the one harness that starts servers). Each test gets a fresh database
(`fresh_database`), dropped after."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SERVER_USER = "postgres"


def reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


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

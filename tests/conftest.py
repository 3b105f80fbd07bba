"""Shared fixtures: where the real data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("SHARED_DIR", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.fail(f"shared data folder not found at {SHARED_DIR} (set SHARED_DIR)")
    return SHARED_DIR


@pytest.fixture
def redis_server(tmp_path_factory):
    """A fresh real redis-server on a free port (killable, restartable); see tests/redis_server."""
    from redis_server import RedisServer  # tests/ is on sys.path (rootdir conftest)

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()

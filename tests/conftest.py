"""Shared fixtures: where the real data lives."""

from __future__ import annotations

from pathlib import Path

import pytest
from shared_paths import SHARED_DIR


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where torch sees CUDA (bench/gpu_check.sh); elsewhere they skip."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run bench/gpu_check.sh on a GPU host)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # keywords also hold folder names
            item.add_marker(skip)


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


@pytest.fixture(scope="module")
def dense_tiny_camp():
    """The tiny CAMP config with every parameter drawn from N(0, 0.25²): no bias can hide."""
    import torch

    from model.architecture.camp import CampModel
    from model.checkpoints.config import load_config

    torch.manual_seed(0)
    model = CampModel.from_config(load_config("camp_tiny"))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.25)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_retrieval_model(shared_dir):
    """A real RetrievalModel with seeded random weights (vocabulary from coco-mini captions)."""
    from service_support import coco_photos, tiny_model

    words = [caption for _, captions in coco_photos(shared_dir, 239) for caption in captions]
    return tiny_model(words)


@pytest.fixture(scope="session")
def small_grid_extractor():
    """The real grid extractor (ImageNet weights) at a small input size: 4 regions per photo."""
    from service_support import small_extractor

    return small_extractor()


@pytest.fixture(scope="session")
def ui_stack_api(shared_dir, tmp_path_factory):
    """`camp-search serve` (shipped default model, API key set) holding 12 coco-mini photos;
    shared by the browser and nginx tests. Yields (ApiServer, [IngestedPhoto])."""
    from ui_stack import UI_PHOTO_COUNT, ApiServer, ingest_coco_mini

    server = ApiServer(tmp_path_factory.mktemp("ui-api")).start()
    try:
        yield server, ingest_coco_mini(server.url, shared_dir, UI_PHOTO_COUNT)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def chromium():
    """Headless Debian Chromium driven by Playwright, per module (Playwright's sync API owns an
    event loop while it runs); skips only when Chromium is not installed."""
    from ui_stack import chromium_available, launch_chromium

    if not chromium_available():
        pytest.skip("Chromium is not installed: apt-get install -y chromium (make system-deps)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def postgres_server():
    """The URL of a real PostgreSQL server (CAMPSEARCH_TEST_POSTGRES_URL, 127.0.0.1:5432, or one
    started in a tmp dir when none answers); see tests/postgres_support and postgres_cluster."""
    import os

    from postgres_cluster import PostgresServer
    from postgres_support import DEFAULT_URL, reachable

    url = os.environ.get("CAMPSEARCH_TEST_POSTGRES_URL", DEFAULT_URL)
    if reachable(url):
        yield url
        return
    server = PostgresServer.create()
    try:
        yield server.start().url
    finally:
        server.remove()


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh database of its own for one test, dropped after."""
    from postgres_support import fresh_database

    with fresh_database(postgres_server) as url:
        yield url

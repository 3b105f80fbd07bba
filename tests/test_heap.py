"""Freed heap memory goes back to the OS when the service trims (glibc only)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from service.heap import can_trim_heap, trim_heap

pytestmark = pytest.mark.skipif(not can_trim_heap(), reason="needs glibc's malloc_trim")


def _anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_trim_returns_the_free_pages_that_fragmentation_keeps():
    """Free all but every 64th of many 4 KiB blocks: the live ones pin the heap's top, so
    free() alone gives little back; malloc_trim releases the free pages between them."""
    blocks = [bytearray(4096) for _ in range(40_000)]  # ~160 MiB through malloc
    keep = blocks[::64]
    del blocks
    before = _anon_mib()
    assert trim_heap()
    after = _anon_mib()
    assert before - after > 64, (before, after)
    assert all(len(b) == 4096 for b in keep)  # live blocks untouched


def test_service_trims_on_its_interval(
    monkeypatch, tmp_path, tiny_retrieval_model, small_grid_extractor
):
    from service_support import running_client

    import service.runtime
    from service.app import create_app
    from service.settings import Settings

    assert Settings(_env_file=None, data_dir=tmp_path).heap_trim_interval_s == 30.0
    calls = []
    monkeypatch.setattr(service.runtime, "trim_heap", lambda: calls.append(1) or True)
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", heap_trim_interval_s=0.05)
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        for _ in range(100):
            if len(calls) >= 3:
                break
            client.get("/healthz")
            time.sleep(0.05)
    assert len(calls) >= 3

"""Freed heap memory goes back to the OS when the service trims (glibc only)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.runtime.heap import can_trim_heap, heap_usage, trim_heap

REPO_ROOT = Path(__file__).resolve().parents[1]
# Counts glibc's mapped blocks (mallinfo2().hblks) around a free of a large block, in a fresh
# interpreter so this process's allocator is left as it is.
MAPPED_BLOCKS_SCRIPT = """
import ctypes, json, sys
from service.runtime.heap import _libc, fix_mmap_threshold

libc = _libc()  # glibc, with mallinfo2 typed by the service's own struct
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
fixed = sys.argv[1] == "fixed" and fix_mmap_threshold(64 * 1024)

def mapped_by(size):
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    grown = libc.mallinfo2().hblks - before
    return block, grown

first, first_mapped = mapped_by(4 << 20)
libc.free(first)  # glibc's default raises its threshold to 4 MiB here
second, second_mapped = mapped_by(1 << 20)
print(json.dumps({"fixed": bool(fixed), "mapped": [first_mapped, second_mapped]}))
"""

# Minor page faults of one thread that mallocs, touches and frees a 4 MiB block five times, with
# the service's fixed 64 KiB threshold, with or without a top pad: a reranker worker's calls.
TOP_PAD_SCRIPT = """
import ctypes, json, resource, sys, threading
from service.runtime.heap import _libc, fix_mmap_threshold, set_top_pad

libc = _libc()
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
assert fix_mmap_threshold(64 * 1024)
padded = sys.argv[1] == "padded" and set_top_pad(32 << 20)
size = 4 << 20
faults = []

def calls():
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)  # touch every page, as a tensor's kernel does
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

worker = threading.Thread(target=calls)
worker.start()
worker.join()
print(json.dumps({"padded": bool(padded), "faults": faults}))
"""

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

    import service.runtime.lifecycle
    from service.api.app import create_app
    from service.runtime.settings import Settings

    assert Settings(_env_file=None, data_dir=tmp_path).heap_trim_interval_s == 30.0
    calls = []
    monkeypatch.setattr(service.runtime.lifecycle, "trim_heap", lambda: calls.append(1) or True)
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", heap_trim_interval_s=0.05)
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        for _ in range(100):
            if len(calls) >= 3:
                break
            client.get("/healthz")
            time.sleep(0.05)
    assert len(calls) >= 3


@pytest.mark.parametrize("mode", ["default", "fixed"])
def test_a_fixed_mmap_threshold_keeps_large_temporaries_out_of_the_heap(mode):
    """glibc's default lifts its threshold to the size of a freed mapped block, so the next
    megabyte-sized temporaries grow the heap; with a fixed 64 KiB threshold they are mapped
    (and unmapped when freed)."""
    answer = subprocess.run(
        [sys.executable, "-c", MAPPED_BLOCKS_SCRIPT, mode],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(answer.stdout)
    if mode == "default":
        assert result == {"fixed": False, "mapped": [1, 0]}
    else:
        assert result == {"fixed": True, "mapped": [1, 1]}


@pytest.mark.parametrize("mode", ["unpadded", "padded"])
def test_a_top_pad_keeps_a_workers_temporaries_in_its_arena(mode):
    """With the fixed threshold alone every call's 4 MiB block is mapped and faulted in anew
    (1,024 pages); with a 32 MiB top pad the worker's arena keeps it, and later calls fault
    nothing in."""
    answer = subprocess.run(
        [sys.executable, "-c", TOP_PAD_SCRIPT, mode],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(answer.stdout)
    assert result["padded"] == (mode == "padded")
    later_calls = result["faults"][1:]
    if mode == "unpadded":
        assert all(faults >= 1000 for faults in later_calls), result
    else:
        assert all(faults < 50 for faults in later_calls), result


def test_the_service_fixes_the_threshold_it_is_given(
    monkeypatch, tmp_path, tiny_retrieval_model, small_grid_extractor
):
    from service_support import running_client

    import service.runtime.lifecycle
    from service.api.app import create_app
    from service.runtime.settings import Settings

    defaults = Settings(_env_file=None, data_dir=tmp_path)
    assert defaults.malloc_mmap_threshold_kib == 64 and defaults.malloc_top_pad_kib == 32 * 1024
    calls, pads = [], []
    monkeypatch.setattr(
        service.runtime.lifecycle, "fix_mmap_threshold", lambda n: calls.append(n) or True
    )
    monkeypatch.setattr(service.runtime.lifecycle, "set_top_pad", lambda n: pads.append(n) or True)
    for kib in (128, 0):
        settings = Settings(
            _env_file=None,
            data_dir=tmp_path / f"data{kib}",
            malloc_mmap_threshold_kib=kib,
            malloc_top_pad_kib=kib,
        )
        app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
        with running_client(app) as client:
            assert client.get("/healthz").status_code == 200
            heap = {
                sample.labels["state"]: sample.value
                for family in text_string_to_metric_families(client.get("/metrics").text)
                for sample in family.samples
                if sample.name == "campsearch_heap_bytes"
            }
            assert set(heap) == {"in_use", "free", "mapped"} and heap["in_use"] > 0
    assert calls == [128 * 1024]  # 0 leaves glibc's own threshold
    assert pads == [128 * 1024]  # and sets no pad


def test_heap_usage_counts_what_is_allocated():
    before = heap_usage()
    block = bytearray(64 * 2**20)  # one malloc of 64 MiB
    after = heap_usage()
    assert before is not None and after is not None
    held = sum(after[k] - before[k] for k in ("in_use", "mapped"))
    assert 60 * 2**20 < held < 72 * 2**20, (before, after)  # other threads may free a little
    assert len(block) == 64 * 2**20

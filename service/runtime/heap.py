"""Keep freed heap memory going back to the OS (glibc only): a timed trim, a fixed mmap threshold.

Under load every search builds rerank tensors in worker threads and frees them a moment later,
while long-lived cache entries sit between them. glibc keeps the freed space in its per-thread
arenas, so the resident size creeps upward although nothing is leaked (bench/load.py soaks:
`malloc_trim(0)` once returned 766 MiB of such space without freeing a live object).
`malloc_trim(0)` releases the free pages of every arena; it is cheap next to a search.

Trimming alone does not stop the creep: glibc raises its mmap threshold to the size of every
large block it frees (up to 32 MiB, and its trim threshold with it), so the megabyte-sized
temporaries of later searches grow the arenas, between long-lived cache entries, and the arenas
keep growing with the cache's miss rate (bench/load.py soak, 64 MiB caches: RssAnon +820 MiB
in the 6.5 minutes after the rerank-tensor cache filled). `fix_mmap_threshold` pins the
threshold instead (and so the trim threshold at glibc's 128 KiB): a block above it that the
heap cannot already hold gets a mapping of its own, unmapped the moment it is freed.

That costs the reranker: a call's intermediates (~22 MB for 100 pairs) were mapped, faulted in
page by page and unmapped on every call, ~6,600 page faults a call in its worker thread
(bench/rerank_allocator.py). `set_top_pad` makes an arena keep a fixed pad above its top when
it grows or shrinks, so one call's intermediates stay in the worker's arena for the next call:
a fixed amount per arena that does such work, not the creep above.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

M_TOP_PAD = -2  # mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (2.33+): totals over every arena."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",  # bytes of the arenas' heaps (not mapped blocks)
            "ordblks",
            "smblks",
            "hblks",  # mapped blocks
            "hblkhd",  # bytes in mapped blocks
            "usmblks",
            "fsmblks",
            "uordblks",  # bytes allocated in the arenas
            "fordblks",  # bytes free in the arenas
            "keepcost",
        )
    ]


@lru_cache(maxsize=1)
def _libc():
    """glibc, or None on another C library (musl, macOS): nothing to tune there."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        if hasattr(libc, "mallinfo2"):
            libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    return libc


def trim_heap() -> bool:
    """Release free heap pages to the OS; True when glibc gave some back."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def can_trim_heap() -> bool:
    return _libc() is not None


def fix_mmap_threshold(nbytes: int) -> bool:
    """Serve every allocation of at least `nbytes` with its own mapping, and keep that
    threshold fixed (glibc only; True when set)."""
    libc = _libc()
    if libc is None or nbytes <= 0:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))


def set_top_pad(nbytes: int) -> bool:
    """Keep `nbytes` of free space above each arena's top when it grows or trims, so a
    worker's next large temporaries reuse it instead of new mappings (glibc only; True when
    set)."""
    libc = _libc()
    if libc is None or nbytes < 0:
        return False
    return bool(libc.mallopt(M_TOP_PAD, nbytes))


def heap_usage() -> dict[str, int] | None:
    """Bytes the allocator holds, by state: `in_use` and `free` inside the arenas, `mapped`
    in blocks of their own; None where glibc's mallinfo2 is missing. A leak grows `in_use`;
    fragmentation grows `free`."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    info = libc.mallinfo2()
    return {"in_use": info.uordblks, "free": info.fordblks, "mapped": info.hblkhd}

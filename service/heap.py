"""Hand freed heap memory back to the OS on a timer (glibc only).

Under load every search builds rerank tensors in worker threads and frees them a moment later,
while long-lived cache entries sit between them. glibc keeps the freed space in its per-thread
arenas, so the resident size creeps upward although nothing is leaked (bench/load.py soaks:
`malloc_trim(0)` once returned 766 MiB of such space without freeing a live object).
`malloc_trim(0)` releases the free pages of every arena; it is cheap next to a search.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import lru_cache

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None on another C library (musl, macOS): nothing to do there."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def trim_heap() -> bool:
    """Release free heap pages to the OS; True when glibc gave some back."""
    function = _malloc_trim()
    return bool(function(0)) if function is not None else False


def can_trim_heap() -> bool:
    return _malloc_trim() is not None

"""A device (GPU) copy of a CPU FAISS index, kept up to date by incremental writes.

The CPU index stays the truth (adds, removes, saves, training). `DeviceReplica` holds its copy on
a device and is only ever touched by the thread that searches it (the shortlist batcher's
worker; `ShortlistIndex` also serialises device searches with a mutex). Writers from other
threads only *record* what changed (`record_add`, `record_remove`, under the index's write
lock); the searching thread applies the record before its next search:

* adds: `add_with_ids` of just the new vectors on the copy (no re-copy);
* removes: GPU indexes cannot remove, so removed ids stay on the copy as hidden ids that
  searches filter out, over-fetching by their number;
* a full re-copy only when the hidden ids pass `HIDDEN_RECOPY_FRACTION` of the live vectors
  (and `HIDDEN_FLOOR`), when over-fetching would exceed the device's largest k, when an id comes
  back after a remove, when more vectors wait than the copy holds (and `PENDING_FLOOR`: past
  that the record would cost more memory than a copy), or when the CPU index changed structure
  ((re)training, compaction, a reload).

How a copy is made is injected (`DeviceBackend`): `FaissGpu` uses `faiss.index_cpu_to_gpu`;
tests pass a CPU stand-in (`faiss.clone_index`) to check what a write does to the copy.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import faiss
import numpy as np

logger = logging.getLogger(__name__)

HIDDEN_RECOPY_FRACTION = 0.1
HIDDEN_FLOOR = 64  # over-fetching this many more is free; small corpora need not re-copy
PENDING_FLOOR = 4096  # vectors waiting for the next search (4 MiB at 256-d) before a re-copy
GPU_MAX_K = 2048  # faiss GPU_MAX_SELECTION_K: GPU top-k selection stops here
CPU = "cpu"


class DeviceBackend(Protocol):
    """Where a replica lives and how it gets there."""

    name: str  # "cuda:0"
    max_k: int  # the largest k one device search may ask for

    def copy(self, index: faiss.Index) -> faiss.Index:
        """A device copy of the CPU `index` (raises when the index type cannot go there)."""
        ...

    def set_parameter(self, index: faiss.Index, name: str, value: int) -> None:
        """Set a search parameter on a copy made by `copy`."""
        ...


def faiss_gpu_id(device: str) -> int | None:
    """The FAISS GPU that the `device` setting means, or None for CPU FAISS.

    "cpu" -> None, even when faiss sees a GPU; "auto" -> GPU 0 when the installed faiss sees
    one, else None; "cuda" / "cuda:N" -> GPU 0 / N, a ValueError when faiss sees GPUs but not
    that one, and None with a warning under faiss-cpu (the model still runs on CUDA).
    """
    setting = device.strip().lower()
    visible = faiss_gpu_count()
    if setting == "cpu":
        return None
    if setting == "auto":
        return 0 if visible > 0 else None
    kind, _, number = setting.partition(":")
    if kind != "cuda" or (number and not number.isdigit()):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    gpu = int(number) if number else 0
    if visible == 0:
        logger.warning(
            "device %r, but the installed faiss has no GPU support (faiss-cpu): the shortlist "
            "searches on the CPU; install faiss-gpu-cu12 to search on the GPU",
            device,
        )
        return None
    if gpu >= visible:
        raise ValueError(f"device {device!r}: the installed faiss sees only {visible} GPU(s)")
    return gpu


def faiss_gpu_count() -> int:
    """GPUs the installed faiss can use (0 for faiss-cpu)."""
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


_gpu_resources: dict[int, Any] = {}
_gpu_resources_lock = threading.Lock()
_device_locks: dict[str, threading.Lock] = {}


def device_lock(name: str) -> threading.Lock:
    """One lock per device for the process: every index on it (they share its
    `StandardGpuResources`, which is not thread-safe) is searched and updated by one thread at
    a time."""
    with _gpu_resources_lock:
        return _device_locks.setdefault(name, threading.Lock())


def gpu_resources(gpu: int) -> Any:
    """One `StandardGpuResources` per GPU for the process (each one reserves scratch memory)."""
    with _gpu_resources_lock:
        if gpu not in _gpu_resources:
            _gpu_resources[gpu] = faiss.StandardGpuResources()
        return _gpu_resources[gpu]


class FaissGpu:
    """Copies indexes to FAISS GPU `gpu` and sets parameters through `GpuParameterSpace`.

    An IVF index whose coarse quantizer is an HNSW graph keeps that quantizer on the CPU
    (`allowCpuCoarseQuantizer`; FAISS GPU has no HNSW), copied with its efSearch.
    """

    max_k = GPU_MAX_K

    def __init__(self, gpu: int) -> None:
        self.gpu = gpu
        self.name = f"cuda:{gpu}"

    def copy(self, index: faiss.Index) -> faiss.Index:
        options = faiss.GpuClonerOptions()
        options.allowCpuCoarseQuantizer = True
        return faiss.index_cpu_to_gpu(gpu_resources(self.gpu), self.gpu, index, options)

    def set_parameter(self, index: faiss.Index, name: str, value: int) -> None:
        faiss.GpuParameterSpace().set_index_parameter(index, name, value)


@dataclass
class DeviceStats:
    """What the replica did since it was made (tests and /metrics read it)."""

    full_copies: int = 0
    vectors_added: int = 0  # applied incrementally
    ids_hidden: int = 0  # removes applied as hidden ids


class DeviceReplica:
    """The device copy of one CPU index and the writes not yet applied to it.

    `record_*` run under the owner index's write lock; `prepare` and the search run in the
    searching thread under the index's read lock plus its device mutex, so the two never meet.
    """

    def __init__(self, backend: DeviceBackend) -> None:
        self.backend = backend
        self.index: faiss.Index | None = None
        self.hidden: set[int] = set()
        self.stats = DeviceStats()
        self._stale = True
        self._pending_ids: list[np.ndarray] = []
        self._pending_vectors: list[np.ndarray] = []
        self._pending_count = 0
        self._pending_removes: set[int] = set()
        self._parameters_changed = True

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def hidden_count(self) -> int:
        return len(self.hidden)

    # --- called by writers (under the index's write lock) -----------------------------------

    def invalidate(self) -> None:
        """The CPU index changed structure: re-copy it before the next search."""
        self._stale = True
        self._drop_pending()

    def parameters_changed(self) -> None:
        self._parameters_changed = True

    def record_add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Vectors added on the CPU; `vectors` must not be changed by the caller afterwards."""
        if self._stale or self.index is None:
            return  # the next copy takes them with everything else
        id_set = {int(i) for i in ids}
        if id_set & self.hidden or id_set & self._pending_removes:
            self.invalidate()  # an id back after a remove: its old vector is still on the copy
            return
        if self._pending_count + len(ids) > max(self.index.ntotal, PENDING_FLOOR):
            self.invalidate()  # a copy costs less than holding this many vectors twice
            return
        self._pending_ids.append(ids)
        self._pending_vectors.append(vectors)
        self._pending_count += len(ids)

    def record_remove(self, ids: np.ndarray) -> None:
        if not (self._stale or self.index is None):
            self._pending_removes.update(int(i) for i in ids)

    # --- called by the searching thread -----------------------------------------------------

    def prepare(
        self,
        source: faiss.Index,
        live_count: int,
        fetch: int,
        parameters: dict[str, int],
    ) -> None:
        """Bring the copy up to date with `source` (the CPU index) before searching `fetch`."""
        if not self._stale and self.index is not None:
            self._apply_pending()
            too_many_hidden = len(self.hidden) > max(
                HIDDEN_RECOPY_FRACTION * live_count, HIDDEN_FLOOR
            )
            if too_many_hidden or fetch + len(self.hidden) > self.backend.max_k:
                self._stale = True
        if self._stale or self.index is None:
            self._copy(source)
        if self._parameters_changed:
            for name, value in parameters.items():
                self.backend.set_parameter(self.index, name, value)
            self._parameters_changed = False

    def search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        assert self.index is not None
        return self.index.search(queries, min(fetch + len(self.hidden), self.index.ntotal))

    # --- internals --------------------------------------------------------------------------

    def _copy(self, source: faiss.Index) -> None:
        self.index = None  # free the old copy's device memory before making the new one
        self.index = self.backend.copy(source)
        self.hidden.clear()
        self._drop_pending()
        self._stale = False
        self._parameters_changed = True
        self.stats.full_copies += 1
        logger.info("copied %d vectors to %s", source.ntotal, self.backend.name)

    def _apply_pending(self) -> None:
        assert self.index is not None
        if self._pending_ids:
            ids = np.concatenate(self._pending_ids)
            vectors = np.concatenate(self._pending_vectors)
            self.index.add_with_ids(vectors, ids)
            self.stats.vectors_added += len(ids)
        if self._pending_removes:
            self.hidden.update(self._pending_removes)
            self.stats.ids_hidden += len(self._pending_removes)
        self._drop_pending()

    def _drop_pending(self) -> None:
        self._pending_ids.clear()
        self._pending_vectors.clear()
        self._pending_count = 0
        self._pending_removes.clear()

"""The FAISS shortlist index: inner product over l2-normalised pooled vectors, stable int64 ids.

One `ShortlistIndex` holds the images, another the captions. Any FAISS factory string works
("Flat", "IVF4096,Flat", "HNSW32", "IVF65536_HNSW32,PQ32"); `choose_factory` picks one by
corpus size.

Training rule: a factory that needs training (IVF, PQ) cannot be trained on an empty corpus.
Until enough vectors have arrived (`min_train_size`, by default 39 per IVF centroid and per PQ
code), vectors sit in an exact flat buffer that answers searches exactly; on the add that
reaches the threshold the real index is trained on everything buffered and takes it over.

Deletes: indexes that support `remove_ids` (Flat, IVF, PQ) remove in place. HNSW graphs cannot
remove, so deleted ids become tombstones that searches skip (over-fetching by their number);
the graph is rebuilt without them once they pass `TOMBSTONE_COMPACT_FRACTION` of the index.

Search parameters are set only where the index has them (`search_parameters`): nprobe on IVF,
efSearch on an HNSW graph, the quantizer's efSearch on IVF with an HNSW coarse quantizer.

Device search: given a `DeviceBackend` (a GPU), searches run on a device copy of the CPU index
(index/device.py) when its type can go there (Flat and IVF: yes; HNSW and plain PQ stay on the
CPU). Writes update the copy incrementally; device searches are serialised by a mutex, and the
service sends every search through one batcher thread, which gathers concurrent queries into one
`search_batch`.

Persistence is one self-describing file, replaced atomically (see `save`):

    b"CSFAISS1" | u64 little-endian header length | JSON header | faiss.serialize_index bytes

The header holds dim, factory, metric, count, whether the payload is the trained index or
the flat buffer, the tombstones, the payload's length and sha256 (so a truncated or corrupt
file is detected before FAISS parses it) and a caller `meta` dict (e.g. the model version).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.device import CPU, DeviceBackend, DeviceReplica, DeviceStats, device_lock
from index.errors import (
    CorruptIndexError,
    DimensionError,
    IndexMismatchError,
    full_disk_as_storage_full,
)
from index.locks import ReadWriteLock
from model.files import write_bytes_atomically

logger = logging.getLogger(__name__)

FLAT = "Flat"
DEFAULT_NPROBE = 32
DEFAULT_EF_SEARCH = 128
FLAT_MAX_VECTORS = 50_000  # below this an exact scan answers in well under a millisecond or two
PQ_MIN_VECTORS = 5_000_000  # above this float32 IVF lists stop fitting comfortably in RAM
TRAINING_POINTS_PER_CENTROID = 39  # FAISS warns below 39 points per k-means centroid
MAX_TRAINING_POINTS_PER_CENTROID = 64  # k-means cost grows with it; recall barely does
TOMBSTONE_COMPACT_FRACTION = 0.1
NORM_EPSILON = 1e-12
# A CPU search of fewer query rows than this runs on one OpenMP thread. FAISS scans such a batch
# one query at a time (below its BLAS threshold, also 20): a few hundred microseconds of work,
# less than waking a second thread costs on a busy host (1 query x 1k vectors: 5-10 ms on two
# threads after an idle gap, 0.2 ms on one; x 100k: 8-10 ms against 4.3 ms).
SMALL_SEARCH_ROWS = 20
_DEFAULT_SEARCH_THREADS = faiss.omp_get_max_threads()

FILE_MAGIC = b"CSFAISS1"
FILE_FORMAT_VERSION = 1
_HEADER_LENGTH = struct.Struct("<Q")

SearchJob = tuple[np.ndarray, int]  # (queries [Q, dim], k)
SearchResult = tuple[np.ndarray, np.ndarray]  # (scores float32 [Q, k], ids int64 [Q, k])


def choose_factory(num_vectors: int, dim: int) -> str:
    """A sensible FAISS factory string for a corpus of `num_vectors` vectors of `dim` dims.

    Exact flat search below FLAT_MAX_VECTORS; IVF with ~4·sqrt(n) lists (a power of two) and
    float32 lists up to PQ_MIN_VECTORS; beyond that IVF with an HNSW coarse quantizer and PQ
    codes of 8 dims per byte (e.g. 256-d -> PQ32, 32 bytes a vector).
    """
    if num_vectors < FLAT_MAX_VECTORS:
        return FLAT
    nlist = 2 ** round(math.log2(4 * math.sqrt(num_vectors)))
    if num_vectors < PQ_MIN_VECTORS:
        return f"IVF{nlist},Flat"
    subquantizers = next(m for m in (dim // 8, dim // 4, dim // 2, dim) if m and dim % m == 0)
    return f"IVF{nlist}_HNSW32,PQ{subquantizers}"


def l2_normalised(vectors: np.ndarray, dim: int) -> np.ndarray:
    """A float32 [N, dim] copy of `vectors` with unit rows; refuses wrong shapes and zero rows."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise DimensionError(f"expected vectors of shape [N, {dim}], got {np.shape(vectors)}")
    if not np.isfinite(array).all():
        raise DimensionError("vectors must be finite (no NaN or inf)")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if (norms < NORM_EPSILON).any():
        raise DimensionError("zero vectors cannot be l2-normalised; refuse them upstream")
    return np.ascontiguousarray(array / norms, dtype=np.float32)


def _as_ids(ids: np.ndarray | list[int]) -> np.ndarray:
    array = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
    if (array < 0).any():
        raise ValueError("ids must be non-negative (-1 marks an empty result slot)")
    return array


def search_parameters(
    index: faiss.Index, *, nprobe: int, ef_search: int, on_device: bool = False
) -> dict[str, int]:
    """The search parameters `index` has, by their faiss ParameterSpace names.

    nprobe for IVF; efSearch for an HNSW graph; quantizer_efSearch for IVF whose coarse quantizer
    is an HNSW graph (at least nprobe, since the quantizer returns nprobe lists). A Flat or PQ
    index has none. A GPU copy (`on_device`) has only nprobe: FAISS GPU has no HNSW graph, and
    an HNSW coarse quantizer stays a CPU index inside the copy, copied with its efSearch (so a
    change of ef_search re-copies).
    """
    inner = _unwrapped(index)
    parameters: dict[str, int] = {}
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        parameters["nprobe"] = nprobe
        if not on_device and hasattr(faiss.downcast_index(ivf.quantizer), "hnsw"):
            parameters["quantizer_efSearch"] = max(ef_search, nprobe)
    elif hasattr(inner, "hnsw") and not on_device:
        parameters["efSearch"] = ef_search
    return parameters


def device_capable(index: faiss.Index) -> bool:
    """Whether FAISS GPU has this index type: exact flat and IVF (flat, PQ, scalar quantizer)."""
    inner = _unwrapped(index)
    if isinstance(inner, faiss.IndexFlat):
        return True
    return isinstance(inner, faiss.IndexIVFFlat | faiss.IndexIVFPQ | faiss.IndexIVFScalarQuantizer)


def _unwrapped(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap2 | faiss.IndexIDMap):
        return faiss.downcast_index(index.index)
    return index


def _min_train_size(probe: faiss.Index, factory: str) -> int:
    """Vectors needed to train `probe` (built from `factory`) well enough."""
    needed = 1
    ivf = faiss.try_extract_index_ivf(probe)
    if ivf is not None:
        needed = max(needed, TRAINING_POINTS_PER_CENTROID * ivf.nlist)
    match = re.search(r"PQ\d+(?:x(\d+))?", factory)
    if match:
        bits = int(match.group(1) or 8)
        needed = max(needed, TRAINING_POINTS_PER_CENTROID * 2**bits)
    return needed


class ShortlistIndex:
    """Top-k inner-product search over unit vectors, keyed by stable non-negative int64 ids.

    Thread-safe: CPU searches run concurrently, device searches one at a time, adds/removes are
    exclusive. Inputs are l2-normalised here, so scores are cosine similarities in [-1, 1].
    `device`: search on a device copy (e.g. `FaissGpu(0)`) when the index type allows.
    """

    def __init__(
        self,
        dim: int,
        factory: str = FLAT,
        *,
        nprobe: int = DEFAULT_NPROBE,
        ef_search: int = DEFAULT_EF_SEARCH,
        device: DeviceBackend | None = None,
        min_train_size: int | None = None,
    ) -> None:
        if dim <= 0:
            raise DimensionError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.factory = factory
        self._nprobe = nprobe
        self._ef_search = ef_search
        self._lock = ReadWriteLock()
        probe = self._new_inner()
        self.min_train_size = (
            min_train_size if min_train_size is not None else _min_train_size(probe, factory)
        )
        self._trained = probe.is_trained
        self._index: faiss.Index = (
            _with_ids(probe) if self._trained else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        )
        self._ids: set[int] = set()
        self._tombstones: set[int] = set()
        self._replica = DeviceReplica(device) if device is not None else None
        # One search (and copy update) at a time on a device, whichever index it is for.
        self._device_lock = device_lock(device.name) if device is not None else threading.Lock()
        self._device_failed = False  # this index structure could not be copied to the device
        self._ef_grouped = False
        self._apply_search_parameters()

    # --- properties -------------------------------------------------------------------------

    @property
    def is_trained(self) -> bool:
        """False while vectors wait in the exact flat buffer for enough data to train on."""
        return self._trained

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        with self._lock.write():
            self._nprobe = value
            self._apply_search_parameters()

    @property
    def ef_search(self) -> int:
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        with self._lock.write():
            self._ef_search = value
            self._apply_search_parameters()

    @property
    def device(self) -> str:
        """Where searches run: the device's name ("cuda:0") or "cpu"."""
        return self._replica.name if self._searches_on_device() else CPU

    @property
    def device_stats(self) -> DeviceStats | None:
        """Full copies and incremental updates of the device copy; None without a device."""
        return self._replica.stats if self._replica is not None else None

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, int | np.integer) and int(item_id) in self._ids

    def ids(self) -> np.ndarray:
        """The live ids, sorted, int64."""
        with self._lock.read():
            return np.sort(np.fromiter(self._ids, dtype=np.int64, count=len(self._ids)))

    # --- mutation ---------------------------------------------------------------------------

    def add(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        """Add vectors [N, dim] under `ids` [N]; refuses ids already present."""
        id_array = _as_ids(ids)
        matrix = l2_normalised(vectors, self.dim)
        if len(id_array) != len(matrix):
            raise DimensionError(f"{len(id_array)} ids for {len(matrix)} vectors")
        if len(np.unique(id_array)) != len(id_array):
            raise ValueError("duplicate ids in one add")
        with self._lock.write():
            present = [int(i) for i in id_array if int(i) in self._ids]
            if present:
                raise ValueError(f"ids already in the index: {present[:10]}")
            if self._tombstones.intersection(int(i) for i in id_array):
                self._compact()
            self._index.add_with_ids(matrix, id_array)
            self._ids.update(int(i) for i in id_array)
            if not self._trained and len(self._ids) >= self.min_train_size:
                self._train_from_buffer()
            elif self._replica is not None:
                self._replica.record_add(id_array, matrix)

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """Remove `ids`; unknown ids are ignored. Returns how many were removed."""
        id_array = _as_ids(ids)
        with self._lock.write():
            present = np.array([i for i in id_array if int(i) in self._ids], dtype=np.int64)
            if len(present) == 0:
                return 0
            try:
                self._index.remove_ids(faiss.IDSelectorBatch(present))
            except RuntimeError:  # HNSW graphs cannot remove: skip them in searches instead
                self._tombstones.update(int(i) for i in present)
            self._ids.difference_update(int(i) for i in present)
            if self._replica is not None:
                self._replica.record_remove(present)
            if len(self._tombstones) > TOMBSTONE_COMPACT_FRACTION * max(len(self._ids), 1):
                self._compact()
            return len(present)

    # --- search -----------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Top-k for each query row: (scores float32 [Q, k], ids int64 [Q, k]), best first.

        Slots beyond the number of live vectors hold id -1 and score -inf.
        """
        return self.search_batch([(queries, k)])[0]

    def search_batch(self, jobs: Sequence[SearchJob]) -> list[SearchResult]:
        """`search` for several callers' (queries, k) at once: their rows are stacked into as
        few index searches as give each caller exactly what its own `search` would (one with
        the largest k; on an HNSW graph, whose candidate queue FAISS sizes max(efSearch, k),
        one per queue size), then every caller gets its own top-k."""
        prepared = []
        for queries, k in jobs:
            if k <= 0:
                raise ValueError(f"k must be positive, got {k}")
            prepared.append((l2_normalised(queries, self.dim), int(k)))
        results: list[SearchResult] = [_empty(len(m), k) for m, k in prepared]
        with self._lock.read():
            groups: dict[int, list[int]] = {}
            for job, (_, k) in enumerate(prepared):
                groups.setdefault(self._result_group(k), []).append(job)
            for members in groups.values():
                largest_k = max(prepared[job][1] for job in members)
                stacked = np.concatenate([prepared[job][0] for job in members])
                scores, ids = self._search_locked(stacked, largest_k)
                row = 0
                for job in members:
                    rows, k = len(prepared[job][0]), prepared[job][1]
                    results[job] = (scores[row : row + rows, :k], ids[row : row + rows, :k])
                    row += rows
        return results

    # --- persistence ------------------------------------------------------------------------

    def save(self, path: Path, *, meta: dict[str, Any] | None = None) -> None:
        """Write the index to `path` atomically (temp file, fsync, rename, fsync folder)."""
        with self._lock.read():
            payload = faiss.serialize_index(self._index)
            header = {
                "format_version": FILE_FORMAT_VERSION,
                "dim": self.dim,
                "factory": self.factory,
                "metric": "inner_product",
                "count": len(self._ids),
                "trained": self._trained,
                "min_train_size": self.min_train_size,
                "tombstones": sorted(self._tombstones),
                "payload_bytes": int(payload.nbytes),
                "payload_sha256": hashlib.sha256(payload.data).hexdigest(),
                "meta": meta or {},
            }
        header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
        chunks = [FILE_MAGIC, _HEADER_LENGTH.pack(len(header_bytes)), header_bytes, payload.data]
        with full_disk_as_storage_full():
            write_bytes_atomically(Path(path), chunks)

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        dim: int | None = None,
        factory: str | None = None,
        nprobe: int = DEFAULT_NPROBE,
        ef_search: int = DEFAULT_EF_SEARCH,
        device: DeviceBackend | None = None,
    ) -> tuple[ShortlistIndex, dict[str, Any]]:
        """Read an index written by `save`; returns it and the caller's `meta`.

        Raises FileNotFoundError when missing, CorruptIndexError when the file is truncated or
        its checksum or structure is wrong, IndexMismatchError when `dim`/`factory` are given
        and differ from the file's.
        """
        header, payload = _read_index_file(Path(path))
        if dim is not None and header["dim"] != dim:
            raise IndexMismatchError(f"{path} holds {header['dim']}-d vectors, expected {dim}-d")
        if factory is not None and header["factory"] != factory:
            raise IndexMismatchError(
                f"{path} was built with factory {header['factory']!r}, settings say {factory!r}"
            )
        try:
            inner = faiss.deserialize_index(payload)
        except RuntimeError as error:
            raise CorruptIndexError(f"FAISS cannot parse {path}: {error}") from error
        index = cls(
            header["dim"],
            header["factory"],
            nprobe=nprobe,
            ef_search=ef_search,
            device=device,
            min_train_size=header["min_train_size"],
        )
        if not isinstance(inner, faiss.IndexIDMap2) and faiss.try_extract_index_ivf(inner) is None:
            raise CorruptIndexError(f"{path} holds neither an id-mapped nor an IVF index")
        index._index = inner
        stored_ids = _stored_ids(inner)
        index._tombstones = set(header["tombstones"])
        index._ids = set(stored_ids.tolist()) - index._tombstones
        index._trained = header["trained"]
        if len(index._ids) != header["count"] or index._index.d != header["dim"]:
            raise CorruptIndexError(f"{path}: header and index disagree on count or dimension")
        index._structure_changed()
        return index, header["meta"]

    def trained_template(self) -> bytes | None:
        """The trained structure with no vector in it (an IVF's centroids, a PQ's codebooks),
        serialised: another process starts from it (`from_template`) instead of training
        again. None while untrained, or for a factory that needs no training."""
        with self._lock.read():
            if not self._trained or self._new_inner().is_trained:
                return None
            template = faiss.clone_index(self._index)
        template.reset()
        return faiss.serialize_index(template).tobytes()

    @classmethod
    def from_template(
        cls, template: bytes, dim: int, factory: str, **options: Any
    ) -> ShortlistIndex:
        """An empty, trained index from `trained_template`'s bytes (options as `__init__`).
        Raises CorruptIndexError when the bytes are not such an index of `dim`."""
        index = cls(dim, factory, **options)
        try:
            inner = faiss.deserialize_index(np.frombuffer(template, dtype=np.uint8))
        except RuntimeError as error:
            raise CorruptIndexError(f"FAISS cannot parse the index template: {error}") from error
        if inner.d != dim or inner.ntotal != 0 or not inner.is_trained:
            raise CorruptIndexError(
                f"the index template is not an empty trained {dim}-d index "
                f"(d={inner.d}, ntotal={inner.ntotal}, trained={inner.is_trained})"
            )
        if faiss.try_extract_index_ivf(inner) is None:
            raise CorruptIndexError("the index template is not an IVF index")
        index._index = inner
        index._trained = True
        index._structure_changed()
        return index

    # --- internals --------------------------------------------------------------------------

    def _new_inner(self) -> faiss.Index:
        try:
            inner = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            raise ValueError(f"invalid FAISS factory string {self.factory!r}: {error}") from error
        return inner

    def _train_from_buffer(self) -> None:
        """Train the real index on the buffered vectors and move them into it."""
        buffer_ids = _stored_ids(self._index)
        vectors = self._index.index.reconstruct_n(0, self._index.ntotal)
        target = self._new_inner()
        cap = MAX_TRAINING_POINTS_PER_CENTROID * max(self.min_train_size, 1)
        cap //= TRAINING_POINTS_PER_CENTROID
        sample = vectors
        if len(vectors) > cap:
            chosen = np.random.default_rng(0).choice(len(vectors), size=cap, replace=False)
            sample = vectors[np.sort(chosen)]
        target.train(sample)
        trained = _with_ids(target)
        trained.add_with_ids(vectors, buffer_ids)
        self._index = trained
        self._trained = True
        self._structure_changed()
        logger.info("trained %s on %d vectors", self.factory, len(sample))

    def _compact(self) -> None:
        """Rebuild without tombstoned vectors (HNSW cannot remove in place)."""
        all_ids = _stored_ids(self._index)
        vectors = self._index.index.reconstruct_n(0, self._index.ntotal)  # HNSW keeps vectors
        live = np.array([int(i) not in self._tombstones for i in all_ids], dtype=bool)
        inner = self._new_inner() if self._trained else faiss.IndexFlatIP(self.dim)
        if not inner.is_trained:
            inner.train(vectors[live])
        rebuilt = _with_ids(inner)
        rebuilt.add_with_ids(vectors[live], all_ids[live])
        self._index = rebuilt
        self._tombstones.clear()
        self._structure_changed()
        logger.info("compacted %s: %d live vectors", self.factory, int(live.sum()))

    def _structure_changed(self) -> None:
        """A new CPU index (trained, compacted, loaded): re-copy it, and try the device again."""
        self._device_failed = False
        if self._replica is not None:
            self._replica.invalidate()
        self._apply_search_parameters()

    def _apply_search_parameters(self) -> None:
        parameters = search_parameters(self._index, nprobe=self._nprobe, ef_search=self._ef_search)
        inner = _unwrapped(self._index)
        ivf = faiss.try_extract_index_ivf(inner)
        for name, value in parameters.items():
            if name == "nprobe":
                ivf.nprobe = value
            elif name == "quantizer_efSearch":
                faiss.downcast_index(ivf.quantizer).hnsw.efSearch = value
            elif name == "efSearch":
                inner.hnsw.efSearch = value
        self._ef_grouped = "efSearch" in parameters
        if self._replica is not None:
            if "quantizer_efSearch" in parameters:  # it travels inside the copy
                self._replica.invalidate()
            else:
                self._replica.parameters_changed()

    def _searches_on_device(self) -> bool:
        return self._replica is not None and not self._device_failed and device_capable(self._index)

    def _result_group(self, k: int) -> int:
        """Searches with the same group give each query the same top-k whatever the k asked:
        every k on flat and IVF; on an HNSW graph, every k with the same beam max(efSearch, k)."""
        if not self._ef_grouped:
            return 0
        return max(self._ef_search, k + len(self._tombstones))

    def _search_locked(self, matrix: np.ndarray, k: int) -> SearchResult:
        """Search under the read lock, on the device copy when there is one, else the CPU."""
        fetch = min(k + len(self._tombstones), self._index.ntotal)
        if fetch == 0:
            return _empty(len(matrix), k)
        replica = self._replica
        if replica is not None and self._searches_on_device() and fetch <= replica.backend.max_k:
            with self._device_lock:
                try:
                    replica.prepare(
                        self._index,
                        len(self._ids),
                        fetch,
                        search_parameters(
                            self._index,
                            nprobe=self._nprobe,
                            ef_search=self._ef_search,
                            on_device=True,
                        ),
                    )
                    found_scores, found_ids = replica.search(matrix, fetch)
                except (RuntimeError, AttributeError) as error:  # FAISS reports C++ errors so
                    logger.warning(
                        "%s cannot be searched on %s (%s); searching on the CPU until it changes",
                        self.factory,
                        replica.name,
                        error,
                    )
                    replica.invalidate()
                    self._device_failed = True
                else:
                    excluded = self._tombstones | replica.hidden
                    return _best_live(found_scores, found_ids, excluded, k)
        # OpenMP's thread count is the calling thread's own setting: this search only.
        faiss.omp_set_num_threads(search_threads(len(matrix)))
        found_scores, found_ids = self._index.search(matrix, fetch)
        return _best_live(found_scores, found_ids, self._tombstones, k)


def search_threads(rows: int) -> int:
    """OpenMP threads for a CPU search of `rows` query rows (see SMALL_SEARCH_ROWS)."""
    return 1 if rows < SMALL_SEARCH_ROWS else _DEFAULT_SEARCH_THREADS


def _with_ids(inner: faiss.Index) -> faiss.Index:
    """`inner` able to hold arbitrary int64 ids.

    IVF indexes store ids natively and remove in place, so they are used as they are
    (IndexIDMap's remove assumes the inner index shifts ids, which IVF does not). Every other
    index is wrapped in an IndexIDMap2.
    """
    if faiss.try_extract_index_ivf(inner) is not None:
        return inner
    return faiss.IndexIDMap2(inner)


def _stored_ids(index: faiss.Index) -> np.ndarray:
    """Every id physically present in `index` (including tombstoned ones), int64."""
    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    lists = ivf.invlists
    chunks = [
        faiss.rev_swig_ptr(lists.get_ids(list_no), lists.list_size(list_no)).copy()
        for list_no in range(ivf.nlist)
        if lists.list_size(list_no)
    ]
    return np.concatenate(chunks).astype(np.int64) if chunks else np.empty(0, dtype=np.int64)


def _empty(rows: int, k: int) -> SearchResult:
    return np.full((rows, k), -np.inf, dtype=np.float32), np.full((rows, k), -1, dtype=np.int64)


def _best_live(scores: np.ndarray, ids: np.ndarray, excluded: set[int], k: int) -> SearchResult:
    """The first k found slots of each row that hold a live id (not -1, not `excluded`), in
    order, padded with id -1 / score -inf."""
    live = ids >= 0
    if excluded:
        live &= ~np.isin(ids, np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
    order = np.argsort(~live, axis=1, kind="stable")[:, :k]  # live slots first, order kept
    kept = np.take_along_axis(live, order, axis=1)
    out_scores, out_ids = _empty(len(ids), k)
    width = order.shape[1]
    out_scores[:, :width] = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf)
    out_ids[:, :width] = np.where(kept, np.take_along_axis(ids, order, axis=1), -1)
    return out_scores, out_ids


def _read_index_file(path: Path) -> tuple[dict[str, Any], np.ndarray]:
    data = path.read_bytes()
    prefix = len(FILE_MAGIC) + _HEADER_LENGTH.size
    if len(data) < prefix or data[: len(FILE_MAGIC)] != FILE_MAGIC:
        raise CorruptIndexError(f"{path} is not a camp-search index file (bad magic or empty)")
    (header_length,) = _HEADER_LENGTH.unpack_from(data, len(FILE_MAGIC))
    try:
        header = json.loads(data[prefix : prefix + header_length])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptIndexError(f"{path}: unreadable header ({error})") from error
    if header.get("format_version") != FILE_FORMAT_VERSION:
        raise CorruptIndexError(f"{path}: unknown format version {header.get('format_version')}")
    payload = data[prefix + header_length :]
    if len(payload) != header["payload_bytes"]:
        raise CorruptIndexError(
            f"{path} is truncated: {len(payload)} of {header['payload_bytes']} payload bytes"
        )
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise CorruptIndexError(f"{path}: payload checksum mismatch (corrupt file)")
    return header, np.frombuffer(payload, dtype=np.uint8)

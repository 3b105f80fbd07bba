"""The corpus: catalog + durable feature store + shortlist indexes, with ONE ingest order and
ONE recovery rule. No model logic: callers pass arrays computed elsewhere.

Ingest order (`add_image`, `add_caption`):
  1. image bytes -> ``images/<sha[:2]>/<sha256><ext>`` (temp file, fsync, rename, fsync dir);
     the name is the content hash, never a client's file name;
  2. ids reserved in the catalog (a committed counter; never reused);
  3. region features (float16), pooled vectors (float32) and the reranker's per-item tensors
     (float16, keyed by the tensor version: the checkpoint's identity) -> LMDB, in ONE
     transaction;
  4. catalog rows -> SQLite, in ONE transaction.  THIS COMMIT IS THE ACKNOWLEDGEMENT:
     the item exists once, and only once, it commits;
  5. pooled vectors -> the in-memory FAISS indexes (saved by `save`, which records the model
     version and catalog sequence it matches).
Deletes commit the catalog first (the acknowledgement), then update indexes, store, cache, file.

PostgreSQL mode (`database_url`, see `index.postgres`): steps 3 and 4 are ONE database
transaction that also appends change rows; its commit is the acknowledgement. Several
processes ("replicas") share the database and an images folder; each keeps its own FAISS
indexes in memory, built from the database at open (no index files) and kept current by a
`ChangeFollower` (LISTEN/NOTIFY plus a catch-up by change sequence). A replica's own writes
reach its indexes at once, as in the embedded mode.

Recovery rule (`Corpus.open`): THE CATALOG IS THE TRUTH.
  * store entries (region features, pooled vectors, rerank tensors of any version) and image
    files whose id / path has no catalog row are orphans of a crash before step 4 (or after a
    delete's commit): they are deleted, so never visible;
  * each index file is loaded; if it is missing, unreadable, truncated, fails its checksum or
    was built for another dimension/model version, it is REBUILT from the pooled vectors in the
    store; if it loads but its ids differ from the catalog's (a crash after step 4 before the
    next save), it is RECONCILED: missing ids added from the store, extra ids removed.
    Either way a warning says so and why, and the repaired index is saved.
  * items without a pooled vector of the current model version (a version change) stay out of
    the index (versions never mix) and are counted in `recovery.missing_pooled`; the service
    re-embeds them in the background (`put_pooled`, service/search/tensor_rebuild.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index.cache import CachedFeatureStore, FeatureCache, LocalFeatureCache, cache_keyspace
from index.catalog import CaptionRecord, Catalog, ImageRecord
from index.codec import decode_arrays
from index.device import FaissGpu
from index.errors import (
    CorruptIndexError,
    DimensionError,
    IndexMismatchError,
    NotFoundError,
    StorageError,
    full_disk_as_storage_full,
)
from index.feature_store import DEFAULT_MAP_SIZE, FeatureStore
from index.locks import ReadWriteLock
from index.namespaces import (
    CAPTION_PREFIXES,
    IMAGE_PREFIXES,
    Kind,
    pooled_namespace,
    regions_namespace,
    rerank_namespace,
)
from index.postgres import (
    Change,
    DuplicateImageError,
    PostgresCatalog,
    PostgresDatabase,
    PostgresFeatureStore,
    PrimaryReadsLock,
    SessionLock,
)
from index.read_routing import ReadRouter
from index.shortlist import (
    DEFAULT_EF_SEARCH,
    DEFAULT_NPROBE,
    FLAT,
    SearchJob,
    SearchResult,
    ShortlistIndex,
    choose_factory,
)
from model.files import TEMP_SUFFIX, write_bytes_atomically
from model.types import RegionFeatures, stored_region_arrays

logger = logging.getLogger(__name__)

CATALOG_FILE = "catalog.sqlite3"
STORE_DIR = "features"
IMAGES_DIR = "images"
INDEX_DIR = "index"
AUTO_FACTORY = "auto"
REBUILD_BATCH = 10_000
STORED_FILE_BATCH = 1_000  # catalog rows read per query when checking stored photos
EXTENSION_PATTERN = re.compile(r"^(\.[a-z0-9]{1,5})?$")
POOLED_KEY = "vector"
SHA256_NAME = re.compile(r"^[0-9a-f]{64}(\.[a-z0-9]{1,5})?$")
# PostgreSQL mode: a temp file of an image write is removed at open only once it is this old,
# since another replica may be writing it for a transaction still in flight.
SHARED_ORPHAN_FILE_AGE_S = 3600.0


def sha256_hex(data: bytes) -> str:
    """The content address of image bytes (lower-case hex SHA-256): the stored file's name and
    the catalog's duplicate key. Hash an upload once and pass the result along."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class NewCaption:
    text: str
    token_ids: Sequence[int]
    pooled: np.ndarray  # float [dim], the caption's shortlist vector
    rerank: Mapping[str, np.ndarray] | None = None  # its rerank tensors (stored as given)


@dataclass(frozen=True)
class AddedImage:
    image: ImageRecord
    captions: tuple[CaptionRecord, ...]
    created: bool  # False: an image with the same sha256 existed; nothing was written


@dataclass(frozen=True)
class IndexSummary:
    """One shortlist index as status pages and metrics report it (held in memory: no I/O)."""

    factory: str
    count: int
    trained: bool
    device: str
    full_copies: int | None  # host-to-GPU copies of the whole index; None on the CPU


@dataclass
class RecoveryReport:
    """What `Corpus.open` found and repaired (also logged)."""

    orphan_features: int = 0
    orphan_files: int = 0
    rebuilt: dict[str, str] = field(default_factory=dict)  # index name -> why
    reconciled: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (+n, -n)
    missing_pooled: dict[str, int] = field(default_factory=dict)  # name -> rows not indexable


class Corpus:
    """Images and captions that survive restarts and crashes, searchable by pooled vector.

    Thread-safe: writes are serialised; searches run concurrently and never see a row that is
    not committed in the catalog or that a committed delete removed.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        dim: int,
        extractor: str,
        extractor_version: str,
        model_version: str,
        image_factory: str = FLAT,
        caption_factory: str = FLAT,
        nprobe: int = DEFAULT_NPROBE,
        ef_search: int = DEFAULT_EF_SEARCH,
        gpu_id: int | None = None,
        cache: FeatureCache | None = None,
        map_size: int = DEFAULT_MAP_SIZE,
        tensor_version: str | None = None,
        keep_region_features: bool = True,
        database_url: str | None = None,
        read_router: ReadRouter | None = None,
    ) -> None:
        """Prefer `Corpus.open`, which also runs the recovery rule.

        `gpu_id`: the FAISS GPU to search on (see index.device.faiss_gpu_id), None for the CPU.
        `tensor_version`: the identity of the rerank tensors (the checkpoint's; default the
        model version). `keep_region_features=False`: an image stored with its rerank tensors
        keeps no region features (less disk; a new model can then not rebuild its tensors).
        `database_url`: a postgresql:// URL to keep the catalog and features in (shared by
        replicas); `data_dir` then only holds the images folder (shared too). `read_router`
        instead: the same, over a router the caller owns (primary + read replica connections;
        the service's one set); `database_url` then is not needed.
        """
        self.data_dir = Path(data_dir)
        self.dim = dim
        self.model_version = model_version
        self.tensor_version = tensor_version or model_version
        self.keep_region_features = keep_region_features
        self.extractor = extractor
        self.extractor_version = extractor_version
        self.regions_namespace = regions_namespace(extractor, extractor_version)
        self._factories = {"images": image_factory, "captions": caption_factory}
        self._index_options: dict[str, Any] = {
            "nprobe": nprobe,
            "ef_search": ef_search,
            "device": FaissGpu(gpu_id) if gpu_id is not None else None,
        }
        self.database: PostgresDatabase | None = None
        self.catalog: Catalog | PostgresCatalog
        self.store: FeatureStore | PostgresFeatureStore
        if read_router is not None or database_url:
            self.database = PostgresDatabase(read_router or database_url)  # type: ignore[arg-type]
            self.catalog = PostgresCatalog(self.database)
            self.store = PostgresFeatureStore(self.database)
        else:
            self.catalog = Catalog(self.data_dir / CATALOG_FILE)
            self.store = FeatureStore(self.data_dir / STORE_DIR, map_size=map_size)
        self.cache = cache if cache is not None else LocalFeatureCache()
        self.regions = CachedFeatureStore(
            self.store,
            self.cache,
            namespace=self.regions_namespace,
            keyspace=cache_keyspace(extractor, extractor_version),
        )
        self.rerank: dict[Kind, CachedFeatureStore] = {
            kind: CachedFeatureStore(
                self.store,
                self.cache,
                namespace=rerank_namespace(kind, self.tensor_version),
                keyspace=cache_keyspace(f"rerank-{kind}", self.tensor_version),
            )
            for kind in ("images", "captions")
        }
        self.indexes: dict[Kind, ShortlistIndex] = {}
        # PostgreSQL mode: reads under the write lock go to the primary (a writer decides on
        # them; a read replica may lack another replica's latest commit).
        self._write_lock: threading.Lock | PrimaryReadsLock = (
            PrimaryReadsLock(self.database) if self.database is not None else threading.Lock()
        )
        self._visibility = ReadWriteLock()
        self._dirty = False
        self.recovery = RecoveryReport()
        # PostgreSQL mode: the change sequence this replica's indexes reflect (every change up
        # to it applied), and the follower that moves it.
        self._applied = threading.Condition()
        self.applied_sequence = 0
        self.follower: Any = None

    @classmethod
    def open(cls, data_dir: Path, **options: Any) -> Corpus:
        """Open (or create) the corpus in `data_dir` and apply the recovery rule.

        Options are `Corpus.__init__`'s keyword arguments. A factory of "auto" picks one by
        corpus size (`choose_factory`) when the index is (re)built.
        """
        corpus = cls(data_dir, **options)
        try:
            corpus._recover()
            if corpus.database is not None:
                from index.follower import ChangeFollower

                corpus.follower = ChangeFollower(corpus)
                corpus.follower.start()
        except BaseException:
            corpus._release_storage()
            raise
        return corpus

    @property
    def shared(self) -> bool:
        """Whether the stores are a database shared with other replicas (PostgreSQL mode)."""
        return self.database is not None

    # --- writes -----------------------------------------------------------------------------

    def add_image(
        self,
        image_bytes: bytes,
        *,
        width: int,
        height: int,
        region_features: np.ndarray,
        region_boxes: np.ndarray,
        pooled: np.ndarray,
        captions: Sequence[NewCaption] = (),
        extension: str = "",
        sha256: str | None = None,
        rerank: Mapping[str, np.ndarray] | None = None,
    ) -> AddedImage:
        """Store an image with its regions, shortlist vector and captions; durable on return.

        region_features [R, D] (stored float16), region_boxes [R, 4] normalised, pooled [dim].
        `rerank` (and each caption's): the reranker's tensors, stored as given under the
        tensor version, in the same transaction; without region features kept, only images
        that bring them leave their features out.
        `extension` (e.g. ".jpg", from the decoded format, never the client's name) is appended
        to the stored file name. An image whose sha256 exists is not stored again: the existing
        record comes back with `created=False` and `captions` are ignored (use `add_captions`).
        `sha256`: `sha256_hex(image_bytes)` when the caller already has it (hashed once).
        """
        features, boxes = _region_arrays(region_features, region_boxes)
        image_vector = self._pooled(pooled)
        caption_vectors = [self._pooled(caption.pooled) for caption in captions]
        if not EXTENSION_PATTERN.match(extension):
            raise ValueError(f"extension must look like '.jpg', got {extension!r}")
        if sha256 is None:
            sha256 = sha256_hex(image_bytes)
        with self._write_lock, self._content_lock(sha256):
            existing = self.catalog.find_image_by_sha256(sha256)
            if existing is not None:
                return AddedImage(existing, tuple(self.catalog.captions_of(existing.id)), False)
            stored_path = self._write_image_file(sha256, image_bytes, extension)
            (image_id,) = self.catalog.allocate_ids("images", 1)
            caption_ids = self.catalog.allocate_ids("captions", len(captions))
            region_record = stored_region_arrays(features, boxes, (width, height))
            puts: dict[str, dict[int, Mapping[str, np.ndarray]]] = {
                pooled_namespace("images", self.model_version): {
                    image_id: {POOLED_KEY: image_vector}
                },
            }
            if self.keep_region_features or rerank is None:
                puts[self.regions_namespace] = {image_id: region_record}
            if rerank is not None:
                puts[rerank_namespace("images", self.tensor_version)] = {image_id: rerank}
            if captions:
                puts[pooled_namespace("captions", self.model_version)] = {
                    cid: {POOLED_KEY: vector}
                    for cid, vector in zip(caption_ids, caption_vectors, strict=True)
                }
                puts.update(self._caption_rerank_puts(caption_ids, captions))
            created = time.time()
            image = ImageRecord(image_id, sha256, stored_path, int(width), int(height), created)
            caption_records = tuple(
                CaptionRecord(
                    cid, image_id, caption.text, tuple(map(int, caption.token_ids)), created
                )
                for cid, caption in zip(caption_ids, captions, strict=True)
            )
            if self.shared:
                try:
                    self._shared_catalog().insert([image], caption_records, features=puts)
                except DuplicateImageError:  # another replica committed these bytes first
                    existing = self.catalog.find_image_by_sha256(sha256)
                    if existing is None:
                        raise
                    captions_of = tuple(self.catalog.captions_of(existing.id))
                    return AddedImage(existing, captions_of, False)
                with self._visibility.write():
                    self.indexes["images"].add([image_id], image_vector[None])
                    if captions:
                        self.indexes["captions"].add(caption_ids, np.stack(caption_vectors))
                self._applied_own_write()
                return AddedImage(image, caption_records, True)
            try:
                self.store.write(puts)
                with self._visibility.write():
                    self.catalog.insert([image], caption_records)  # the acknowledgement
                    self.indexes["images"].add([image_id], image_vector[None])
                    if captions:
                        self.indexes["captions"].add(caption_ids, np.stack(caption_vectors))
            except BaseException:
                if self.catalog.get_image(image_id) is None:  # not acknowledged: undo
                    self._forget_files_and_features(
                        [stored_path], {image_id}, set(caption_ids), quiet=True
                    )
                raise
            self._dirty = True
            return AddedImage(image, caption_records, True)

    def add_caption(
        self,
        text: str,
        token_ids: Sequence[int],
        pooled: np.ndarray,
        *,
        image_id: int | None = None,
    ) -> CaptionRecord:
        """Add a caption (of `image_id`, or free-standing); durable on return.

        Raises NotFoundError when `image_id` is given and does not exist.
        """
        (record,) = self.add_captions([NewCaption(text, token_ids, pooled)], image_id=image_id)
        return record

    def add_captions(
        self,
        captions: Sequence[NewCaption],
        *,
        image_id: int | None = None,
        skip_present: bool = False,
    ) -> tuple[CaptionRecord, ...]:
        """Add captions (of `image_id`, or free-standing) in one commit; durable on return.

        With `skip_present`, a text `image_id` already has (or that comes twice here) is not
        added again; the check runs under the write lock, so concurrent calls cannot both add
        it. Returns the records added. Raises NotFoundError when `image_id` does not exist.
        """
        with self._write_lock:
            if image_id is not None and self.catalog.get_image(image_id) is None:
                raise NotFoundError(f"image {image_id} does not exist")
            if skip_present:
                present = (
                    {c.text for c in self.catalog.captions_of(image_id)}
                    if image_id is not None
                    else set()
                )
                fresh: list[NewCaption] = []
                for caption in captions:
                    if caption.text not in present:
                        present.add(caption.text)
                        fresh.append(caption)
                captions = fresh
            if not captions:
                return ()
            vectors = [self._pooled(caption.pooled) for caption in captions]
            caption_ids = self.catalog.allocate_ids("captions", len(captions))
            created = time.time()
            records = tuple(
                CaptionRecord(
                    cid, image_id, caption.text, tuple(map(int, caption.token_ids)), created
                )
                for cid, caption in zip(caption_ids, captions, strict=True)
            )
            puts = {
                pooled_namespace("captions", self.model_version): {
                    cid: {POOLED_KEY: vector}
                    for cid, vector in zip(caption_ids, vectors, strict=True)
                },
                **self._caption_rerank_puts(caption_ids, captions),
            }
            if self.shared:
                # One transaction (features, rows, changes); a caption of an image another
                # replica just deleted fails its foreign key: nothing is stored.
                try:
                    self._shared_catalog().insert(captions=records, features=puts)
                except StorageError as error:
                    if image_id is not None and self.catalog.get_image(image_id) is None:
                        raise NotFoundError(f"image {image_id} does not exist") from error
                    raise
                with self._visibility.write():
                    self.indexes["captions"].add(caption_ids, np.stack(vectors))
                self._applied_own_write()
                return records
            self.store.write(puts)
            try:
                with self._visibility.write():
                    self.catalog.insert(captions=records)  # the acknowledgement
                    self.indexes["captions"].add(caption_ids, np.stack(vectors))
            except BaseException:
                unacknowledged = {
                    cid for cid in caption_ids if self.catalog.get_caption(cid) is None
                }
                if unacknowledged:
                    self._forget_files_and_features([], set(), unacknowledged, quiet=True)
                raise
            self._dirty = True
            return records

    def delete_image(self, image_id: int) -> bool:
        """Delete an image, its captions, features and file. False when it did not exist."""
        with self._write_lock:
            image = self.catalog.get_image(image_id)
            if image is None:
                return False
            with self._content_lock(image.sha256):
                return self._delete_image(image)

    def _delete_image(self, image: ImageRecord) -> bool:
        with self._visibility.write():
            caption_ids = self.catalog.delete_image(image.id)  # the acknowledgement
            if caption_ids is None:
                return False
            self.indexes["images"].remove([image.id])
            self.indexes["captions"].remove(caption_ids)
        self._forget_files_and_features([image.stored_path], {image.id}, set(caption_ids))
        self._dirty = not self.shared
        self._applied_own_write()
        return True

    def delete_caption(self, caption_id: int) -> bool:
        with self._write_lock:
            with self._visibility.write():
                if not self.catalog.delete_caption(caption_id):  # the acknowledgement
                    return False
                self.indexes["captions"].remove([caption_id])
            self._forget_files_and_features([], set(), {caption_id})
            self._dirty = not self.shared
            self._applied_own_write()
            return True

    # --- reads ------------------------------------------------------------------------------

    def get_image(self, image_id: int) -> ImageRecord | None:
        return self.catalog.get_image(image_id)

    def get_images(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        return self.catalog.get_images(ids)

    def get_caption(self, caption_id: int) -> CaptionRecord | None:
        return self.catalog.get_caption(caption_id)

    def get_captions(self, ids: Sequence[int]) -> dict[int, CaptionRecord]:
        """{id: record} for the caption ids that exist, in one query."""
        return self.catalog.get_captions(ids)

    def captions_of(self, image_id: int) -> list[CaptionRecord]:
        return self.catalog.captions_of(image_id)

    def captions_of_images(self, image_ids: Sequence[int]) -> dict[int, list[CaptionRecord]]:
        """{image id: its captions} for the images that exist, in one query (a search's hits)."""
        return self.catalog.captions_of_images(image_ids)

    def count_images(self) -> int:
        return self.catalog.count_images()

    def count_captions(self) -> int:
        return self.catalog.count_captions()

    @property
    def sequence(self) -> int:
        """The catalog's change sequence: it moves with every committed write. In PostgreSQL
        mode, the change sequence this replica has applied (in memory: no query)."""
        if self.shared:
            return self.applied_sequence
        return self.catalog.sequence

    @property
    def written_sequence(self) -> int:
        """PostgreSQL mode: the change sequence of this process's last committed write (a
        search that waits for it sees that write); 0 embedded."""
        return self._shared_catalog().written_sequence if self.shared else 0

    def wait_for_sequence(self, sequence: int, timeout_s: float) -> bool:
        """Wait until the indexes reflect every change up to `sequence` (read-your-writes
        across replicas); False when `timeout_s` passed first. Always True embedded."""
        if not self.shared:
            return True
        with self._applied:
            if self.applied_sequence < sequence and self.follower is not None:
                self.follower.wake()
            return self._applied.wait_for(
                lambda: self.applied_sequence >= sequence, timeout=timeout_s
            )

    def apply_changes(self, changes: Sequence[Change], through: int) -> None:
        """Apply other replicas' committed changes (in sequence order) to the indexes and
        caches, then record that every change up to `through` is applied. Idempotent: this
        replica's own writes, already applied, come back here too."""
        with self._write_lock:
            plan: list[tuple[Kind, dict[int, np.ndarray], list[int]]] = []
            for kind in ("images", "captions"):
                added = [c.item_id for c in changes if c.kind == kind and c.op == "add"]
                deleted = [c.item_id for c in changes if c.kind == kind and c.op == "delete"]
                # An add deleted since has no stored vector any more: it is skipped.
                fresh = [i for i in dict.fromkeys(added) if i not in self.indexes[kind]]
                plan.append((kind, self.get_pooled(kind, fresh) if fresh else {}, deleted))
            # One visible step for both kinds: a write's image and captions appear together.
            with self._visibility.write():
                for kind, vectors, deleted in plan:
                    if vectors:
                        self.indexes[kind].add(list(vectors), np.stack(list(vectors.values())))
                    if deleted:
                        self.indexes[kind].remove(deleted)
            for kind, _, deleted in plan:
                if deleted:
                    if kind == "images":
                        self.regions.invalidate(deleted)
                    self.rerank[kind].invalidate(deleted)
            self._mark_applied(through)

    def _applied_own_write(self) -> None:
        """After this replica applied its own write (under the write lock): when the write's
        first change directly follows the applied sequence, nothing lies between (sequences
        are drawn in commit order), so the applied sequence moves past it at once and the
        writer's next search waits for nothing."""
        if not self.shared:
            return
        first, last = self._shared_catalog().last_write
        if first == self.applied_sequence + 1:
            self._mark_applied(last)

    def _mark_applied(self, sequence: int) -> None:
        with self._applied:
            if sequence > self.applied_sequence:
                self.applied_sequence = sequence
                self._applied.notify_all()

    def index_summaries(self) -> dict[Kind, IndexSummary]:
        """Each shortlist index's factory, size, training state and device (in memory)."""
        return {
            kind: IndexSummary(
                factory=index.factory,
                count=len(index),
                trained=index.is_trained,
                device=index.device,
                full_copies=(
                    None if index.device_stats is None else index.device_stats.full_copies
                ),
            )
            for kind, index in self.indexes.items()
        }

    def find_image_by_sha256(self, sha256: str) -> ImageRecord | None:
        return self.catalog.find_image_by_sha256(sha256)

    def image_path(self, record: ImageRecord) -> Path:
        return self.data_dir / record.stored_path

    def stored_file(self, image_id: int) -> tuple[ImageRecord, Path] | None:
        """The record and resolved file of an image that can be served, or None: no such id,
        its file is gone (deleted meanwhile), or its stored path leaves the data folder."""
        record = self.catalog.get_image(image_id)
        if record is None:
            return None
        path = self._readable_file(record)
        return None if path is None else (record, path)

    def _readable_file(self, record: ImageRecord) -> Path | None:
        """The record's file, or None: gone, or its stored path leaves the data folder."""
        path = self.image_path(record).resolve()
        if not path.is_relative_to(self.data_dir.resolve()):
            # Stored paths are written here (sha256 names), never by clients; one that leaves
            # the data folder means a tampered catalog: serve nothing.
            logger.error(
                "image %d has a stored path outside the data dir; not serving it", record.id
            )
            return None
        return path if path.is_file() else None

    def search_images(self, vectors: np.ndarray, k: int) -> SearchResult:
        """Shortlist images for query vectors [Q, dim]: (scores [Q, k], ids [Q, k]; -1 empty)."""
        return self.search_batch("images", [(vectors, k)])[0]

    def search_captions(self, vectors: np.ndarray, k: int) -> SearchResult:
        return self.search_batch("captions", [(vectors, k)])[0]

    def search_batch(self, kind: Kind, jobs: Sequence[SearchJob]) -> list[SearchResult]:
        """Several callers' (query vectors [Q, dim], k) against one index in one search; each
        gets what its own search would (see ShortlistIndex.search_batch)."""
        with self._visibility.read():
            return self.indexes[kind].search_batch(jobs)

    def get_region_features(self, ids: Sequence[int]) -> dict[int, RegionFeatures]:
        """Region records of `ids` (cache, then durable store); absent ids are absent."""
        return {
            item_id: RegionFeatures.from_stored(arrays, self.extractor, self.extractor_version)
            for item_id, arrays in self.regions.get_many(ids).items()
        }

    def get_rerank_tensors(
        self, kind: Kind, ids: Sequence[int]
    ) -> dict[int, dict[str, np.ndarray]]:
        """Stored rerank tensors of the current tensor version (cache, then durable store);
        ids without them (absent, or not rebuilt yet for this model) are absent."""
        return self.rerank[kind].get_many(ids)

    def put_rerank_tensors(
        self, kind: Kind, records: Mapping[int, Mapping[str, np.ndarray]]
    ) -> int:
        """Store rebuilt rerank tensors of items that still exist, in one transaction (items
        deleted meanwhile are skipped, so nothing is left that no catalog row owns). Returns
        how many were stored."""
        with self._write_lock:
            ids = [int(i) for i in records]
            present = self.catalog.get_images(ids) if kind == "images" else self.get_captions(ids)
            kept = {i: records[i] for i in ids if i in present}
            if not kept:
                return 0
            namespace = rerank_namespace(kind, self.tensor_version)
            if isinstance(self.store, PostgresFeatureStore):
                # Another replica may delete meanwhile: the write locks the rows it keeps.
                return len(self.store.write_owned(kind, namespace, kept))
            self.store.write({namespace: kept})
            return len(kept)

    def put_pooled(self, kind: Kind, vectors: Mapping[int, np.ndarray]) -> int:
        """Store rebuilt shortlist vectors of the current model for items that still exist
        (one transaction), then add them to the index so they become searchable. PostgreSQL
        mode: the same transaction appends an "add" change per item, so the other replicas'
        followers add them to their indexes too. A vector ingest would refuse (not finite, all
        zeros) is left out and logged. Returns how many were stored."""
        with self._write_lock:
            ids = [int(i) for i in vectors]
            present = self.catalog.get_images(ids) if kind == "images" else self.get_captions(ids)
            kept: dict[int, Mapping[str, np.ndarray]] = {}
            for i in ids:
                if i not in present:
                    continue
                try:
                    kept[i] = {POOLED_KEY: self._pooled(vectors[i])}
                except DimensionError as error:  # ingest would refuse it too; keep going
                    logger.error("%s %d not re-embedded: %s", kind, i, error)
            if not kept:
                return 0
            namespace = pooled_namespace(kind, self.model_version)
            if isinstance(self.store, PostgresFeatureStore):
                stored = self.store.write_owned(kind, namespace, kept, announce=True)
            else:
                self.store.write({namespace: kept})
                stored = list(kept)
            fresh = [i for i in stored if i not in self.indexes[kind]]
            if fresh:
                with self._visibility.write():
                    self.indexes[kind].add(fresh, np.stack([kept[i][POOLED_KEY] for i in fresh]))
                self._dirty = not self.shared
            return len(stored)

    def ids_without_pooled(self, kind: Kind) -> np.ndarray:
        """Catalog ids of `kind` without a shortlist vector of the current model (not
        searchable until one is stored: a model change), sorted."""
        present = self.catalog.image_ids() if kind == "images" else self.catalog.caption_ids()
        return np.setdiff1d(present, self.store.ids(pooled_namespace(kind, self.model_version)))

    def pooled_counts(self, kind: Kind) -> tuple[int, int]:
        """(items with a shortlist vector of the current model, items) of `kind` (see
        `rerank_tensor_counts`)."""
        stored = self.store.count(pooled_namespace(kind, self.model_version))
        items = self.count_images() if kind == "images" else self.count_captions()
        return stored, items

    def pooled_rebuild_lock(self) -> SessionLock | None:
        """PostgreSQL mode: the lock that lets one replica at a time re-embed the items
        without this model's shortlist vectors; None with the embedded stores."""
        if self.database is None:
            return None
        return SessionLock(self.database, f"pooled-vector-rebuild:{self.model_version}")

    def ids_without_rerank_tensors(self, kind: Kind) -> np.ndarray:
        """Catalog ids of `kind` that have no rerank tensors of the current version, sorted."""
        present = self.catalog.image_ids() if kind == "images" else self.catalog.caption_ids()
        stored = self.store.ids(rerank_namespace(kind, self.tensor_version))
        return np.setdiff1d(present, stored)

    def rerank_tensor_counts(self, kind: Kind) -> tuple[int, int]:
        """(items with rerank tensors of the current version, items) of `kind`: how far a
        rebuild is, whichever replica runs it (in PostgreSQL mode every stored record has
        its catalog row, so counting the namespace counts items)."""
        stored = self.store.count(rerank_namespace(kind, self.tensor_version))
        items = self.count_images() if kind == "images" else self.count_captions()
        return stored, items

    def tensor_rebuild_lock(self) -> SessionLock | None:
        """PostgreSQL mode: the lock that lets one replica at a time rebuild this model's
        rerank tensors for the whole database; None with the embedded stores (one process
        owns them)."""
        if self.database is None:
            return None
        return SessionLock(self.database, f"rerank-tensor-rebuild:{self.tensor_version}")

    def ids_with_region_features(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Those of `ids` whose region features are stored (a rebuild needs them)."""
        return np.intersect1d(
            np.asarray(ids, dtype=np.int64), self.store.ids(self.regions_namespace)
        )

    def ids_with_stored_files(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Those of `ids` whose photo file is stored (a region rebuild re-extracts it)."""
        ids = np.asarray(ids, dtype=np.int64)
        found = []
        for start in range(0, len(ids), STORED_FILE_BATCH):
            records = self.catalog.get_images(ids[start : start + STORED_FILE_BATCH].tolist())
            found += [i for i, record in records.items() if self._readable_file(record)]
        return np.asarray(sorted(found), dtype=np.int64)

    def put_region_features(self, regions: Mapping[int, RegionFeatures]) -> int:
        """Store re-extracted region features of the current extractor for images that still
        exist, in one transaction (images deleted meanwhile are skipped). Returns how many
        were stored."""
        with self._write_lock:
            ids = [int(i) for i in regions]
            present = self.catalog.get_images(ids)
            kept: dict[int, Mapping[str, np.ndarray]] = {}
            for i in ids:
                record = present.get(i)
                if record is None:
                    continue
                features, boxes = _region_arrays(regions[i].features, regions[i].boxes)
                kept[i] = stored_region_arrays(features, boxes, (record.width, record.height))
            if not kept:
                return 0
            if isinstance(self.store, PostgresFeatureStore):
                stored = len(self.store.write_owned("images", self.regions_namespace, kept))
            else:
                self.store.write({self.regions_namespace: kept})
                stored = len(kept)
            self.regions.invalidate(list(kept))
            return stored

    def region_rebuild_lock(self) -> SessionLock | None:
        """PostgreSQL mode: the lock that lets one replica at a time re-extract the region
        features of this extractor version from the stored photos; None when embedded."""
        if self.database is None:
            return None
        return SessionLock(self.database, f"region-rebuild:{self.regions_namespace}")

    def drop_region_features(self) -> int:
        """Delete the region features of images whose rerank tensors of this version are
        stored (`keep_region_features=False`); returns how many were dropped."""
        with self._write_lock:
            ids = np.intersect1d(
                self.store.ids(self.regions_namespace),
                self.store.ids(rerank_namespace("images", self.tensor_version)),
            )
            if len(ids):
                self.store.write(deletes={self.regions_namespace: ids.tolist()})
                self.regions.invalidate(ids.tolist())
            return len(ids)

    def get_pooled(self, kind: Kind, ids: Sequence[int]) -> dict[int, np.ndarray]:
        """Stored float32 shortlist vectors of the current model, {id: [dim]}."""
        found = self.store.get_many(pooled_namespace(kind, self.model_version), ids)
        return {i: arrays[POOLED_KEY] for i, arrays in found.items()}

    def status(self) -> dict[str, Any]:
        """Counts, index kinds and cache health (for /readyz and logs)."""
        database = (
            {}
            if self.database is None
            else {
                "database": {
                    "url": self.database.display_url,
                    "applied_sequence": self.applied_sequence,
                    **self.database.router.status(),
                }
            }
        )
        return {
            **database,
            "images": self.catalog.count_images(),
            "captions": self.catalog.count_captions(),
            "indexes": {
                name: {
                    "factory": summary.factory,
                    "count": summary.count,
                    "trained": summary.trained,
                    "device": summary.device,
                }
                for name, summary in self.index_summaries().items()
            },
            "cache": self.cache.status().as_dict(),
        }

    # --- lifecycle --------------------------------------------------------------------------

    def save(self) -> None:
        """Write both indexes atomically, recording the catalog sequence they match (PostgreSQL
        mode keeps no index files: a replica builds its indexes from the database)."""
        if self.shared:
            return
        with self._write_lock:
            self._save_indexes()

    def close(self) -> None:
        """Save the indexes if they changed and release the files (and the database)."""
        if self.follower is not None:
            self.follower.stop()
        with self._write_lock:
            if self._dirty and not self.shared:
                self._save_indexes()
            self._release_storage()

    def _release_storage(self) -> None:
        self.store.close()
        self.catalog.close()
        if self.database is not None:
            self.database.close()

    def __enter__(self) -> Corpus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- recovery ---------------------------------------------------------------------------

    def _recover(self) -> None:
        if self.shared:
            self._build_from_database()
            with self.database.primary_reads():  # type: ignore[union-attr]
                self._collect_shared_orphan_files()
            return
        with self._write_lock:
            self._collect_orphans()
            repaired = False
            for kind in ("images", "captions"):
                repaired |= self._load_or_rebuild(kind)
            if repaired:
                self._save_indexes()

    def _build_from_database(self) -> None:
        """PostgreSQL mode: build both indexes from the pooled vectors in one snapshot per
        kind, and start applying changes after the older snapshot's sequence (changes between
        the two snapshots come back to the follower, which applies them idempotently)."""
        assert isinstance(self.store, PostgresFeatureStore)
        with self._write_lock:
            snapshots = []
            for kind in ("images", "captions"):
                factory = self._factories[kind]
                if factory == AUTO_FACTORY:  # by the current size; the snapshot may differ a bit
                    count = (
                        self.catalog.count_images()
                        if kind == "images"
                        else self.catalog.count_captions()
                    )
                    factory = choose_factory(count, self.dim)
                index = self._shared_index(kind, factory)
                from_template = index.is_trained and index.factory != FLAT
                snapshot = 0
                for batch_snapshot, ids, vectors in self._pooled_batches(kind):
                    snapshot = batch_snapshot
                    if ids:
                        index.add(ids, vectors)
                self.indexes[kind] = index
                if not from_template and (template := index.trained_template()) is not None:
                    self.database.save_index_template(  # type: ignore[union-attr]
                        kind, self.model_version, factory, self.dim, template
                    )
                snapshots.append(snapshot)
                rows = (
                    self.catalog.count_images()
                    if kind == "images"
                    else self.catalog.count_captions()
                )
                if rows > len(index):  # rows without a vector of this model (a model change)
                    self.recovery.missing_pooled[kind] = rows - len(index)
                    logger.warning(
                        "%d %s have no pooled vector for model %s and are not searchable "
                        "until re-embedded: re-embedding in the background",
                        rows - len(index),
                        kind,
                        self.model_version,
                    )
            self._mark_applied(min(snapshots))

    def rebuild_from_database(self, reason: str) -> None:
        """PostgreSQL mode: build the indexes afresh from the database (the change log no
        longer holds every change this replica missed: it was offline past the retention)."""
        logger.warning("rebuilding the shortlist indexes from the database: %s", reason)
        self._build_from_database()

    def _shared_index(self, kind: Kind, factory: str) -> ShortlistIndex:
        """An empty index of `factory`: trained from the template another replica shared when
        there is one (no k-means at start), else untrained (it trains as vectors arrive)."""
        assert self.database is not None
        template = self.database.index_template(kind, self.model_version, factory, self.dim)
        if template is not None:
            try:
                return ShortlistIndex.from_template(
                    template, self.dim, factory, **self._index_options
                )
            except CorruptIndexError as error:
                logger.warning("ignoring the shared %s index template: %s", kind, error)
        return ShortlistIndex(self.dim, factory, **self._index_options)

    def _pooled_batches(self, kind: Kind) -> Iterator[tuple[int, list[int], np.ndarray]]:
        assert isinstance(self.store, PostgresFeatureStore)
        yield from self.store.iter_pooled(
            pooled_namespace(kind, self.model_version), kind, REBUILD_BATCH
        )

    def _collect_shared_orphan_files(self) -> None:
        """Image files no catalog row references: each is removed under its content lock, once
        the catalog (re-read under that lock) confirms no replica committed it meanwhile.
        Temp files are removed once SHARED_ORPHAN_FILE_AGE_S old (a younger one may be another
        replica's write in flight)."""
        images_dir = self.data_dir / IMAGES_DIR
        if not images_dir.is_dir():
            return
        referenced = {
            record.stored_path
            for record in self.catalog.get_images(self.catalog.image_ids().tolist()).values()
        }
        cutoff = time.time() - SHARED_ORPHAN_FILE_AGE_S
        for path in images_dir.rglob("*"):
            if not path.is_file() or path.relative_to(self.data_dir).as_posix() in referenced:
                continue
            if SHA256_NAME.match(path.name):
                sha256 = path.name[:64]
                with self._content_lock(sha256):
                    if self.catalog.find_image_by_sha256(sha256) is not None:
                        continue
                    path.unlink(missing_ok=True)
            elif path.name.endswith(TEMP_SUFFIX) and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
            else:
                continue
            self.recovery.orphan_files += 1
        if self.recovery.orphan_files:
            logger.warning(
                "removed %d orphan image files (never acknowledged)", self.recovery.orphan_files
            )

    def _collect_orphans(self) -> None:
        """Delete features and files that no catalog row owns (never acknowledged)."""
        valid = {"images": self.catalog.image_ids(), "captions": self.catalog.caption_ids()}
        deletes: dict[str, np.ndarray] = {}
        for namespace in self.store.namespaces():
            owner: Kind | None = (
                "images"
                if namespace.startswith(IMAGE_PREFIXES)
                else "captions"
                if namespace.startswith(CAPTION_PREFIXES)
                else None
            )
            if owner is None:
                continue
            orphans = np.setdiff1d(self.store.ids(namespace), valid[owner])
            if len(orphans):
                deletes[namespace] = orphans
        if deletes:
            self.store.write(deletes={ns: ids.tolist() for ns, ids in deletes.items()})
            self.recovery.orphan_features = int(sum(len(ids) for ids in deletes.values()))
            logger.warning(
                "removed %d orphan feature records (written before a crash, never acknowledged)",
                self.recovery.orphan_features,
            )
        images_dir = self.data_dir / IMAGES_DIR
        if images_dir.is_dir():
            referenced = {
                record.stored_path
                for record in self.catalog.get_images(valid["images"].tolist()).values()
            }
            for path in images_dir.rglob("*"):
                relative = path.relative_to(self.data_dir).as_posix()
                if path.is_file() and (
                    relative not in referenced or path.name.endswith(TEMP_SUFFIX)
                ):
                    path.unlink()
                    self.recovery.orphan_files += 1
            if self.recovery.orphan_files:
                logger.warning(
                    "removed %d orphan image files (never acknowledged)", self.recovery.orphan_files
                )

    def _load_or_rebuild(self, kind: Kind) -> bool:
        """Load the saved index of `kind` or repair it; True when it changed since the file."""
        path = self._index_path(kind)
        factory = self._factories[kind]
        expected_factory = None if factory == AUTO_FACTORY else factory
        catalog_ids = self.catalog.image_ids() if kind == "images" else self.catalog.caption_ids()
        try:
            index, meta = ShortlistIndex.load(
                path, dim=self.dim, factory=expected_factory, **self._index_options
            )
            if meta.get("model_version") != self.model_version:
                raise IndexMismatchError(
                    f"built for model {meta.get('model_version')!r}, now {self.model_version!r}"
                )
        except FileNotFoundError:
            reason = "no index file"
            return self._rebuild(kind, catalog_ids, reason, warn=len(catalog_ids) > 0)
        except (CorruptIndexError, IndexMismatchError, OSError) as error:
            return self._rebuild(kind, catalog_ids, str(error), warn=True)
        self.indexes[kind] = index
        extra = np.setdiff1d(index.ids(), catalog_ids)
        missing = np.setdiff1d(catalog_ids, index.ids())
        if len(extra) == 0 and len(missing) == 0:
            return False
        logger.warning(
            "%s index at %s is stale (catalog sequence %s, index saved at %s): "
            "adding %d, removing %d from the durable store",
            kind,
            path,
            self.catalog.sequence,
            meta.get("catalog_sequence"),
            len(missing),
            len(extra),
        )
        index.remove(extra)
        self._add_from_store(kind, index, missing)
        self.recovery.reconciled[kind] = (len(missing), len(extra))
        return True

    def _rebuild(self, kind: Kind, catalog_ids: np.ndarray, reason: str, *, warn: bool) -> bool:
        factory = self._factories[kind]
        if factory == AUTO_FACTORY:
            factory = choose_factory(len(catalog_ids), self.dim)
        if warn:
            logger.warning(
                "rebuilding the %s index (%s, %d vectors) from the durable store: %s",
                kind,
                factory,
                len(catalog_ids),
                reason,
            )
            self.recovery.rebuilt[kind] = reason
        index = ShortlistIndex(self.dim, factory, **self._index_options)
        self._add_from_store(kind, index, catalog_ids)
        self.indexes[kind] = index
        return True

    def _add_from_store(self, kind: Kind, index: ShortlistIndex, ids: np.ndarray) -> None:
        namespace = pooled_namespace(kind, self.model_version)
        lost = 0
        for start in range(0, len(ids), REBUILD_BATCH):
            chunk = ids[start : start + REBUILD_BATCH].tolist()
            found = self.store.get_many_encoded(namespace, chunk)
            lost += len(chunk) - len(found)
            if found:
                vectors = np.stack([decode_arrays(found[i])[POOLED_KEY] for i in found])
                index.add(list(found), vectors)
        if lost:
            self.recovery.missing_pooled[kind] = lost
            logger.warning(
                "%d %s have no pooled vector for model %s and are not searchable until "
                "re-embedded: re-embedding in the background",
                lost,
                kind,
                self.model_version,
            )

    # --- internals --------------------------------------------------------------------------

    def _shared_catalog(self) -> PostgresCatalog:
        assert isinstance(self.catalog, PostgresCatalog)
        return self.catalog

    def _content_lock(self, sha256: str) -> contextlib.AbstractContextManager[None]:
        """PostgreSQL mode: the cross-replica lock on one photo's file (see
        `PostgresDatabase.content_lock`); embedded, the write lock already serialises."""
        if self.database is None:
            return contextlib.nullcontext()
        return self.database.content_lock(sha256)

    def _index_path(self, kind: Kind) -> Path:
        return self.data_dir / INDEX_DIR / f"{kind}.faiss"

    def _save_indexes(self) -> None:
        meta = {"model_version": self.model_version, "catalog_sequence": self.catalog.sequence}
        for kind, index in self.indexes.items():
            index.save(self._index_path(kind), meta=meta)
        self._dirty = False

    def _caption_rerank_puts(
        self, caption_ids: Sequence[int], captions: Sequence[NewCaption]
    ) -> dict[str, dict[int, Mapping[str, np.ndarray]]]:
        """The rerank-tensor put of the captions that bring them (none: {})."""
        records = {
            cid: caption.rerank
            for cid, caption in zip(caption_ids, captions, strict=True)
            if caption.rerank is not None
        }
        return {rerank_namespace("captions", self.tensor_version): records} if records else {}

    def _pooled(self, vector: np.ndarray) -> np.ndarray:
        array = np.asarray(vector, dtype=np.float32).reshape(-1)
        if array.shape != (self.dim,) or not np.isfinite(array).all():
            raise DimensionError(
                f"pooled vectors must be finite [{self.dim}], got {np.shape(vector)}"
            )
        if not np.linalg.norm(array) > 0:
            raise DimensionError("a pooled vector is all zeros")
        return array

    def _write_image_file(self, sha256: str, data: bytes, extension: str) -> str:
        relative = f"{IMAGES_DIR}/{sha256[:2]}/{sha256}{extension}"
        target = self.data_dir / relative
        if not target.exists():
            with full_disk_as_storage_full():
                write_bytes_atomically(target, [data])
        return relative

    def _forget_files_and_features(
        self,
        stored_paths: Sequence[str],
        image_ids: set[int],
        caption_ids: set[int],
        *,
        quiet: bool = False,
    ) -> None:
        """Remove what no catalog row owns any more. Best effort when `quiet` (the next open
        collects anything left)."""
        deletes: dict[str, list[int]] = {}
        # PostgreSQL mode: features went with the catalog rows, in the same transaction.
        for namespace in [] if self.shared else self.store.namespaces():
            if namespace.startswith(IMAGE_PREFIXES) and image_ids:
                deletes[namespace] = sorted(image_ids)
            elif namespace.startswith(CAPTION_PREFIXES) and caption_ids:
                deletes[namespace] = sorted(caption_ids)
        try:
            if deletes:
                self.store.write(deletes=deletes)
            self.regions.invalidate(image_ids)
            self.rerank["images"].invalidate(image_ids)
            self.rerank["captions"].invalidate(caption_ids)
            for stored_path in stored_paths:
                (self.data_dir / stored_path).unlink(missing_ok=True)
        except Exception:
            if not quiet:
                raise
            logger.exception("cleanup after a failed write did not finish; next start will")


def _region_arrays(features: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float16 [R, D] features and float32 [R, 4] boxes; refuses wrong shapes and non-finite."""
    features = np.asarray(features)
    boxes = np.asarray(boxes, dtype=np.float32)
    if features.ndim != 2 or 0 in features.shape:
        raise DimensionError(f"region features must be [R, D] with R, D > 0, got {features.shape}")
    if boxes.shape != (features.shape[0], 4):
        raise DimensionError(f"region boxes must be [{features.shape[0]}, 4], got {boxes.shape}")
    if not np.isfinite(features).all() or not np.isfinite(boxes).all():
        raise DimensionError("region features and boxes must be finite")
    stored = features.astype(np.float16)
    if not np.isfinite(stored).all():
        raise DimensionError("region features overflow float16 (|x| > 65504): rescale them")
    return stored, boxes

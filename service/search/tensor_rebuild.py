"""Rebuilding what a new model lacks, in the background, with progress: first the region
features (when the extractor changed), then the pooled (shortlist) vectors, then the rerank
tensors.

A model trained on another extractor (`RetrievalModel.extractor_config`: another backbone,
input size or grid; the checkpoint records it) finds no region features of its extractor's
version: regions are keyed by it (`index.namespaces.regions_namespace`), so versions never mix.
`RegionRebuild` re-extracts them from the stored photos (the data dir keeps every ingested
photo), for the images the pooled or tensor rebuild will need, and the other two wait for it.
The old version's regions stay where they are: serving the old checkpoint again needs nothing.

A model change with a new model version (`RetrievalModel.version`) finds no pooled vectors in
its own namespace: those items are not searchable until `PooledRebuild` re-embeds them, images
from their stored region features (`RetrievalModel.pooled_images`, the zero-shot part included
when the model has one), captions from their catalog text (`RetrievalModel.encode_texts`),
exactly as ingest does. Each batch is stored (`Corpus.put_pooled`) and added to the index at
once; only vectors of the served model ever enter the index, so versions never mix in a
ranking. In PostgreSQL mode the same transaction appends an "add" change per item, so every
other replica's follower adds the new vectors to its own index. The tensor rebuild waits for
it (`TensorRebuild(after=...)`).

A model change (a new tensor version, `RetrievalModel.tensor_version`) finds no stored tensors
in its own namespace. The service starts anyway: searches compute the missing items' tensors on
the fly (service/search/pipeline.py), so results are never wrong, while one thread builds them
from the stored region features (images) and the catalog texts (captions), a batch at a time,
and stores them through `Corpus.put_rerank_tensors`. /readyz and Prometheus report how far it
is. With `CAMPSEARCH_KEEP_REGION_FEATURES=false` an image whose features were dropped is
re-extracted from its stored photo first; one whose photo file is gone too cannot be rebuilt:
`unbuildable_images` finds them so the service can refuse to start.

PostgreSQL mode: the rebuild is done once per database, not once per replica. A replica builds
only while it holds the session advisory lock of this model's rebuild (`Corpus.
tensor_rebuild_lock`); the others poll it, report the progress they read from the database
(items with tensors of this model / items), and take over when the holder releases it or dies
(the server ends a dead process's session, and with it the lock). The work is resumable: a
taker plans again and builds only the items still without tensors. Each replica ends by taking
the lock once and finding nothing left, so every replica's /readyz says "complete".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from index.corpus import Corpus, Kind
from index.errors import DatabaseUnavailableError
from index.postgres import SessionLock
from model.types import RegionFeatures
from model.vision.extractors import RegionExtractor
from model.vision.images import ImageInputError, decode_image
from service.search.stored_tensors import caption_record, image_record, record_or_none

if TYPE_CHECKING:
    from service.search.pipeline import SearchPipeline

logger = logging.getLogger(__name__)

REBUILD_BATCH = 64  # items per precompute call and per LMDB transaction
# Decoded pixels the region rebuild holds before it extracts them (bytes).
REGION_DECODE_BYTES = 256 * 1024 * 1024
# PostgreSQL mode: how often a replica that does not hold the rebuild lock tries to take it and
# reads the progress (two counts) from the database.
WAIT_POLL_S = 2.0
KINDS: tuple[Kind, ...] = ("images", "captions")


class TensorsUnbuildableError(RuntimeError):
    """Images lack rerank tensors of this model and their region features were dropped."""


@dataclass(frozen=True)
class RebuildProgress:
    """How far the rebuild of one kind is: `done` of `total` items (skipped ones included)."""

    done: int
    total: int
    skipped: int  # items that could not be built (no region features, float16 overflow)

    @property
    def finished(self) -> bool:
        return self.done >= self.total


def images_needing_regions(corpus: Corpus) -> np.ndarray:
    """Ids of images without pooled vectors or rerank tensors of the current model and
    without region features of the current extractor (what a rebuild would read), sorted."""
    missing = np.union1d(
        corpus.ids_without_rerank_tensors("images"), corpus.ids_without_pooled("images")
    )
    return np.setdiff1d(missing, corpus.ids_with_region_features(missing))


def unbuildable_images(corpus: Corpus) -> np.ndarray:
    """Ids of images that need region features (`images_needing_regions`) and whose stored
    photo is gone, so they can be neither re-extracted nor rebuilt."""
    lacking = images_needing_regions(corpus)
    return np.setdiff1d(lacking, corpus.ids_with_stored_files(lacking))


def refuse_unbuildable(corpus: Corpus) -> None:
    """Raise `TensorsUnbuildableError`, naming what to re-run, when a model change cannot be
    served because region features and photo files are both gone."""
    lacking = unbuildable_images(corpus)
    if len(lacking):
        unsearchable = np.intersect1d(lacking, corpus.ids_without_pooled("images"))
        raise TensorsUnbuildableError(
            f"{len(lacking)} images have no rerank tensors for model {corpus.tensor_version} "
            f"or no pooled vectors for model {corpus.model_version} ({len(unsearchable)} not "
            f"searchable), no region features of extractor {corpus.extractor_version} (with "
            "CAMPSEARCH_KEEP_REGION_FEATURES=false they are dropped) and no stored photo to "
            "extract them from, so they cannot be rebuilt: serve the checkpoint they were "
            "stored with, or re-run `camp-search ingest` of the photos into a fresh data dir "
            f"with this model (first ids: {lacking[:5].tolist()})"
        )


class BackgroundRebuild:
    """One background thread that stores, per kind, what the corpus lacks for its model.

    Subclasses say what is missing (`_missing_ids`, `_stored_counts`), how to build and store
    a batch (`_build`) and which lock shares the work between replicas (`_claim`). `plan`
    (blocking, at start) counts what is missing; `start` runs the thread; `progress` is safe
    to read from any thread. Items ingested meanwhile bring their own; items deleted
    meanwhile are skipped by the store.

    Progress: embedded, `done` of the `total` items this process found missing; PostgreSQL
    mode, items that have them of all items, read from the database (so every replica
    reports the one rebuild the same way).
    """

    what = "rerank tensors"  # for log lines
    thread_name = "tensor-rebuild"
    kinds: tuple[Kind, ...] = KINDS  # what it builds records of

    def __init__(
        self,
        corpus: Corpus,
        pipeline: SearchPipeline,
        *,
        batch_size: int = REBUILD_BATCH,
        poll_s: float | None = None,
        after: BackgroundRebuild | None = None,
    ) -> None:
        """`poll_s`: see WAIT_POLL_S. `after`: a rebuild that must end before this one builds
        (the regions a re-embedding reads, and the pooled vectors, without which items are not
        searchable, go first)."""
        self.corpus = corpus
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.poll_s = WAIT_POLL_S if poll_s is None else poll_s
        self.after = after
        self.claim = self._claim()  # None: embedded, this process does it all
        self._missing: dict[Kind, np.ndarray] = {kind: np.empty(0, np.int64) for kind in self.kinds}
        self._done = dict.fromkeys(self.kinds, 0)
        self._skipped = dict.fromkeys(self.kinds, 0)
        # PostgreSQL mode: (items that have them, items) per kind, as last read or built here.
        self._counts: dict[Kind, tuple[int, int]] = dict.fromkeys(self.kinds, (0, 0))
        self.built = dict.fromkeys(self.kinds, 0)  # items whose records this process stored
        self.elsewhere = False  # PostgreSQL mode: another replica holds the rebuild lock
        self._finished = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error = ""

    # --- what a subclass says -----------------------------------------------------------------

    def _claim(self) -> SessionLock | None:
        raise NotImplementedError

    def _missing_ids(self, kind: Kind) -> np.ndarray:
        raise NotImplementedError

    def _stored_counts(self, kind: Kind) -> tuple[int, int]:
        raise NotImplementedError

    def _build(self, kind: Kind, ids: Sequence[int]) -> tuple[int, int]:
        """Build and store the records of `ids`: (stored, skipped)."""
        raise NotImplementedError

    def _complete(self) -> None:
        """Called once every planned item is built (before `finished` turns true)."""

    def _planned_message(self, planned: Mapping[Kind, int]) -> str:
        return (
            f"{self.what} missing for {planned['images']} images and {planned['captions']} "
            "captions: rebuilding them in the background"
        )

    # --- the machinery ------------------------------------------------------------------------

    def plan(self) -> dict[Kind, int]:
        """Count the items of each kind without records of the current model (blocking)."""
        planned = self._find_missing()
        if any(planned.values()):
            logger.warning("%s", self._planned_message(planned))
        else:
            self._finished = True
        return planned

    def _find_missing(self) -> dict[Kind, int]:
        missing = {kind: self._missing_ids(kind) for kind in self.kinds}
        counts = (
            {kind: self._stored_counts(kind) for kind in self.kinds}
            if self.claim is not None
            else {}
        )
        with self._lock:
            self._missing = missing
            self._done = dict.fromkeys(self.kinds, 0)
            self._counts.update(counts)
        return {kind: len(ids) for kind, ids in missing.items()}

    def progress(self) -> dict[Kind, RebuildProgress]:
        with self._lock:
            if self.claim is not None:
                return {
                    kind: RebuildProgress(*self._counts[kind], self._skipped[kind])
                    for kind in self.kinds
                }
            return {
                kind: RebuildProgress(
                    self._done[kind], len(self._missing[kind]), self._skipped[kind]
                )
                for kind in self.kinds
            }

    @property
    def finished(self) -> bool:
        """Every item has its records of this model (or was skipped), whoever built them."""
        if self.claim is None:
            return all(p.finished for p in self.progress().values())
        return self._finished

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def ended(self) -> bool:
        """Finished, or its thread is over without finishing (stopped, or an error): what a
        rebuild started `after` it waits for. Not started yet is not ended."""
        started_and_over = self._thread is not None and not self._thread.is_alive()
        return self.finished or started_and_over

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the thread to stop after its current batch and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def run(self) -> None:
        """Build every planned item, a batch at a time (the thread's body; callable directly).
        PostgreSQL mode: only while holding the rebuild lock, else wait for it."""
        try:
            while self.after is not None and not self.after.ended and not self._stop.is_set():
                self._stop.wait(0.05)
            if self.claim is None:
                self._build_planned()
            elif not self._finished:
                self._run_shared()
        except Exception as error:  # searches still work; say why it stopped
            logger.exception("rebuilding the %s stopped", self.what)
            self.error = f"{type(error).__name__}: {error}"
        finally:
            if self.claim is not None:
                self.claim.close()

    def _build_planned(self) -> bool:
        """Build the planned items; False when stopped or (PostgreSQL mode) when the rebuild
        lock was lost on the way."""
        for kind in self.kinds:
            ids = self._missing[kind]
            for start in range(0, len(ids), self.batch_size):
                if self._stop.is_set():
                    return False
                if self.claim is not None and not self.claim.held():
                    logger.warning(
                        "lost the %s rebuild lock (the database session ended); waiting to "
                        "take it again (another replica may go on meanwhile)",
                        self.what,
                    )
                    return False
                chunk = ids[start : start + self.batch_size].tolist()
                stored, skipped = self._build(kind, chunk)
                with self._lock:
                    self._done[kind] += len(chunk)
                    self._skipped[kind] += skipped
                    self.built[kind] += stored
                    have, items = self._counts[kind]
                    self._counts[kind] = (min(have + stored, items), items)
        if self._stop.is_set():
            return False
        self._complete()
        if any(len(ids) for ids in self._missing.values()):
            logger.info("%s rebuilt", self.what)
        self._finished = True
        return True

    def _run_shared(self) -> None:
        """PostgreSQL mode: build while holding the lock (planning again first: what is left
        after another replica's work), else report the database's progress, until done."""
        assert self.claim is not None
        problem = ""
        while not self._stop.is_set():
            try:
                if self.claim.try_acquire():
                    self.elsewhere = False
                    try:
                        self._find_missing()
                        if self._build_planned():
                            return
                    finally:
                        self.claim.release()
                else:
                    self.elsewhere = True
                    counts = {kind: self._stored_counts(kind) for kind in self.kinds}
                    with self._lock:
                        self._counts.update(counts)
                problem = ""
            except DatabaseUnavailableError as error:  # a primary restart: wait it out
                if str(error) != problem:
                    logger.warning("%s rebuild waiting for the database: %s", self.what, error)
                problem = str(error)
            self._stop.wait(self.poll_s)


class RegionRebuild(BackgroundRebuild):
    """Re-extracts, from the stored photos, the region features of the served extractor that
    images lack and the pooled or tensor rebuild will read (a model trained on another
    extractor; or, with region features dropped, any model change). Photos are decoded as
    uploads are (`decode_image`, at the extractor's `decode_size`) and extracted a batch at a
    time; an image whose photo is gone or no longer decodes is skipped (logged)."""

    what = "region features"
    thread_name = "region-rebuild"
    kinds: tuple[Kind, ...] = ("images",)

    def __init__(
        self,
        corpus: Corpus,
        pipeline: SearchPipeline,
        extractor: RegionExtractor,
        *,
        max_image_pixels: int,
        batch_size: int = REBUILD_BATCH,
        poll_s: float | None = None,
    ) -> None:
        """`max_image_pixels`: the largest photo decoded (the service's upload limit)."""
        self.extractor = extractor
        self.max_image_pixels = max_image_pixels
        super().__init__(corpus, pipeline, batch_size=batch_size, poll_s=poll_s)

    def _claim(self) -> SessionLock | None:
        return self.corpus.region_rebuild_lock()

    def _missing_ids(self, kind: Kind) -> np.ndarray:
        return images_needing_regions(self.corpus)

    def _stored_counts(self, kind: Kind) -> tuple[int, int]:
        # Images that keep no regions (dropped once their tensors were stored) count as done.
        items = self.corpus.count_images()
        return items - len(self._missing_ids(kind)), items

    def _planned_message(self, planned: Mapping[Kind, int]) -> str:
        return (
            f"region features of extractor {self.corpus.extractor_version} missing for "
            f"{planned['images']} images: re-extracting them from the stored photos in the "
            "background (those images are not searchable until their pooled vectors follow)"
        )

    def _build(self, kind: Kind, ids: Sequence[int]) -> tuple[int, int]:
        regions: dict[int, RegionFeatures] = {}
        pending: dict[int, Image.Image] = {}
        pending_bytes = 0
        # Extracted a network batch at a time, and sooner when the decoded pixels waiting
        # reach REGION_DECODE_BYTES: 32 decoded 12-megapixel PNGs would hold over a gigabyte.
        for image_id in ids:
            photo = self._decoded(image_id)
            if photo is not None:
                pending[image_id] = photo
                pending_bytes += photo.width * photo.height * len(photo.getbands())
            full = len(pending) >= self.extractor.batch_size
            if pending and (full or pending_bytes >= REGION_DECODE_BYTES):
                regions.update(self._extracted(pending))
                pending, pending_bytes = {}, 0
        regions.update(self._extracted(pending))
        return self.corpus.put_region_features(regions), len(ids) - len(regions)

    def _extracted(self, photos: Mapping[int, Image.Image]) -> dict[int, RegionFeatures]:
        if not photos:
            return {}
        return dict(zip(photos, self.extractor.extract(list(photos.values())), strict=True))

    def _decoded(self, image_id: int) -> Image.Image | None:
        """The stored photo decoded as an upload is, or None (gone, or no longer decodes)."""
        found = self.corpus.stored_file(image_id)
        if found is None:  # deleted meanwhile, or its file is gone
            return None
        try:
            data = found[1].read_bytes()
            decoded = decode_image(
                data,
                max_bytes=max(len(data), 1),
                max_pixels=self.max_image_pixels,
                reduce_to=self.extractor.decode_size,
            )
        except (OSError, ImageInputError) as error:
            logger.error("image %d not re-extracted: %s", image_id, error)
            return None
        return decoded.image


class PooledRebuild(BackgroundRebuild):
    """Re-embeds the items without a pooled (shortlist) vector of the served model version,
    as ingest embeds them; each stored batch becomes searchable at once (`Corpus.put_pooled`).
    Images without region features cannot be re-embedded: they are skipped (the service
    refuses to start first when region features were dropped, see `refuse_unbuildable`)."""

    what = "pooled vectors"
    thread_name = "pooled-rebuild"

    def _claim(self) -> SessionLock | None:
        return self.corpus.pooled_rebuild_lock()

    def _missing_ids(self, kind: Kind) -> np.ndarray:
        return self.corpus.ids_without_pooled(kind)

    def _stored_counts(self, kind: Kind) -> tuple[int, int]:
        return self.corpus.pooled_counts(kind)

    def _planned_message(self, planned: Mapping[Kind, int]) -> str:
        return (
            f"pooled vectors of model {self.corpus.model_version} missing for "
            f"{planned['images']} images and {planned['captions']} captions (not searchable "
            "until then): re-embedding them in the background"
        )

    def _build(self, kind: Kind, ids: Sequence[int]) -> tuple[int, int]:
        if kind == "images":
            vectors = self.pipeline.computed_pooled_images(self.corpus.get_region_features(ids))
        else:
            captions = self.corpus.get_captions(ids)
            vectors = self.pipeline.computed_pooled_captions(
                {i: record.text for i, record in captions.items()}
            )
        return self.corpus.put_pooled(kind, vectors), len(ids) - len(vectors)


class TensorRebuild(BackgroundRebuild):
    """Stores the rerank tensors the corpus lacks for its model (after the pooled vectors)."""

    def __init__(
        self,
        corpus: Corpus,
        pipeline: SearchPipeline,
        *,
        drop_region_features: bool = False,
        batch_size: int = REBUILD_BATCH,
        poll_s: float | None = None,
        after: BackgroundRebuild | None = None,
    ) -> None:
        """`drop_region_features`: once every image has its tensors, delete the region
        features of those that do (CAMPSEARCH_KEEP_REGION_FEATURES=false)."""
        super().__init__(corpus, pipeline, batch_size=batch_size, poll_s=poll_s, after=after)
        self.drop_region_features = drop_region_features

    def _claim(self) -> SessionLock | None:
        return self.corpus.tensor_rebuild_lock()

    def _missing_ids(self, kind: Kind) -> np.ndarray:
        return self.corpus.ids_without_rerank_tensors(kind)

    def _stored_counts(self, kind: Kind) -> tuple[int, int]:
        return self.corpus.rerank_tensor_counts(kind)

    def _planned_message(self, planned: Mapping[Kind, int]) -> str:
        return (
            f"rerank tensors of model {self.corpus.tensor_version} missing for "
            f"{planned['images']} images and {planned['captions']} captions: rebuilding them "
            "in the background (searches compute them on the fly meanwhile)"
        )

    def _complete(self) -> None:
        if self.drop_region_features:
            dropped = self.corpus.drop_region_features()
            if dropped:
                logger.info("dropped the region features of %d images", dropped)

    def _build(self, kind: Kind, ids: Sequence[int]) -> tuple[int, int]:
        if kind == "images":
            regions = self.corpus.get_region_features(ids)
            tensors = self.pipeline.computed_image_tensors(regions)
            records = _records(tensors, image_record)
        else:
            captions = self.corpus.get_captions(ids)
            tensors = self.pipeline.computed_caption_tensors(
                {i: record.text for i, record in captions.items()}
            )
            records = _records(tensors, caption_record)
        return self.corpus.put_rerank_tensors(kind, records), len(ids) - len(records)


def _records(
    tensors: Mapping[int, Any], to_record: Callable[[Any], dict[str, np.ndarray]]
) -> dict[int, dict[str, np.ndarray]]:
    """Stored records of built tensors, leaving out those that overflow float16."""
    records = {i: record_or_none(to_record, item, f"item {i}") for i, item in tensors.items()}
    return {i: record for i, record in records.items() if record is not None}

"""Rebuilding the rerank tensors a new model lacks, in the background, with progress.

A model change (a new tensor version, `RetrievalModel.tensor_version`) finds no stored tensors
in its own namespace. The service starts anyway: searches compute the missing items' tensors on
the fly (service/search/pipeline.py), so results are never wrong, while one thread builds them
from the stored region features (images) and the catalog texts (captions), a batch at a time,
and stores them through `Corpus.put_rerank_tensors`. /readyz and Prometheus report how far it
is. With `CAMPSEARCH_KEEP_REGION_FEATURES=false` an image whose features were dropped cannot be
rebuilt; `unbuildable_images` finds them so the service can refuse to start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from index.corpus import Corpus, Kind
from service.search.stored_tensors import caption_record, image_record, record_or_none

if TYPE_CHECKING:
    from service.search.pipeline import SearchPipeline

logger = logging.getLogger(__name__)

REBUILD_BATCH = 64  # items per precompute call and per LMDB transaction
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


def unbuildable_images(corpus: Corpus) -> np.ndarray:
    """Ids of images without rerank tensors of the current model and without region features."""
    missing = corpus.ids_without_rerank_tensors("images")
    return np.setdiff1d(missing, corpus.ids_with_region_features(missing))


def refuse_unbuildable(corpus: Corpus) -> None:
    """Raise `TensorsUnbuildableError`, naming what to re-run, when a model change cannot be
    served because region features were dropped."""
    lacking = unbuildable_images(corpus)
    if len(lacking):
        raise TensorsUnbuildableError(
            f"{len(lacking)} images have no rerank tensors for model {corpus.tensor_version} "
            "and their region features were dropped (CAMPSEARCH_KEEP_REGION_FEATURES=false), so "
            "they cannot be rebuilt: serve the checkpoint they were stored with, or re-run "
            "`camp-search ingest` of the photos into a fresh data dir with this model "
            f"(first ids: {lacking[:5].tolist()})"
        )


class TensorRebuild:
    """One background thread that stores the rerank tensors the corpus lacks for its model.

    `plan` (blocking, at start) counts what is missing; `start` runs the thread; `progress`
    is safe to read from any thread. Items ingested meanwhile bring their own tensors; items
    deleted meanwhile are skipped by the store.
    """

    def __init__(
        self,
        corpus: Corpus,
        pipeline: SearchPipeline,
        *,
        drop_region_features: bool = False,
        batch_size: int = REBUILD_BATCH,
    ) -> None:
        """`drop_region_features`: once every image has its tensors, delete the region
        features of those that do (CAMPSEARCH_KEEP_REGION_FEATURES=false)."""
        self.corpus = corpus
        self.pipeline = pipeline
        self.drop_region_features = drop_region_features
        self.batch_size = batch_size
        self._missing: dict[Kind, np.ndarray] = {kind: np.empty(0, np.int64) for kind in KINDS}
        self._done = dict.fromkeys(KINDS, 0)
        self._skipped = dict.fromkeys(KINDS, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error = ""

    def plan(self) -> dict[Kind, int]:
        """Count the items of each kind without tensors of the current model (blocking)."""
        for kind in KINDS:
            self._missing[kind] = self.corpus.ids_without_rerank_tensors(kind)
        planned = {kind: len(ids) for kind, ids in self._missing.items()}
        if any(planned.values()):
            logger.warning(
                "rerank tensors of model %s missing for %d images and %d captions: rebuilding "
                "them in the background (searches compute them on the fly meanwhile)",
                self.corpus.tensor_version,
                planned["images"],
                planned["captions"],
            )
        return planned

    def progress(self) -> dict[Kind, RebuildProgress]:
        with self._lock:
            return {
                kind: RebuildProgress(
                    self._done[kind], len(self._missing[kind]), self._skipped[kind]
                )
                for kind in KINDS
            }

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="tensor-rebuild", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the thread to stop after its current batch and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def run(self) -> None:
        """Build every planned item, a batch at a time (the thread's body; callable directly)."""
        try:
            for kind in KINDS:
                ids = self._missing[kind]
                for start in range(0, len(ids), self.batch_size):
                    if self._stop.is_set():
                        return
                    self._build(kind, ids[start : start + self.batch_size].tolist())
            if self.drop_region_features and not self._stop.is_set():
                dropped = self.corpus.drop_region_features()
                if dropped:
                    logger.info("dropped the region features of %d images", dropped)
        except Exception as error:  # searches still work (on the fly); say why it stopped
            logger.exception("rebuilding the rerank tensors stopped")
            self.error = f"{type(error).__name__}: {error}"
        else:
            if any(len(ids) for ids in self._missing.values()) and not self._stop.is_set():
                logger.info("rerank tensors of model %s rebuilt", self.corpus.tensor_version)

    def _build(self, kind: Kind, ids: Sequence[int]) -> None:
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
        self.corpus.put_rerank_tensors(kind, records)
        with self._lock:
            self._done[kind] += len(ids)
            self._skipped[kind] += len(ids) - len(records)


def _records(
    tensors: Mapping[int, Any], to_record: Callable[[Any], dict[str, np.ndarray]]
) -> dict[int, dict[str, np.ndarray]]:
    """Stored records of built tensors, leaving out those that overflow float16."""
    records = {i: record_or_none(to_record, item, f"item {i}") for i, item in tensors.items()}
    return {i: record for i, record in records.items() if record is not None}

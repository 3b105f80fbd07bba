"""Region features of uploaded photos: reuse before recompute.

Extraction is the most expensive step of the service (tens of ms on a GPU, ~100 ms+ per photo
on a CPU), so an upload's features are looked up by the SHA-256 of its bytes, first in the
corpus (the same photo was ingested) and then in the feature cache (the same photo was searched
or ingested recently, by this or another replica sharing Redis), and only then extracted, on a
bounded pool of worker threads that never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from index.cache import FeatureCache, cache_keyspace
from index.codec import decode_arrays, encode_arrays
from index.corpus import Corpus
from index.errors import InvalidRecordError
from model.vision.extractors import RegionExtractor
from model.vision.images import DecodedImage
from service.runtime.metrics import ServiceMetrics
from service.search.batching import QueueFullError

# Extractions running at once; more wait in line, and past `max_waiting` callers get 429.
DEFAULT_EXTRACT_WORKERS = 1
UPLOAD_KEYSPACE_PREFIX = "upload-"
SHA256_BYTES = 32

RegionOrigin = Literal["corpus", "cache", "extractor"]


@dataclass(frozen=True)
class ImageRegions:
    """Region features of one photo, as the reranker and the explanation need them."""

    features: np.ndarray  # float16/32 [R, D]
    boxes: np.ndarray  # float32 [R, 4], normalised (x0, y0, x1, y1)
    image_size: tuple[int, int]  # (width, height) in pixels
    origin: RegionOrigin
    image_id: int | None = None  # the corpus image with the same bytes, if any

    @property
    def num_regions(self) -> int:
        return int(self.features.shape[0])


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cache_id(digest: bytes) -> int:
    """A 63-bit cache id from a digest; the full digest is stored and checked on read."""
    return int.from_bytes(digest[:8], "big") >> 1


class UploadRegions:
    """Region features for photo bytes: corpus by sha256, then the cache, then the extractor."""

    def __init__(
        self,
        corpus: Corpus,
        extractor: RegionExtractor,
        cache: FeatureCache,
        *,
        metrics: ServiceMetrics,
        workers: int = DEFAULT_EXTRACT_WORKERS,
        max_waiting: int = 64,
    ) -> None:
        self.corpus = corpus
        self.extractor = extractor
        self.cache = cache
        self.metrics = metrics
        self.keyspace = cache_keyspace(
            f"{UPLOAD_KEYSPACE_PREFIX}{extractor.name}", extractor.version
        )
        self.max_waiting = max_waiting
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="extract")
        self._in_flight = 0

    async def for_upload(self, data: bytes, decoded: DecodedImage) -> ImageRegions:
        """Regions of `data` (already validated and decoded into `decoded`)."""
        digest = hashlib.sha256(data).digest()
        known = await asyncio.to_thread(self._known, digest)
        if known is not None:
            self.metrics.upload_region_cache.labels(known.origin).inc()
            return known
        regions = await self.extract(decoded)
        await asyncio.to_thread(self._remember, digest, regions)
        self.metrics.upload_region_cache.labels("extractor").inc()
        return regions

    async def extract(self, decoded: DecodedImage) -> ImageRegions:
        """Run the extractor on one image in the worker pool (429 when too many wait)."""
        if self._in_flight >= self.max_waiting:
            raise QueueFullError(self._in_flight, retry_after_s=1)
        self._in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            with self.metrics.time_stage("extract"):
                (features,) = await loop.run_in_executor(
                    self._executor, self.extractor.extract, [decoded.image]
                )
        finally:
            self._in_flight -= 1
        return ImageRegions(
            features=features.features,
            boxes=features.boxes,
            image_size=tuple(int(v) for v in features.image_size),
            origin="extractor",
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def _known(self, digest: bytes) -> ImageRegions | None:
        record = self.corpus.find_image_by_sha256(digest.hex())
        if record is not None:
            stored = self.corpus.get_region_features([record.id]).get(record.id)
            if stored is not None:
                return ImageRegions(
                    stored.features, stored.boxes, stored.image_size, "corpus", record.id
                )
        cached = self.cache.get_many(self.keyspace, [_cache_id(digest)])
        for value in cached.values():
            try:
                arrays = decode_arrays(value)
            except InvalidRecordError:
                return None
            if bytes(arrays["sha256"]) != digest:  # a 63-bit id collision: not our photo
                return None
            return ImageRegions(
                arrays["features"],
                arrays["boxes"],
                (int(arrays["image_size"][0]), int(arrays["image_size"][1])),
                "cache",
            )
        return None

    def _remember(self, digest: bytes, regions: ImageRegions) -> None:
        record = encode_arrays(
            {
                "features": np.asarray(regions.features, dtype=np.float16),
                "boxes": np.asarray(regions.boxes, dtype=np.float32),
                "image_size": np.asarray(regions.image_size, dtype=np.int32),
                "sha256": np.frombuffer(digest, dtype=np.uint8),
            }
        )
        self.cache.set_many(self.keyspace, {_cache_id(digest): record})

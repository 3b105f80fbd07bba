"""Region features of uploaded photos: reuse before recompute.

Extraction is the most expensive step of the service (tens of ms on a GPU, ~100 ms+ per photo
on a CPU), so an upload's features are looked up by the SHA-256 of its bytes, first in the
corpus (the same photo was ingested) and then in the feature cache (the same photo was searched
or ingested recently, by this or another replica sharing Redis), and only then extracted, off
the event loop. Extractions go through a `MicroBatcher`: photos of concurrent searches and
ingests that queued while the extractor was busy run as one batched network call (it never
waits for more, so a lone photo pays nothing), and past `max_waiting` callers get 429.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from index.cache import FeatureCache, cache_keyspace
from index.codec import decode_arrays, encode_arrays
from index.corpus import Corpus
from index.errors import InvalidRecordError
from model.types import RegionFeatures
from model.vision.extractors import RegionExtractor
from model.vision.images import DecodedImage
from service.runtime.metrics import ServiceMetrics
from service.search.batching import MicroBatcher

UPLOAD_KEYSPACE_PREFIX = "upload-"
SHA256_BYTES = 32

RegionOrigin = Literal["corpus", "cache", "extractor"]


@dataclass(frozen=True)
class FoundRegions:
    """An upload's region record and where it came from (metrics count the origins)."""

    regions: RegionFeatures
    origin: RegionOrigin
    image_id: int | None = None  # the corpus image with the same bytes, if any


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
        self.batcher: MicroBatcher[Image.Image, RegionFeatures] = MicroBatcher(
            self._extract_batch,
            max_batch_size=extractor.batch_size,
            max_wait_s=0.0,
            max_queue_size=max_waiting,
            name="extract",
        )

    async def for_upload(
        self, sha256: str, decoded: DecodedImage, *, look_in_corpus: bool = True
    ) -> FoundRegions:
        """Regions of the upload whose bytes hash to `sha256` (`index.corpus.sha256_hex`),
        already validated and decoded into `decoded`. `look_in_corpus=False` when the caller
        has just looked the hash up in the corpus and found nothing."""
        digest = bytes.fromhex(sha256)
        known = await asyncio.to_thread(self._known, digest, look_in_corpus)
        if known is not None:
            self.metrics.upload_region_cache.labels(known.origin).inc()
            return known
        found = await self.extract(decoded)
        await asyncio.to_thread(self._remember, digest, found.regions)
        self.metrics.upload_region_cache.labels("extractor").inc()
        return found

    async def extract(self, decoded: DecodedImage) -> FoundRegions:
        """Extract one image, batched with whatever else waits for the extractor (raises
        `QueueFullError`, answered 429, when `max_waiting` photos already wait)."""
        with self.metrics.time_stage("extract"):
            regions = await self.batcher.submit(decoded.image)
        return FoundRegions(regions, "extractor")

    def _extract_batch(self, images: list[Image.Image]) -> list[RegionFeatures]:
        """The batcher's call, on its thread: whichever extractor is current, in one batch."""
        return self.extractor.extract(list(images))

    async def stop(self) -> None:
        """Stop the extraction batcher (photos still waiting get an error)."""
        await self.batcher.stop()

    def _known(self, digest: bytes, look_in_corpus: bool) -> FoundRegions | None:
        record = self.corpus.find_image_by_sha256(digest.hex()) if look_in_corpus else None
        if record is not None:
            stored = self.corpus.get_region_features([record.id]).get(record.id)
            if stored is not None:
                return FoundRegions(stored, "corpus", record.id)
        cached = self.cache.get_many(self.keyspace, [_cache_id(digest)])
        for value in cached.values():
            try:
                arrays = decode_arrays(value)
            except InvalidRecordError:
                return None
            if bytes(arrays["sha256"]) != digest:  # a 63-bit id collision: not our photo
                return None
            regions = RegionFeatures.from_stored(
                arrays, self.extractor.name, self.extractor.version
            )
            return FoundRegions(regions, "cache")
        return None

    def _remember(self, digest: bytes, regions: RegionFeatures) -> None:
        record = encode_arrays(
            {**regions.stored_arrays(), "sha256": np.frombuffer(digest, dtype=np.uint8)}
        )
        self.cache.set_many(self.keyspace, {_cache_id(digest): record})

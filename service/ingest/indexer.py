"""Writes: images and captions into the corpus, in the storage order of docs/ARCHITECTURE.md.

validate + decode -> (duplicate? the existing record) -> region features (cache or extractor,
off the event loop) -> pooled vectors and caption token ids from the model -> `Corpus.add_image`
(acknowledged only after the catalog commit). The HTTP routes and local bulk ingest both call
this, so an image ingested either way is the same record.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from index.catalog import CaptionRecord, ImageRecord
from index.corpus import Corpus, NewCaption, sha256_hex
from index.errors import NotFoundError
from model.types import RegionFeatures
from model.vision.images import DecodedImage, ImageInputError, decode_image
from service.outcomes import Conflict, FieldProblem, InvalidImage, InvalidInput, Overloaded
from service.runtime.budget import BudgetWaitTimeout, MemoryBudget
from service.runtime.metrics import ServiceMetrics
from service.search.pipeline import SearchPipeline
from service.search.regions import FoundRegions, UploadRegions
from service.search.stored_tensors import (
    BOXES_KEY,
    caption_record,
    image_record,
    record_or_none,
)

if TYPE_CHECKING:
    from model.retrieval import RetrievalModel

DECODE_RETRY_AFTER_S = 1

# Stored file names end with the decoded format's usual extension (never the client's name).
EXTENSION_BY_FORMAT = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "GIF": ".gif",
    "TIFF": ".tif",
}


# What decoding one photo may hold at its peak, reserved from the decode budget before a pixel
# is decoded: up to 4 bytes a pixel as decoded (RGBA, CMYK; 3 for RGB), plus 3 for the upright
# RGB copy made while converting (EXIF rotation, mode conversion) = 7 bytes a pixel, and the
# extractor's resized float32 input, at most 8 MiB whatever the photo's size (detectron2's
# 1000 x 600 x 3 x 4 bytes; the grid extractor's 224 x 224 is far less).
DECODE_BYTES_PER_PIXEL = 7
EXTRACTOR_INPUT_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class UploadDecoded:
    """What an upload's decoding leaves behind once its pixels are released."""

    regions: FoundRegions
    size: tuple[int, int]  # (width, height), upright
    format: str


def decode_reservation_bytes(data: bytes, max_pixels: int) -> int:
    """Bytes to reserve before decoding `data`, from the size its header declares (Pillow's
    open is lazy: no pixel is decoded). 0 for what the decoder will refuse without decoding
    (not an image, too many pixels), so a refusal never waits for the budget."""
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except Exception:  # any unreadable header: decode_image refuses it, and says why
        return 0
    pixels = width * height
    if pixels <= 0 or pixels > max_pixels:
        return 0
    return pixels * DECODE_BYTES_PER_PIXEL + EXTRACTOR_INPUT_BYTES


@dataclass(frozen=True)
class StoredImage:
    """An image as the API reports it; `created` is False when the bytes were already stored.

    `captions_added` of the captions sent were stored by this call; `captions_skipped` were
    already on the photo (or sent twice), so nothing a client sends disappears unaccounted.
    """

    image: ImageRecord
    captions: tuple[CaptionRecord, ...]
    regions: int
    created: bool
    captions_added: int = 0
    captions_skipped: int = 0


class Indexer:
    """Adds and deletes images and captions; safe to call concurrently."""

    def __init__(
        self,
        model: RetrievalModel,
        corpus: Corpus,
        regions: UploadRegions,
        pipeline: SearchPipeline,
        metrics: ServiceMetrics,
        *,
        max_image_bytes: int,
        max_image_pixels: int,
        max_caption_chars: int,
        decode_memory_bytes: int = 0,
        decode_wait_s: float,
    ) -> None:
        """`decode_memory_bytes` bounds the pixels that uploads being decoded and extracted
        hold together (0: unbounded); an upload waits at most `decode_wait_s` for its share."""
        self.model = model
        self.corpus = corpus
        self.regions = regions
        self.pipeline = pipeline
        self.metrics = metrics
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_caption_chars = max_caption_chars
        self.decode_memory = MemoryBudget(decode_memory_bytes)
        self.decode_wait_s = decode_wait_s

    async def decode_and_extract(
        self,
        data: bytes,
        *,
        field: str = "file",
        timings: dict[str, float] | None = None,
        sha256: str | None = None,
        look_in_corpus: bool = True,
    ) -> UploadDecoded:
        """Decode `data` and find its regions while holding its share of the decode budget.

        The share is reserved from the header's size before any pixel is decoded, so many
        large uploads wait in line instead of all being decoded at once; it is released when
        the regions are out and the pixels dropped. Waiting longer than `decode_wait_s` is
        `Overloaded`. `sha256`: `sha256_hex(data)` when the caller has it; `look_in_corpus=False`
        when the caller just found no stored image with it.
        """
        if sha256 is None:
            sha256 = sha256_hex(data)
        nbytes = await asyncio.to_thread(decode_reservation_bytes, data, self.max_image_pixels)
        try:
            async with self.decode_memory.reserve(nbytes, timeout_s=self.decode_wait_s):
                with self._stage("decode", timings):
                    decoded = await self.decode(data, field)
                with self._stage("extract", timings):
                    regions = await self.regions.for_upload(
                        sha256, decoded, look_in_corpus=look_in_corpus
                    )
                return UploadDecoded(regions, decoded.size, decoded.format)
        except BudgetWaitTimeout:
            raise Overloaded(
                "other photos being decoded hold the decode memory budget and none was free "
                f"within {self.decode_wait_s:g} s; retry later",
                retry_after_s=DECODE_RETRY_AFTER_S,
            ) from None

    def _stage(self, stage: str, timings: dict[str, float] | None) -> AbstractContextManager[None]:
        """A search's own stage timings (reported in its answer and observed); ingest has the
        extractor's and the store's own observations only."""
        return nullcontext() if timings is None else self.metrics.time_stage(stage, timings)

    async def decode(self, data: bytes, field: str = "file") -> DecodedImage:
        """Validate and decode upload bytes (in a thread); a refusal is `InvalidImage`."""
        try:
            return await asyncio.to_thread(
                decode_image,
                data,
                max_bytes=self.max_image_bytes,
                max_pixels=self.max_image_pixels,
                reduce_to=self.regions.extractor.decode_size,  # the extractor's own choice
            )
        except ImageInputError as error:
            raise InvalidImage(error, field) from error

    def check_captions(self, captions: Sequence[str], field: str = "captions") -> list[str]:
        """Captions as given, or `InvalidInput` naming each blank or too long one."""
        problems = []
        for index, text in enumerate(captions):
            if not text.strip():
                problems.append(FieldProblem(f"{field}.{index}", "must not be blank"))
            elif len(text) > self.max_caption_chars:
                problems.append(
                    FieldProblem(
                        f"{field}.{index}",
                        f"has {len(text)} characters; the limit is {self.max_caption_chars}",
                    )
                )
        if problems:
            raise InvalidInput(problems)
        return list(captions)

    async def add_image(
        self, data: bytes, captions: Sequence[str] = (), *, sha256: str | None = None
    ) -> StoredImage:
        """Store a photo with its captions. The same bytes again return the existing record,
        with those of `captions` it does not have yet added to it (in one commit). `sha256`:
        `sha256_hex(data)` when the caller has it (the bytes are hashed once)."""
        captions = self.check_captions(captions)
        if sha256 is None:
            sha256 = sha256_hex(data)
        # Looked up once here (a duplicate skips decoding), and once more inside the commit.
        existing = await asyncio.to_thread(self._existing, sha256)
        if existing is not None:
            return await self._add_captions_to(existing, captions)
        upload = await self.decode_and_extract(data, sha256=sha256, look_in_corpus=False)
        regions = upload.regions.regions
        with self.metrics.time_stage("encode"):
            pooled = await asyncio.to_thread(self.model.pooled_images, regions.features[None])
            rerank = await asyncio.to_thread(self._image_rerank_record, regions)
            new_captions = await self._encoded(captions)
        width, height = upload.size
        with self.metrics.time_stage("store"):
            added = await asyncio.to_thread(
                self.corpus.add_image,
                data,
                width=width,
                height=height,
                region_features=regions.features,
                region_boxes=regions.boxes,
                pooled=pooled[0],
                captions=new_captions,
                extension=EXTENSION_BY_FORMAT.get(upload.format, ""),
                sha256=sha256,
                rerank=rerank,
            )
        stored = StoredImage(added.image, added.captions, regions.num_regions, added.created)
        if not added.created:  # a concurrent request stored the same bytes first
            return await self._add_captions_to(stored, captions)
        return replace(stored, captions_added=len(added.captions))

    async def _add_captions_to(self, stored: StoredImage, captions: Sequence[str]) -> StoredImage:
        """`stored` with those of `captions` it lacks added (exact duplicates skipped)."""
        present = {caption.text for caption in stored.captions}
        fresh = [text for text in dict.fromkeys(captions) if text not in present]
        if not fresh:
            return replace(stored, captions_skipped=len(captions))
        new_captions = await self._encoded(fresh)
        try:
            with self.metrics.time_stage("store"):
                added = await asyncio.to_thread(
                    self.corpus.add_captions,
                    new_captions,
                    image_id=stored.image.id,
                    skip_present=True,
                )
            refreshed = await asyncio.to_thread(self._describe, stored.image.id)
            if refreshed is None:
                raise NotFoundError(f"image {stored.image.id} does not exist")
        except NotFoundError as error:  # deleted meanwhile; nothing of this call was stored
            raise Conflict(
                f"image {stored.image.id} was deleted while these captions were being added; "
                "upload the photo again"
            ) from error
        return replace(
            refreshed,
            regions=stored.regions,
            captions_added=len(added),
            captions_skipped=len(captions) - len(added),
        )

    def _image_rerank_record(self, regions: RegionFeatures) -> dict[str, np.ndarray] | None:
        """The image's rerank tensors as stored (None when they overflow float16)."""
        computed = self.pipeline.computed_image_tensors({0: regions})[0]
        return record_or_none(image_record, computed, "an image")

    async def _encoded(self, captions: Sequence[str]) -> list[NewCaption]:
        """Captions encoded in one call: shortlist vectors, token ids and rerank tensors."""
        if not captions:
            return []
        encoded = await asyncio.to_thread(self.model.encode_texts, list(captions))
        return [
            NewCaption(
                text,
                ids,
                vector,
                record_or_none(caption_record, encoded.precompute.select([row]), "a caption"),
            )
            for row, (text, ids, vector) in enumerate(
                zip(captions, encoded.token_ids, encoded.pooled, strict=True)
            )
        ]

    async def add_caption(self, text: str, image_id: int | None = None) -> CaptionRecord:
        (text,) = self.check_captions([text], field="body.text")
        (caption,) = await self._encoded([text])
        with self.metrics.time_stage("store"):
            (record,) = await asyncio.to_thread(
                self.corpus.add_captions, [caption], image_id=image_id
            )
            return record

    async def delete_image(self, image_id: int) -> bool:
        captions = await asyncio.to_thread(self.corpus.captions_of, image_id)
        deleted = await asyncio.to_thread(self.corpus.delete_image, image_id)
        if deleted:
            self.pipeline.forget([image_id], [c.id for c in captions])
        return deleted

    async def delete_caption(self, caption_id: int) -> bool:
        deleted = await asyncio.to_thread(self.corpus.delete_caption, caption_id)
        if deleted:
            self.pipeline.forget(caption_ids=[caption_id])
        return deleted

    async def find_by_sha256(self, sha256: str) -> StoredImage | None:
        """The stored image whose bytes hash to `sha256`, or None."""
        return await asyncio.to_thread(self._existing, sha256)

    async def describe(self, image_id: int) -> StoredImage | None:
        """The stored record of `image_id` with its captions and region count, or None."""
        return await asyncio.to_thread(self._describe, image_id)

    def _existing(self, sha256: str) -> StoredImage | None:
        record = self.corpus.find_image_by_sha256(sha256)
        return None if record is None else self._describe(record.id, created=False)

    def _describe(self, image_id: int, *, created: bool = False) -> StoredImage | None:
        record = self.corpus.get_image(image_id)
        if record is None:
            return None
        stored = self.corpus.get_region_features([image_id]).get(image_id)
        if stored is not None:
            regions = stored.num_regions
        else:  # region features dropped (CAMPSEARCH_KEEP_REGION_FEATURES=false): the tensors'
            tensors = self.corpus.get_rerank_tensors("images", [image_id]).get(image_id)
            regions = 0 if tensors is None else int(tensors[BOXES_KEY].shape[0])
        captions = tuple(self.corpus.captions_of(image_id))
        return StoredImage(record, captions, regions, created)

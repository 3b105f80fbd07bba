"""Writes: images and captions into the corpus, in the one order DESIGN §2 prescribes.

validate + decode -> (duplicate? the existing record) -> region features (cache or extractor,
off the event loop) -> pooled vectors and caption token ids from the model -> `Corpus.add_image`
(acknowledged only after the catalog commit). The HTTP routes and local bulk ingest both call
this, so an image ingested either way is the same record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from index.catalog import CaptionRecord, ImageRecord
from index.corpus import Corpus, NewCaption
from model.images import DecodedImage, ImageInputError, decode_image
from service.errors import FieldProblem, ProblemError
from service.metrics import ServiceMetrics
from service.pipeline import SearchPipeline
from service.regions import UploadRegions, sha256_hex

if TYPE_CHECKING:
    from model.retrieval import RetrievalModel

# Stored file names end with the decoded format's usual extension (never the client's name).
EXTENSION_BY_FORMAT = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "GIF": ".gif",
    "TIFF": ".tif",
}


@dataclass(frozen=True)
class StoredImage:
    """An image as the API reports it; `created` is False when the bytes were already stored."""

    image: ImageRecord
    captions: tuple[CaptionRecord, ...]
    regions: int
    created: bool


def image_problem(error: ImageInputError, field: str = "file") -> ProblemError:
    """The problem+json for a refused image: 400, 413 or 415 as the error says."""
    titles = {400: "Invalid image", 413: "Payload too large", 415: "Unsupported media type"}
    return ProblemError(
        error.http_status,
        titles.get(error.http_status, "Invalid image"),
        str(error),
        [FieldProblem(field, f"{error.code}: {error}")],
    )


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
    ) -> None:
        self.model = model
        self.corpus = corpus
        self.regions = regions
        self.pipeline = pipeline
        self.metrics = metrics
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_caption_chars = max_caption_chars

    async def decode(self, data: bytes, field: str = "file") -> DecodedImage:
        """Validate and decode upload bytes (in a thread); refusals become 400/413/415."""
        try:
            return await asyncio.to_thread(
                decode_image, data, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels
            )
        except ImageInputError as error:
            raise image_problem(error, field) from error

    def check_captions(self, captions: Sequence[str], field: str = "captions") -> list[str]:
        """Captions as given, or 422 naming the first blank or too long one."""
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
            summary = "; ".join(f"{p.field}: {p.reason}" for p in problems[:5])
            raise ProblemError(422, "Invalid request", summary, problems)
        return list(captions)

    async def add_image(self, data: bytes, captions: Sequence[str] = ()) -> StoredImage:
        """Store a photo with its captions; the same bytes again return the existing record."""
        captions = self.check_captions(captions)
        existing = await asyncio.to_thread(self._existing, sha256_hex(data))
        if existing is not None:
            return existing
        decoded = await self.decode(data)
        regions = await self.regions.for_upload(data, decoded)
        if regions.image_id is not None:  # stored by a concurrent request meanwhile
            existing = await asyncio.to_thread(self._existing, sha256_hex(data))
            if existing is not None:
                return existing
        with self.metrics.time_stage("encode"):
            pooled = await asyncio.to_thread(self.model.pooled_images, regions.features[None])
            encoded = (
                await asyncio.to_thread(self.model.encode_texts, captions) if captions else None
            )
        new_captions = (
            [
                NewCaption(text, ids, vector)
                for text, ids, vector in zip(
                    captions, encoded.token_ids, encoded.pooled, strict=True
                )
            ]
            if encoded is not None
            else []
        )
        width, height = decoded.size
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
                extension=EXTENSION_BY_FORMAT.get(decoded.format, ""),
            )
        return StoredImage(added.image, added.captions, regions.num_regions, added.created)

    async def add_caption(self, text: str, image_id: int | None = None) -> CaptionRecord:
        (text,) = self.check_captions([text], field="body.text")
        encoded = await asyncio.to_thread(self.model.encode_texts, [text])
        with self.metrics.time_stage("store"):
            return await asyncio.to_thread(
                self.corpus.add_caption,
                text,
                encoded.token_ids[0],
                encoded.pooled[0],
                image_id=image_id,
            )

    async def delete_image(self, image_id: int) -> bool:
        captions = await asyncio.to_thread(self.corpus.catalog.captions_of, image_id)
        deleted = await asyncio.to_thread(self.corpus.delete_image, image_id)
        if deleted:
            self.pipeline.forget([image_id], [c.id for c in captions])
        return deleted

    async def delete_caption(self, caption_id: int) -> bool:
        deleted = await asyncio.to_thread(self.corpus.delete_caption, caption_id)
        if deleted:
            self.pipeline.forget(caption_ids=[caption_id])
        return deleted

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
        regions = 0 if stored is None else int(stored.features.shape[0])
        captions = tuple(self.corpus.catalog.captions_of(image_id))
        return StoredImage(record, captions, regions, created)

"""Images: add (multipart upload with captions), read, fetch the stored bytes, delete."""

from __future__ import annotations

import asyncio
import mimetypes
from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Query, Response, UploadFile, status
from fastapi.responses import FileResponse

from service.api.deps import RuntimeDep, SettingsDep, WriteAccess
from service.api.schemas import (
    MAX_ID,
    CaptionPublic,
    ImageAdded,
    ImagePublic,
    ImagesPublic,
    image_file_url,
)
from service.api.uploads import read_upload
from service.ingest.indexer import StoredImage
from service.outcomes import NotFound

router = APIRouter(prefix="/v1/images", tags=["images"])

SHA256_PATTERN = r"^[0-9a-f]{64}$"
ImageId = Annotated[int, Path(ge=0, le=MAX_ID, description="Image id.")]


def image_public(stored: StoredImage) -> ImagePublic:
    return ImagePublic(
        id=stored.image.id,
        sha256=stored.image.sha256,
        width=stored.image.width,
        height=stored.image.height,
        regions=stored.regions,
        url=image_file_url(stored.image.id),
        captions=[
            CaptionPublic(id=c.id, text=c.text, image_id=c.image_id) for c in stored.captions
        ],
    )


@router.post(
    "",
    response_model=ImageAdded,
    status_code=status.HTTP_201_CREATED,
    dependencies=[WriteAccess],
    responses={
        200: {
            "model": ImageAdded,
            "description": "The same bytes were already stored; the captions it lacked were "
            "added (captions_added), the others counted in captions_skipped.",
        }
    },
)
async def add_image(
    runtime: RuntimeDep,
    settings: SettingsDep,
    response: Response,
    file: Annotated[UploadFile, File(description="The photo (JPEG, PNG, WebP, ...).")],
    captions: Annotated[list[str] | None, Form(description="Captions of the photo.")] = None,
) -> ImageAdded:
    """Store a photo: extract its regions, index it, keep its captions. 201 when new; 200 with
    the existing record when the same bytes were stored before, the captions it did not have
    added to it (`captions_added`; exact duplicates are counted in `captions_skipped`)."""
    data = await read_upload(file, max_bytes=settings.max_upload_bytes)
    stored = await runtime.indexer.add_image(data, captions or [])
    if not stored.created:
        response.status_code = status.HTTP_200_OK
    return ImageAdded(
        **image_public(stored).model_dump(),
        captions_added=stored.captions_added,
        captions_skipped=stored.captions_skipped,
    )


@router.get("", response_model=ImagesPublic)
async def find_images(
    runtime: RuntimeDep,
    sha256: Annotated[
        str, Query(pattern=SHA256_PATTERN, description="Lower-case hex SHA-256 of the bytes.")
    ],
) -> ImagesPublic:
    """Images whose bytes have this SHA-256 (0 or 1): lets bulk ingest skip what is stored."""
    stored = await runtime.indexer.find_by_sha256(sha256)
    data = [] if stored is None else [image_public(stored)]
    return ImagesPublic(data=data, count=len(data))


@router.get("/{image_id}", response_model=ImagePublic)
async def get_image(image_id: ImageId, runtime: RuntimeDep) -> ImagePublic:
    stored = await runtime.indexer.describe(image_id)
    if stored is None:
        raise NotFound("image", image_id)
    return image_public(stored)


@router.get("/{image_id}/file", response_class=FileResponse)
async def get_image_file(image_id: ImageId, runtime: RuntimeDep) -> FileResponse:
    """The stored bytes, with the content type of their decoded format."""
    found = await asyncio.to_thread(runtime.corpus.stored_file, image_id)
    if found is None:
        raise NotFound("image", image_id)
    record, path = found
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(
        path,
        media_type=media_type,
        headers={
            "Cache-Control": "public, max-age=31536000, immutable",
            "ETag": record.sha256,
            # Stored bytes may also parse as HTML or a zip (polyglots): never let a browser
            # sniff them into anything but the image type they were decoded as.
            "X-Content-Type-Options": "nosniff",
        },
    )


@router.delete("/{image_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[WriteAccess])
async def delete_image(image_id: ImageId, runtime: RuntimeDep) -> Response:
    """Delete a photo with its captions and features; it never appears in results again."""
    if not await runtime.indexer.delete_image(image_id):
        raise NotFound("image", image_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)

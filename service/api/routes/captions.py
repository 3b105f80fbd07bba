"""Captions: add (of an image, or free-standing), read, delete."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from service.api.deps import RuntimeDep, WriteAccess
from service.api.schemas import MAX_ID, CaptionCreate, CaptionPublic
from service.outcomes import NotFound

router = APIRouter(prefix="/v1/captions", tags=["captions"])

CaptionId = Annotated[int, Path(ge=0, le=MAX_ID, description="Caption id.")]


@router.post(
    "",
    response_model=CaptionPublic,
    status_code=status.HTTP_201_CREATED,
    dependencies=[WriteAccess],
)
async def add_caption(body: CaptionCreate, runtime: RuntimeDep) -> CaptionPublic:
    """Index a caption; with `image_id` it describes that image (404 when it does not exist)."""
    if (
        body.image_id is not None
        and await asyncio.to_thread(runtime.corpus.get_image, body.image_id) is None
    ):
        raise NotFound("image", body.image_id, field="body.image_id")
    record = await runtime.indexer.add_caption(body.text, body.image_id)
    return CaptionPublic(id=record.id, text=record.text, image_id=record.image_id)


@router.get("/{caption_id}", response_model=CaptionPublic)
async def get_caption(caption_id: CaptionId, runtime: RuntimeDep) -> CaptionPublic:
    record = await asyncio.to_thread(runtime.corpus.get_caption, caption_id)
    if record is None:
        raise NotFound("caption", caption_id)
    return CaptionPublic(id=record.id, text=record.text, image_id=record.image_id)


@router.delete("/{caption_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[WriteAccess])
async def delete_caption(caption_id: CaptionId, runtime: RuntimeDep) -> Response:
    if not await runtime.indexer.delete_caption(caption_id):
        raise NotFound("caption", caption_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)

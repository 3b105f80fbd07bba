"""Search: text -> images, and image -> captions (an upload or an indexed image id)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from service.api.deps import RuntimeDep, SettingsDep, check_search_bounds
from service.api.errors import ProblemError
from service.api.schemas import (
    CaptionSearchByIdRequest,
    CaptionSearchResponse,
    ImageSearchRequest,
    ImageSearchResponse,
    SearchOptions,
)
from service.api.uploads import read_upload
from service.outcomes import FieldProblem

router = APIRouter(prefix="/v1/search", tags=["search"])

MAX_FORM_FIELDS = 16  # file + the five options, with room for clients that send extras
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def _caption_search_openapi() -> dict[str, Any]:
    options = SearchOptions.model_json_schema()
    multipart = {
        "type": "object",
        "required": ["file"],
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "The photo."},
            **options["properties"],
        },
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": multipart},
                "application/json": {"schema": CaptionSearchByIdRequest.model_json_schema()},
            },
        }
    }


@router.post("/images", response_model=ImageSearchResponse)
async def search_images(
    body: ImageSearchRequest, runtime: RuntimeDep, settings: SettingsDep
) -> ImageSearchResponse:
    """Photos that match a text, best first: FAISS shortlist of `candidates`, CAMP rerank."""
    body = check_search_bounds(body, settings)
    return ImageSearchResponse.of(await runtime.pipeline.images_for_text(body.text, body.params()))


@router.post(
    "/captions", response_model=CaptionSearchResponse, openapi_extra=_caption_search_openapi()
)
async def search_captions(
    request: Request, runtime: RuntimeDep, settings: SettingsDep
) -> CaptionSearchResponse:
    """Captions that match a photo: multipart with `file` (+ options as form fields), or JSON
    `{"image_id": ...}` (+ options) for an indexed photo."""
    started = time.perf_counter()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = _validated(CaptionSearchByIdRequest, await _json(request))
        body = check_search_bounds(body, settings)
        found = await runtime.pipeline.captions_for_image_id(body.image_id, body.params())
        return CaptionSearchResponse.of(found)
    if content_type not in FORM_TYPES:
        reason = "send multipart/form-data with a `file`, or application/json with `image_id`"
        raise ProblemError(
            415, "Unsupported media type", reason, [FieldProblem("header.Content-Type", reason)]
        )
    try:
        async with request.form(max_files=1, max_fields=MAX_FORM_FIELDS) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                reason = "a photo is required in the multipart field `file`"
                raise ProblemError(422, "Invalid request", reason, [FieldProblem("file", reason)])
            fields = {k: v for k, v in form.multi_items() if k != "file"}
            options = check_search_bounds(_validated(SearchOptions, fields), settings)
            data = await read_upload(upload, max_bytes=settings.max_upload_bytes)
    except MultiPartException as error:
        raise ProblemError(
            400, "Invalid request", f"the multipart body cannot be parsed: {error.message}"
        ) from error
    timings: dict[str, float] = {}
    # Decoded pixels count against the decode budget until the regions are out; only the
    # regions go on to the search.
    upload = await runtime.indexer.decode_and_extract(data, timings=timings)
    found = await runtime.pipeline.captions_for_regions(
        upload.regions, options.params(), timings=timings, started=started
    )
    return CaptionSearchResponse.of(found)


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError as error:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": f"invalid JSON: {error}"}]
        ) from error


def _validated(schema: type[SearchOptions], data: Any) -> Any:
    """Validate like FastAPI does for a body parameter: errors become a 422 problem."""
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_url=False)]
        ) from error

"""Errors as RFC 9457 problem+json: the one map from an error to a status and a body.

The core raises its own errors (`service/outcomes.py`), the index and the search batcher theirs;
`problem_of` turns each into a `ProblemError`, which routes may also raise directly for what only
HTTP knows (a content type, a form). The handlers here answer every failure with a JSON body that
names the field and the reason; a client never sees a bare 500 page or a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from index.errors import DatabaseUnavailableError, NotFoundError, StorageFullError
from model.vision.images import (
    ImageInputError,
    ImageTooLarge,
    TooManyPixels,
    UnsupportedImageFormat,
)
from service.outcomes import (
    Conflict,
    FieldProblem,
    InvalidImage,
    InvalidInput,
    NotFound,
    Overloaded,
    ServiceError,
    TimedOut,
    summarise,
)
from service.search.batching import QueueFullError

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"


@dataclass
class ProblemError(Exception):
    """An error the client can act on; `status` is the HTTP status to answer with."""

    status: int
    title: str
    detail: str
    errors: Sequence[FieldProblem] = field(default_factory=tuple)
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.title}: {self.detail}"


STATUS_BY_IMAGE_REFUSAL: dict[type[ImageInputError], int] = {
    ImageTooLarge: 413,
    TooManyPixels: 413,
    UnsupportedImageFormat: 415,
}
TITLE_BY_IMAGE_STATUS = {
    400: "Invalid image",
    413: "Payload too large",
    415: "Unsupported media type",
}
STORAGE_FULL_DETAIL = (
    "the server's storage is full; nothing was written. Retry after the operator frees space."
)


DATABASE_DOWN_DETAIL = (
    "the database is not answering; nothing was written. Retry shortly (a retried image upload "
    "is not stored twice: images dedupe by content)."
)


def image_refusal_status(error: ImageInputError) -> int:
    """400 for a refused image, 413 when it is too large, 415 when it is not a format we take."""
    return next(
        (status for kind, status in STATUS_BY_IMAGE_REFUSAL.items() if isinstance(error, kind)),
        400,
    )


def problem_of(error: Exception) -> ProblemError | None:
    """The problem an error answers with, or None for an unexpected one (a 500)."""
    match error:
        case ProblemError():
            return error
        case NotFound():
            return ProblemError(404, "Not found", error.detail, error.problems)
        case InvalidImage():
            status = image_refusal_status(error.cause)
            return ProblemError(status, TITLE_BY_IMAGE_STATUS[status], error.detail, error.problems)
        case InvalidInput():
            return ProblemError(422, "Invalid request", error.detail, error.problems)
        case TimedOut():
            return ProblemError(503, "Timed out", error.detail, headers=_retry(error.retry_after_s))
        case Overloaded():
            return ProblemError(503, "Busy", error.detail, headers=_retry(error.retry_after_s))
        case Conflict():
            return ProblemError(409, "Conflict", error.detail)
        case QueueFullError():
            return ProblemError(
                429, "Too many requests", str(error), headers=_retry(error.retry_after_s)
            )
        case DatabaseUnavailableError():
            return ProblemError(
                503,
                "Database unavailable",
                DATABASE_DOWN_DETAIL,
                headers=_retry(error.retry_after_s),
            )
        case StorageFullError():
            return ProblemError(507, "Insufficient storage", STORAGE_FULL_DETAIL)
        case NotFoundError():
            return ProblemError(404, "Not found", str(error).strip("'\""))
    return None


def _retry(after_s: int) -> dict[str, str]:
    return {"Retry-After": str(after_s)}


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    errors: Sequence[FieldProblem] = (),
    headers: dict[str, str] | None = None,
    instance: str | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    body["detail"] = detail
    if instance:
        body["instance"] = instance
    if errors:
        body["errors"] = [{"field": e.field, "reason": e.reason} for e in errors]
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _field_path(location: Sequence[Any]) -> str:
    return ".".join(str(part) for part in location) or "request"


async def _on_known_error(request: Request, error: Exception) -> JSONResponse:
    problem = problem_of(error)
    if problem is None:
        return await _on_unexpected(request, error)
    if isinstance(error, StorageFullError):
        logger.error("storage is full: %s", error)
    elif isinstance(error, DatabaseUnavailableError):
        logger.warning("database unavailable: %s", error)
    return problem_response(
        problem.status,
        problem.title,
        problem.detail,
        errors=problem.errors,
        headers=problem.headers,
        instance=request.url.path,
    )


async def _on_validation(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = [
        FieldProblem(_field_path(item.get("loc", ())), str(item.get("msg", "invalid")))
        for item in error.errors()
    ]
    return problem_response(
        422, "Invalid request", summarise(problems), errors=problems, instance=request.url.path
    )


async def _on_http(request: Request, error: StarletteHTTPException) -> JSONResponse:
    title = {404: "Not found", 405: "Method not allowed"}.get(error.status_code, "HTTP error")
    return problem_response(
        error.status_code,
        title,
        str(error.detail),
        headers=getattr(error, "headers", None),
        instance=request.url.path,
    )


async def _on_unexpected(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(
        500,
        "Internal error",
        "the server failed to handle this request; the failure was logged",
        instance=request.url.path,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure through problem+json."""
    known_errors = (
        ProblemError,
        ServiceError,
        QueueFullError,
        StorageFullError,
        DatabaseUnavailableError,
        NotFoundError,
    )
    for known in known_errors:
        app.add_exception_handler(known, _on_known_error)
    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected)

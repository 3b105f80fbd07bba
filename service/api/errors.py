"""Errors as RFC 9457 problem+json, mapped from typed errors in one place.

Routes raise `ProblemError` (or a typed error registered in `STATUS_BY_ERROR`); the handlers
here turn every failure into a JSON body that names the field and the reason. A client can
never see a bare 500 page or a traceback.
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

from service.search.batching import QueueFullError

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"


@dataclass
class FieldProblem:
    """One invalid input: where it is (`body.text`, `file`, `path.image_id`) and why."""

    field: str
    reason: str


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


def not_found(resource: str, item_id: int) -> ProblemError:
    """404 for an unknown `{resource}_id` in the path (resource: "image" or "caption")."""
    reason = f"no {resource} with id {item_id}"
    return ProblemError(404, "Not found", reason, [FieldProblem(f"path.{resource}_id", reason)])


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


async def _on_problem(request: Request, error: ProblemError) -> JSONResponse:
    return problem_response(
        error.status,
        error.title,
        error.detail,
        errors=error.errors,
        headers=error.headers,
        instance=request.url.path,
    )


async def _on_validation(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = [
        FieldProblem(_field_path(item.get("loc", ())), str(item.get("msg", "invalid")))
        for item in error.errors()
    ]
    summary = "; ".join(f"{p.field}: {p.reason}" for p in problems[:5])
    return problem_response(
        422, "Invalid request", summary, errors=problems, instance=request.url.path
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


async def _on_queue_full(request: Request, error: QueueFullError) -> JSONResponse:
    return problem_response(
        429,
        "Too many requests",
        str(error),
        headers={"Retry-After": str(error.retry_after_s)},
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
    app.add_exception_handler(ProblemError, _on_problem)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http)  # type: ignore[arg-type]
    app.add_exception_handler(QueueFullError, _on_queue_full)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected)

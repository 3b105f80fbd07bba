"""What the core (search, ingest) reports when it cannot do what was asked, in its own words.

The core names no HTTP status: `service/api/errors.py` is the one map from these errors (and
the index's and the image decoder's own) to a status and a problem+json body. See
docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model.vision.images import ImageInputError

MAX_PROBLEMS_SUMMARISED = 5


@dataclass(frozen=True)
class FieldProblem:
    """One invalid input: where it is (`body.text`, `file`, `path.image_id`) and why."""

    field: str
    reason: str


def summarise(problems: Sequence[FieldProblem]) -> str:
    """The first few problems on one line: `body.limit: must be at most 100; ...`."""
    return "; ".join(f"{p.field}: {p.reason}" for p in problems[:MAX_PROBLEMS_SUMMARISED])


class ServiceError(Exception):
    """Base of the core's outcomes; `detail` says what happened and what the caller can do,
    `problems` the fields at fault (if any)."""

    problems: tuple[FieldProblem, ...] = ()

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    """No `resource` ("image", "caption") with `item_id`; `field` names where the id came from
    (default `path.{resource}_id`)."""

    def __init__(self, resource: str, item_id: int, field: str | None = None) -> None:
        reason = f"no {resource} with id {item_id}"
        super().__init__(reason)
        self.problems = (FieldProblem(field or f"path.{resource}_id", reason),)


class InvalidInput(ServiceError):
    """Input the core refuses; every problem names its field."""

    def __init__(self, problems: Sequence[FieldProblem]) -> None:
        super().__init__(summarise(problems))
        self.problems = tuple(problems)


class InvalidImage(ServiceError):
    """Bytes in `field` that are not an image the service takes; `cause` says which refusal
    (empty, too large, too many pixels, unsupported format, corrupt)."""

    def __init__(self, cause: ImageInputError, field: str = "file") -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.problems = (FieldProblem(field, f"{cause.code}: {cause}"),)


class TimedOut(ServiceError):
    """The work did not finish within its time limit; retry after `retry_after_s`."""

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class Overloaded(ServiceError):
    """Other requests hold the capacity this one needs; retry after `retry_after_s`."""

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class Conflict(ServiceError):
    """The request collided with a concurrent change (e.g. its image was deleted meanwhile)."""

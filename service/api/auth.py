"""API keys for writes: `X-API-Key`, compared in constant time, never logged.

With no keys configured, writes are anonymous (and `Settings` only allows that on a loopback
bind unless the operator opts in). With keys, a write without a key or with a wrong one is
refused with 401. `WriteKeyGuard` does that from the request headers alone, before a byte of
the body is read: FastAPI parses a form body before a route's dependencies run, so a dependency
alone would let a keyless client make the server receive and spool a 21 MB upload first.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import ProblemError, problem_response
from service.outcomes import FieldProblem

API_KEY_HEADER = "X-API-Key"
_API_KEY_HEADER_RAW = API_KEY_HEADER.lower().encode("latin-1")
# Every route that changes the corpus lives under these prefixes (service/api/routes/images.py,
# captions.py); searches are POSTs too, but only read.
WRITE_PREFIXES = ("/v1/images", "/v1/captions")
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def key_matches(presented: str, keys: Sequence[SecretStr]) -> bool:
    """True when `presented` equals one of `keys`.

    Every key is compared (no early exit) with `hmac.compare_digest`, so the time taken says
    nothing about which key or how many leading characters matched.
    """
    candidate = presented.encode("utf-8")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key.get_secret_value().encode("utf-8"))
    return matched


def write_key_problem(presented: str | None, keys: Sequence[SecretStr]) -> ProblemError | None:
    """The 401 problem for a write with this key, or None when writes are open (no keys) or
    `presented` is a valid key."""
    if not keys:
        return None
    if not presented:
        reason = f"writes need an API key in the {API_KEY_HEADER} header"
    elif not key_matches(presented, keys):
        reason = "the API key is not valid"
    else:
        return None
    return ProblemError(
        401,
        "Unauthorized",
        reason,
        errors=[FieldProblem(f"header.{API_KEY_HEADER}", reason)],
        headers={"WWW-Authenticate": API_KEY_HEADER},
    )


def check_write_key(presented: str | None, keys: Sequence[SecretStr]) -> None:
    """Raise a 401 problem unless writes are open (no keys) or `presented` is a valid key."""
    problem = write_key_problem(presented, keys)
    if problem is not None:
        raise problem


def is_write_route(method: str, path: str) -> bool:
    """A request that changes the corpus: a POST/PUT/PATCH/DELETE of images or captions."""
    if method not in WRITE_METHODS:
        return False
    return any(path == prefix or path.startswith(prefix + "/") for prefix in WRITE_PREFIXES)


class WriteKeyGuard:
    """ASGI middleware: a write without a valid key gets 401 from its headers alone.

    The body is never read; the answer closes the connection, so whatever the client still
    sends is dropped with it rather than drained.
    """

    def __init__(self, app: ASGIApp, *, api_keys: Sequence[SecretStr]) -> None:
        self.app = app
        self.api_keys = list(api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.api_keys
            or not is_write_route(scope.get("method", "GET"), scope.get("path", ""))
        ):
            await self.app(scope, receive, send)
            return
        presented = _first_header(scope, _API_KEY_HEADER_RAW)
        problem = write_key_problem(presented, self.api_keys)
        if problem is None:
            await self.app(scope, receive, send)
            return
        response = problem_response(
            problem.status,
            problem.title,
            problem.detail,
            errors=problem.errors,
            headers={**problem.headers, "Connection": "close"},
            instance=scope.get("path", ""),
        )
        await response(scope, receive, send)


def _first_header(scope: Scope, name: bytes) -> str | None:
    for header, value in scope.get("headers", ()):
        if header == name:
            return value.decode("latin-1")
    return None

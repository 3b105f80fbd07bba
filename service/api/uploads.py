"""Request bodies bounded while they stream, and uploads read into memory only up to a limit.

Two guards, because a multipart parser spools the whole body before a route runs:

* `BodySizeLimit` (ASGI middleware) refuses a declared `Content-Length` above the limit at
  once, and stops reading a streamed body (chunked, or lying about its length) at the first
  byte past the limit; either way the client gets 413 problem+json and nothing more is read.
* `read_upload` reads an `UploadFile` in chunks and stops at `max_bytes + 1`, so the image
  field itself is bounded exactly, and names the field in the 413.
"""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import ProblemError, problem_response
from service.outcomes import FieldProblem

READ_CHUNK_BYTES = 256 * 1024
# Room for multipart boundaries, part headers and small form fields (captions, options)
# next to the image itself.
FORM_OVERHEAD_BYTES = 1024 * 1024


class BodyTooLargeError(Exception):
    """Raised inside `receive` when a streamed body passes the limit."""


class BodySizeLimit:
    """ASGI middleware: at most `max_body_bytes` of request body per request, else 413."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(send, scope, f"the request declares {declared:,} bytes")
            return

        received = 0
        overflowed = False
        replied = False

        async def limited_receive() -> Message:
            nonlocal received, overflowed
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    overflowed = True
                    raise BodyTooLargeError
            return message

        async def guarded_send(message: Message) -> None:
            # After an overflow, whatever the app answers (its body parser turns our error
            # into a 400 or 500) is replaced by the 413.
            nonlocal replied
            if overflowed:
                if not replied:
                    replied = True
                    await self._refuse(send, scope, "the request body is larger")
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLargeError:
            if not replied:
                replied = True
                await self._refuse(send, scope, "the request body is larger")

    async def _refuse(self, send: Send, scope: Scope, what: str) -> None:
        detail = f"{what} than the limit of {self.max_body_bytes:,} bytes"
        response = problem_response(
            413,
            "Payload too large",
            detail,
            errors=[FieldProblem("body", detail)],
            headers={"Connection": "close"},
            instance=scope.get("path", ""),
        )
        await response(scope, _no_body, send)


async def _no_body() -> Message:
    """What the refusal's `receive` yields: the request body is never read again."""
    return {"type": "http.disconnect"}


async def read_upload(upload: UploadFile, *, max_bytes: int, field: str = "file") -> bytes:
    """The upload's bytes; 413 as soon as more than `max_bytes` arrive, 400 when empty."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(READ_CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
            reason = f"the file is larger than the limit of {max_bytes:,} bytes"
            raise ProblemError(413, "Payload too large", reason, [FieldProblem(field, reason)])
        chunks.append(chunk)
    if size == 0:
        reason = "the file is empty (0 bytes)"
        raise ProblemError(400, "Invalid image", reason, [FieldProblem(field, reason)])
    return b"".join(chunks)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

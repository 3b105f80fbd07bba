"""Read-your-writes across replicas (PostgreSQL mode).

Every acknowledged write answers with ``X-Campsearch-Sequence``: a change sequence at or past
that write's. A request that sends ``X-Campsearch-Min-Sequence: N`` is served only once this
replica's indexes reflect every change up to N: it waits up to `MAX_WAIT_S` (a change reaches
a replica within ~0.5 s, at once when its notification arrives), then answers 503 with
Retry-After rather than silently serving a result that may lack the client's own write.
In the embedded mode (one process) a write is visible at once; the header is then ignored.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.auth import is_write_route
from service.api.errors import problem_response

if TYPE_CHECKING:
    from index.corpus import Corpus
    from service.runtime.lifecycle import ServiceState

SEQUENCE_HEADER = "X-Campsearch-Sequence"
MIN_SEQUENCE_HEADER = "X-Campsearch-Min-Sequence"
MAX_WAIT_S = 2.0
RETRY_AFTER_S = 1
POLL_S = 0.005
_MIN_SEQUENCE_RAW = MIN_SEQUENCE_HEADER.lower().encode("latin-1")
_MAX_SEQUENCE = 2**63 - 1


class ChangeSequence:
    """ASGI middleware: waits for a requested sequence; stamps writes with theirs."""

    def __init__(self, app: ASGIApp, *, state: ServiceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self.state.runtime
        if scope["type"] != "http" or runtime is None or not runtime.corpus.shared:
            await self.app(scope, receive, send)
            return
        corpus = runtime.corpus
        wanted = _header(scope, _MIN_SEQUENCE_RAW)
        if wanted is not None:
            if not wanted.isdigit() or int(wanted) > _MAX_SEQUENCE:
                response = problem_response(
                    422,
                    "Invalid request",
                    f"{MIN_SEQUENCE_HEADER} must be a non-negative integer (a value of "
                    f"{SEQUENCE_HEADER} from an earlier write), got {wanted!r}",
                    instance=scope.get("path", ""),
                )
                await response(scope, receive, send)
                return
            if not await _caught_up(corpus, int(wanted)):
                response = problem_response(
                    503,
                    "Not caught up",
                    f"this replica has applied changes up to {corpus.applied_sequence}, not yet "
                    f"{wanted}; retry shortly",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                    instance=scope.get("path", ""),
                )
                await response(scope, receive, send)
                return
        if not is_write_route(scope.get("method", "GET"), scope.get("path", "")):
            await self.app(scope, receive, send)
            return

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
                headers = list(message.get("headers", []))
                headers.append(
                    (SEQUENCE_HEADER.lower().encode(), str(corpus.written_sequence).encode())
                )
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, stamped)


async def _caught_up(corpus: Corpus, sequence: int) -> bool:
    """Whether the replica applies `sequence` within MAX_WAIT_S. Polled on the event loop (no
    worker thread held per waiting request); the follower is woken to catch up at once."""
    if corpus.applied_sequence >= sequence:
        return True
    if corpus.follower is not None:
        corpus.follower.wake()
    deadline = time.monotonic() + MAX_WAIT_S
    while corpus.applied_sequence < sequence:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


def _header(scope: Scope, name: bytes) -> str | None:
    for header, value in scope.get("headers", ()):
        if header == name:
            return value.decode("latin-1").strip()
    return None

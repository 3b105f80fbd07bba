"""ASGI middleware counting requests and their latency by route template and status."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.runtime.metrics import ServiceMetrics

UNMATCHED_ROUTE = "unmatched"


class RequestMetrics:
    """Counts every HTTP answer (errors included) under the route's template, never the raw
    path, so clients cannot grow label cardinality."""

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app dies before answering

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or (
                "static" if scope.get("endpoint") is not None else UNMATCHED_ROUTE
            )
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.request_latency.labels(method, template).observe(
                time.perf_counter() - started
            )

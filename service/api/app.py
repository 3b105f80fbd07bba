"""The FastAPI app: `create_app(settings)` assembles routers, middleware and error handlers.

The model and the corpus load in the background after the server starts listening, so
`/healthz` answers at once and `/readyz` reports 503 until search can work. On shutdown the
batcher drains and the indexes are saved.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from model.vision.extractors import RegionExtractor
from service.api.auth import WriteKeyGuard
from service.api.docs import install_api_docs
from service.api.errors import install_error_handlers
from service.api.ratelimit import REQUESTS, WRITES, RateLimit, RateLimiter
from service.api.request_metrics import RequestMetrics
from service.api.routes import captions, health, images, search
from service.api.sequence import MIN_SEQUENCE_HEADER, SEQUENCE_HEADER, ChangeSequence
from service.api.uploads import FORM_OVERHEAD_BYTES, BodySizeLimit
from service.runtime.lifecycle import ServiceState
from service.runtime.metrics import ServiceMetrics
from service.runtime.settings import Settings, get_settings

if TYPE_CHECKING:
    from model.retrieval import RetrievalModel

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"  # service/static
API_VERSION = "1"


def create_app(
    settings: Settings | None = None,
    *,
    model: RetrievalModel | None = None,
    extractor: RegionExtractor | None = None,
    static_dir: Path | None = STATIC_DIR,
) -> FastAPI:
    """The service app. `model` / `extractor` may be passed already loaded (tests, benches);
    otherwise they load from `settings` when the app starts. The web UI in `static_dir` is
    served at `/` when that folder exists."""
    settings = settings or get_settings()
    state = ServiceState(settings, ServiceMetrics(), model=model, extractor=extractor)
    limiter = RateLimiter(
        window_s=settings.rate_limit_window_s,
        limits={REQUESTS: settings.rate_limit_requests, WRITES: settings.rate_limit_writes},
        redis_url=settings.redis_url,
        redis_cluster=settings.redis_cluster,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.metrics.watch(lambda: state.runtime.live_state() if state.runtime else {})
        state.begin()
        try:
            yield
        finally:
            await state.stop()
            await limiter.close()

    app = FastAPI(
        title="camp-search",
        version=API_VERSION,
        summary="Text-to-image and image-to-caption search: a FAISS shortlist reranked by CAMP.",
        lifespan=lifespan,
        docs_url=None,  # install_api_docs serves /docs and /redoc without a CDN
        redoc_url=None,
    )
    app.state.service = state
    install_error_handlers(app)

    for router in (search.router, images.router, captions.router, health.router):
        app.include_router(router)
    install_api_docs(app)
    if static_dir is not None and static_dir.is_dir():
        app.mount("/", StaticFiles(directory=static_dir, html=True), name="ui")

    # Outermost last: metrics see every answer, including the body limit's 413.
    # Innermost: a request the guards refuse never waits for a change sequence.
    app.add_middleware(ChangeSequence, state=state)
    app.add_middleware(
        BodySizeLimit, max_body_bytes=settings.max_upload_bytes + FORM_OVERHEAD_BYTES
    )
    # A write without a valid key is refused from its headers, before the body limit and the
    # form parser read anything.
    app.add_middleware(WriteKeyGuard, api_keys=settings.api_keys)
    # Refuse over-budget clients before any body is read; CORS outside it so that a browser
    # can read the 429.
    app.add_middleware(RateLimit, limiter=limiter, api_keys=settings.api_keys)
    # CORS is closed unless origins are configured: no Access-Control-* header for anyone.
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Content-Type", "X-API-Key", MIN_SEQUENCE_HEADER],
            expose_headers=[SEQUENCE_HEADER],
        )
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    return app

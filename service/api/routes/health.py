"""Operations: liveness, readiness, Prometheus metrics and what is being served."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from index.read_routing import redacted
from model.calibration import ScoreCalibration
from service.api.deps import STARTING_RETRY_AFTER_S, RuntimeDep, StateDep
from service.api.errors import ProblemError
from service.api.schemas import (
    ComponentState,
    CorpusSizes,
    DatabaseInfo,
    Readiness,
    ScoreInfo,
    ServiceInfo,
    StageInfo,
)
from service.runtime.metrics import PROMETHEUS_CONTENT_TYPE
from service.search.tensor_rebuild import BackgroundRebuild

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz(state: StateDep) -> JSONResponse:
    """Alive: 200 while the process serves (also while loading); 503 when start-up failed."""
    if state.phase == "failed":
        return JSONResponse({"status": "failed", "detail": state.error}, status_code=503)
    return JSONResponse({"status": "alive", "phase": state.phase})


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(state: StateDep) -> JSONResponse:
    """503 until the model and indexes are loaded (in PostgreSQL mode, a "database" component
    says which primary a starting replica waits for, and why). A dead Redis keeps 200 with status
    "degraded": search still works, reading features from the durable store. With PostgreSQL,
    the "database" component says where reads go (replica or primary) and how far the replica
    is behind; a dead primary with a serving replica is "degraded" (reads work, writes 503),
    no database to read from at all is 503 (a proxy stops sending here)."""
    runtime = state.runtime
    if runtime is None:
        detail = state.error or "loading the model and indexes"
        components = [ComponentState(name="model", ok=False, detail=detail)]
        headers = None
        if state.waiting_for_database:  # PostgreSQL mode: the primary has not answered yet
            components.append(
                ComponentState(name="database", ok=False, detail=state.waiting_for_database)
            )
            headers = {"Retry-After": str(STARTING_RETRY_AFTER_S)}
        body = Readiness(
            status="failed" if state.phase == "failed" else "starting", components=components
        )
        return JSONResponse(body.model_dump(), status_code=503, headers=headers)
    cache_ok = await asyncio.to_thread(runtime.cache.check)
    cache_status = runtime.cache.status()
    indexes = runtime.corpus.index_summaries()
    components = [
        ComponentState(name="model", ok=True, detail=runtime.model.version),
        ComponentState(
            name="indexes",
            ok=True,
            detail=f"{indexes['images'].count} images, {indexes['captions'].count} captions",
        ),
        ComponentState(
            name=f"cache:{cache_status.backend}", ok=cache_ok, detail=cache_status.detail
        ),
        _rebuild_state(runtime.region_rebuild, "region_features"),
        _rebuild_state(runtime.pooled_rebuild, "pooled_vectors"),
        _rebuild_state(runtime.rebuild, "rerank_tensors"),
    ]
    ready = cache_ok
    router = runtime.read_router
    if router is not None:
        # One component: the primary (no password), where reads go, the replica's lag, and
        # the change sequence this replica's indexes have applied.
        primary_up = router.status()["primary"]["up"]
        database_ok = router.can_read
        components.append(
            ComponentState(
                name="database",
                ok=database_ok,
                detail=f"primary {redacted(router.primary_url)}: {router.summary()}; applied "
                f"change sequence {runtime.corpus.applied_sequence}",
            )
        )
        if not database_ok:  # searches read metadata there and writes commit there
            body = Readiness(status="unavailable", components=components)
            return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "2"})
        ready = ready and primary_up  # a dead primary: reads on the replica, writes 503
    body = Readiness(status="ready" if ready else "degraded", components=components)
    return JSONResponse(body.model_dump())


def _rebuild_state(rebuild: BackgroundRebuild, name: str) -> ComponentState:
    """How far the region features (`region_features`: re-extracted from the stored photos
    after a change of extractor), the pooled vectors (`pooled_vectors`: items without them are
    not searchable until re-embedded) or the rerank tensors (`rerank_tensors`: items not built
    yet are scored from features computed on the fly, slower, never wrong) of the served model
    are built.
    Always ok: the service serves meanwhile. In PostgreSQL mode the counts are the database's
    (items that have them / items), and it says whether this replica or another one is
    building them."""
    progress = rebuild.progress()
    detail = ", ".join(
        f"{kind} {p.done}/{p.total}" + (f" ({p.skipped} skipped)" if p.skipped else "")
        for kind, p in progress.items()
    )
    if rebuild.error:
        detail += f"; stopped: {rebuild.error}"
    elif rebuild.finished:
        detail = f"complete ({detail})"
    elif rebuild.claim is None:
        detail = f"rebuilding ({detail})"
    else:
        where = "another replica" if rebuild.elsewhere else "this replica"
        detail = f"rebuilding on {where} ({detail})"
    return ComponentState(name=name, ok=True, detail=detail)


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Prometheus text format; 404 when CAMPSEARCH_EXPOSE_METRICS keeps them off this port
    (by default, a bind on a network address)."""
    if not state.settings.metrics_exposed:
        raise ProblemError(
            404,
            "Not found",
            "metrics are not served on this port; set CAMPSEARCH_EXPOSE_METRICS=true to serve "
            "them (scrape through a proxy that allows only your monitoring)",
        )
    return Response(state.metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)


@router.get("/v1/info", response_model=ServiceInfo, tags=["info"])
async def info(runtime: RuntimeDep) -> ServiceInfo:
    """The model, extractor and device being served, the corpus size, and where each stage
    (text encoder, extractor, shortlist, reranker) runs and in what precision."""
    indexes = runtime.corpus.index_summaries()
    settings = runtime.settings
    return ServiceInfo(
        model_version=runtime.model.version,
        extractor=runtime.extractor.name,
        extractor_version=runtime.extractor.version,
        device=str(runtime.model.device),
        embedding_dim=runtime.model.pooled_dim,
        region_dim=runtime.model.region_dim,
        regions_per_image=runtime.extractor.num_regions,
        index_factories={kind: summary.factory for kind, summary in indexes.items()},
        corpus=CorpusSizes(images=indexes["images"].count, captions=indexes["captions"].count),
        cache=runtime.cache.status().backend,
        limits={
            "max_limit": settings.max_limit,
            "max_candidates": settings.max_candidates,
            "max_query_chars": settings.max_query_chars,
            "max_upload_bytes": settings.max_upload_bytes,
        },
        stages={stage: StageInfo(**where) for stage, where in runtime.stages().items()},
        database=(
            None
            if runtime.corpus.database is None
            else DatabaseInfo(
                url=runtime.corpus.database.display_url,
                reads_from=runtime.corpus.database.router.reads_from(),
                applied_sequence=runtime.corpus.applied_sequence,
            )
        ),
        scores=_score_info(runtime.model.calibration),
    )


def _score_info(calibration: ScoreCalibration | None) -> ScoreInfo:
    """What `score` and `min_score` mean with this model: calibrated or the documented
    fallback (raw scores, each mode on its own scale)."""
    if calibration is None:
        return ScoreInfo(
            kind="raw",
            detail="this model has no calibration (`camp-search calibrate`): scores are raw, "
            "the shortlist's cosine without rerank and the fused score with it, so a "
            "min_score does not mean the same in both modes",
        )
    return ScoreInfo(
        kind="match_probability",
        calibrated_on=calibration.fitted_on,
        detail="score is P(match) in [0, 1], fitted on dev per direction and mode (Platt); "
        "min_score means the same reranked or not",
    )

"""Request and response bodies of the HTTP API (what clients see; never storage records).

Static bounds live on the fields (`ge=1`, non-blank text); the upper bounds come from the
operator's settings and are checked by `service.api.deps` against `Settings` (one place), so the
same schema serves every deployment. Field descriptions end up in the OpenAPI page at /docs.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.search.results import (
    CaptionHit,
    CaptionMatches,
    Explanation,
    ImageMatches,
    SearchParams,
    Timings,
)

DEFAULT_LIMIT = 10
DEFAULT_CANDIDATES = 100
MAX_ID = 2**63 - 1  # SQLite's INTEGER range: no stored id is larger


def image_file_url(image_id: int) -> str:
    """Where the API serves an image's stored bytes."""
    return f"/v1/images/{image_id}/file"


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must contain at least one non-space character")
    return text


# --- search requests ----------------------------------------------------------------------


class SearchOptions(BaseModel):
    """Options shared by both search directions (the core's `SearchParams`)."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(
        DEFAULT_LIMIT, ge=1, description="Hits to return (at most CAMPSEARCH_MAX_LIMIT)."
    )
    candidates: int = Field(
        DEFAULT_CANDIDATES,
        ge=1,
        description="Shortlist size K that the reranker scores (at most "
        "CAMPSEARCH_MAX_CANDIDATES); raised to `limit` when smaller.",
    )
    rerank: bool = Field(
        True, description="Rerank the shortlist with the model's second-stage scorer (CAMP, IMRAM)."
    )
    min_score: float | None = Field(
        None,
        allow_inf_nan=False,
        description="Drop hits whose `score` is below this: a match probability in [0, 1] for "
        "a calibrated model (the same scale reranked or not; see /v1/info `scores`). When no "
        "candidate reaches it the answer is empty with `no_match` true and a `message`.",
    )
    explain: bool = Field(
        False, description="Attach region boxes and word-region attention to every hit."
    )

    def params(self) -> SearchParams:
        """These options as the search pipeline takes them."""
        return SearchParams(**self.model_dump(include=set(SearchOptions.model_fields)))


class ImageSearchRequest(SearchOptions):
    """Text -> images."""

    text: str = Field(
        ..., min_length=1, description="The query (at most CAMPSEARCH_MAX_QUERY_CHARS)."
    )

    _text_not_blank = field_validator("text")(_not_blank)


class CaptionSearchByIdRequest(SearchOptions):
    """Image -> captions, for an image already in the corpus (uses its stored regions)."""

    image_id: int = Field(..., ge=0, le=MAX_ID, description="Id of an indexed image.")


class CaptionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(..., min_length=1, description="The caption (at most max_query_chars).")
    image_id: int | None = Field(
        None, ge=0, le=MAX_ID, description="The image it describes, if any."
    )

    _text_not_blank = field_validator("text")(_not_blank)


# --- search responses (Explanation and Timings are the core's own) --------------------------------


class ImageHit(BaseModel):
    id: int
    score: float = Field(
        description="P(match) in [0, 1] when the model is calibrated (`score_kind`), the same "
        "scale reranked or not; else the raw final score."
    )
    raw_score: float = Field(
        description="The raw final score (fused when reranked, else the "
        "shortlist score) that `score` is calibrated from."
    )
    shortlist_score: float
    shortlist_rank: int = Field(description="0-based rank in the FAISS shortlist.")
    url: str = Field(description="Where the photo's bytes are served.")
    captions: list[str]
    explanation: Explanation | None = None


class ScoreVerdict(BaseModel):
    """What the hits' scores mean, and whether anything reached `min_score`."""

    score_kind: Literal["match_probability", "raw"] = Field(
        description="match_probability: calibrated on dev, the same scale in both modes; raw: "
        "the model has no calibration, scores are on each mode's own scale."
    )
    no_match: bool = Field(
        False, description="True when `min_score` was given and no candidate reached it."
    )
    message: str | None = Field(None, description="Why the result is empty, in words.")


def _flatten_verdict(found: dict) -> dict:
    """The core's `verdict` as top-level fields of a search response."""
    return found | found.pop("verdict")


class ImageSearchResponse(ScoreVerdict):
    results: list[ImageHit]
    timings_ms: Timings

    @classmethod
    def of(cls, matches: ImageMatches) -> ImageSearchResponse:
        """The answer to a text search, each hit with the URL of its photo."""
        found = _flatten_verdict(asdict(matches))
        for hit in found["results"]:
            hit["url"] = image_file_url(hit["id"])
        return cls.model_validate(found)


class CaptionSearchResponse(ScoreVerdict):
    results: list[CaptionHit]
    timings_ms: Timings

    @classmethod
    def of(cls, matches: CaptionMatches) -> CaptionSearchResponse:
        """The answer to a photo search."""
        return cls.model_validate(_flatten_verdict(asdict(matches)))


# --- resources ----------------------------------------------------------------------------


class CaptionPublic(BaseModel):
    id: int
    text: str
    image_id: int | None = None


class ImagePublic(BaseModel):
    id: int
    sha256: str
    width: int
    height: int
    regions: int = Field(description="Region features stored for the reranker.")
    url: str
    captions: list[CaptionPublic]


class ImageAdded(ImagePublic):
    """The answer to an upload: the stored photo, and what became of the captions sent."""

    captions_added: int = Field(description="Captions of this request stored by it.")
    captions_skipped: int = Field(
        description="Captions of this request the photo already had (or sent twice): not "
        "stored again."
    )


class ImagesPublic(BaseModel):
    data: list[ImagePublic]
    count: int


# --- operations ---------------------------------------------------------------------------


class ComponentState(BaseModel):
    name: str
    ok: bool
    detail: str


class Readiness(BaseModel):
    status: str = Field(
        description="'ready', 'degraded' (still serving), 'starting', 'failed', or "
        "'unavailable' (no database to read from)."
    )
    components: list[ComponentState]


class CorpusSizes(BaseModel):
    images: int
    captions: int


class StageInfo(BaseModel):
    """Where one stage runs and in what arithmetic."""

    device: str = Field(description='"cpu" or "cuda:N"')
    precision: Literal["fp32", "bf16", "fp16"]
    indexes: dict[str, str] | None = Field(
        default=None, description="shortlist only: where each index searches (kind -> device)"
    )


class ScoreInfo(BaseModel):
    """What a search's `score` means with the loaded model."""

    kind: Literal["match_probability", "raw"]
    calibrated_on: str | None = Field(
        None, description="The split the match probabilities were fitted on (dev)."
    )
    detail: str


class DatabaseInfo(BaseModel):
    url: str  # the primary's, without its password
    reads_from: str  # "replica" or "primary", now
    applied_sequence: int


class ServiceInfo(BaseModel):
    model_version: str
    extractor: str
    extractor_version: str
    device: str
    embedding_dim: int
    region_dim: int
    regions_per_image: int
    index_factories: dict[str, str]
    corpus: CorpusSizes
    cache: str
    limits: dict[str, int]
    stages: dict[str, StageInfo] = Field(
        description="text_encoder, extractor, shortlist, reranker: device and precision"
    )
    scores: ScoreInfo
    database: DatabaseInfo | None = Field(
        default=None,
        description="PostgreSQL mode: the database (URL without its password) and the change "
        "sequence this replica has applied; null with the embedded stores",
    )

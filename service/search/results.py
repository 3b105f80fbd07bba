"""What a search is asked and what it answers, in the core's own types (the HTTP face turns
them into its schemas; service/api/routes/search.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SearchParams:
    """How to search: return at most `limit` hits from a shortlist of `candidates` (raised to
    `limit`), reranked by CAMP when `rerank`, at or above `min_score`, explained when `explain`."""

    limit: int
    candidates: int
    rerank: bool = True
    min_score: float | None = None
    explain: bool = False


@dataclass(frozen=True)
class PairExplanation:
    """Why a pair matched: the words, the image's regions as normalised (x0, y0, x1, y1) boxes,
    each word's attention over the regions, CAMP's pooling weights and its score."""

    words: list[str]
    boxes: list[list[float]]
    image_size: tuple[int, int]
    word_region: list[list[float]]
    region_pooling: list[float]
    word_pooling: list[float]
    camp_score: float


@dataclass(frozen=True)
class StageTimings:
    """Milliseconds spent per stage of one search (0 for a stage that did not run)."""

    encode: float
    shortlist: float
    features: float
    rerank: float
    total: float


@dataclass(frozen=True)
class ImageMatch:
    """An image found for a text: its final and shortlist scores and its caption texts."""

    id: int
    score: float
    shortlist_score: float
    shortlist_rank: int
    captions: list[str]
    explanation: PairExplanation | None = None


@dataclass(frozen=True)
class CaptionMatch:
    """A caption found for an image, with the image it describes (if any)."""

    id: int
    text: str
    image_id: int | None
    score: float
    shortlist_score: float
    shortlist_rank: int
    explanation: PairExplanation | None = None


@dataclass(frozen=True)
class ImageMatches:
    results: list[ImageMatch]
    timings_ms: StageTimings


@dataclass(frozen=True)
class CaptionMatches:
    results: list[CaptionMatch]
    timings_ms: StageTimings

"""What a search is asked and what it answers, in the core's own types. The HTTP face wraps the
hits in its schemas (service/api/schemas.py) and serves `Explanation` and `Timings` as they are."""

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
class Explanation:
    """Why a pair matched: enough for a UI to draw a heat map over the photo.

    `boxes[r]` is region r as normalised (x0, y0, x1, y1); `word_region[w][r]` is how much
    word `words[w]` attends to region r (rows sum to 1); `region_pooling[r]` and
    `word_pooling[w]` are the weights the reranker's score gave each region and word (CAMP's
    attention pooling; uniform for IMRAM, which averages); `camp_score` is the reranker's own
    score of the pair (CAMP's sigmoid; IMRAM's summed step similarities).
    """

    words: list[str]
    boxes: list[list[float]]
    image_size: tuple[int, int]
    word_region: list[list[float]]
    region_pooling: list[float]
    word_pooling: list[float]
    camp_score: float


@dataclass(frozen=True)
class Timings:
    """Milliseconds spent per stage of this request (0 for a stage that did not run)."""

    encode: float = 0.0
    shortlist: float = 0.0
    features: float = 0.0
    rerank: float = 0.0
    total: float = 0.0


@dataclass(frozen=True)
class ImageMatch:
    """An image found for a text: its final and shortlist scores and its caption texts."""

    id: int
    score: float
    shortlist_score: float
    shortlist_rank: int
    captions: list[str]
    explanation: Explanation | None = None


@dataclass(frozen=True)
class CaptionHit:  # served as it is: the API's schema of a caption found (no description)
    id: int
    text: str
    image_id: int | None
    score: float
    shortlist_score: float
    shortlist_rank: int
    explanation: Explanation | None = None


@dataclass(frozen=True)
class ImageMatches:
    results: list[ImageMatch]
    timings_ms: Timings


@dataclass(frozen=True)
class CaptionMatches:
    results: list[CaptionHit]
    timings_ms: Timings

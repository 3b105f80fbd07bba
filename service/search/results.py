"""What a search is asked and what it answers, in the core's own types. The HTTP face wraps the
hits in its schemas (service/api/schemas.py) and serves `Explanation` and `Timings` as they are."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SearchParams:
    """How to search: return at most `limit` hits from a shortlist of `candidates` (raised to
    `limit`), reranked by CAMP when `rerank`, at or above `min_score`, explained when `explain`.

    `min_score` is on the scale of the hits' `score`: the calibrated match probability when the
    model has a calibration (the same scale reranked or not), else the raw score."""

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
    attention pooling; for IMRAM, which weighs fragments alike, the words' attention averaged over
    the words, and uniform word weights); `camp_score` is the reranker's own
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
    """An image found for a text: its score (P(match) when calibrated), the raw final score it
    came from (fused when reranked, else the shortlist's), the shortlist score and its captions."""

    id: int
    score: float
    raw_score: float
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
    raw_score: float
    shortlist_score: float
    shortlist_rank: int
    explanation: Explanation | None = None


SCORE_PROBABILITY = "match_probability"
SCORE_RAW = "raw"


@dataclass(frozen=True)
class Verdict:
    """What the scores of one search mean, and whether anything good enough was found.

    `score_kind`: "match_probability" (calibrated, the same scale reranked or not) or "raw" (a
    model without calibration: the mode's own scale); `no_match`: `min_score` was given, there
    were candidates, and none reached it; `message` says so in words."""

    score_kind: str
    no_match: bool = False
    message: str | None = None


@dataclass(frozen=True)
class ImageMatches:
    results: list[ImageMatch]
    timings_ms: Timings
    verdict: Verdict


@dataclass(frozen=True)
class CaptionMatches:
    results: list[CaptionHit]
    timings_ms: Timings
    verdict: Verdict

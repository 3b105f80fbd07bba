"""Fit a model's score calibration on a split (`camp-search calibrate`), and its reliability.

The pairs are those a search would show: every query's pooled top-`candidates` (the service's
default shortlist size), scored both ways, raw pooled and two-stage fused. A pair is a match
when the caption belongs to the image. The stored maps are fitted on all of the split; the
reliability is reported in-sample (those maps on those pairs) and cross-fitted (maps fitted on
the queries of even-numbered images, measured on the odd ones, and the other way round), so the
model card shows how much fitting on the same pairs flatters the curve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from model.calibration import (
    CALIBRATION_MODES,
    DIRECTIONS,
    Direction,
    Mode,
    PlattMap,
    ScoreCalibration,
    reliability,
)
from model.eval.data import CAPTIONS_PER_IMAGE, RetrievalSplit
from model.eval.evaluate_model import EncodedSplit
from model.eval.protocol import shortlist
from model.retrieval import RetrievalModel


@dataclass(frozen=True)
class CalibrationPairs:
    """One direction's shortlisted pairs: raw scores per mode, labels, and each pair's image
    (the unit of the cross-fitting split)."""

    raw: dict[Mode, np.ndarray]
    labels: np.ndarray
    image: np.ndarray


def calibration_pairs(
    model: RetrievalModel,
    split: RetrievalSplit,
    candidates: int,
    on_pairs: Callable[[int], None] | None = None,
) -> dict[Direction, CalibrationPairs]:
    """Every query's pooled top-`candidates`, with its pooled and two-stage raw scores."""
    encoded = EncodedSplit(model, split, on_pairs)
    pooled, _ = encoded.subset(slice(0, split.num_images))
    out: dict[Direction, CalibrationPairs] = {}
    for direction, axis in (("t2i", 0), ("i2t", 1)):
        shortlisted = shortlist(pooled, candidates, axis)
        queries = np.repeat(np.arange(len(shortlisted)), shortlisted.shape[1])
        found = shortlisted.reshape(-1)
        images, captions = (found, queries) if axis == 0 else (queries, found)
        shortlist_scores = pooled[images, captions]
        scores = encoded.score_pairs(images, captions, shortlist_scores)
        out[direction] = CalibrationPairs(
            raw={"pooled": shortlist_scores.astype(np.float32), "two_stage": scores["final"]},
            labels=(captions // CAPTIONS_PER_IMAGE == images).astype(np.float32),
            image=images if axis == 1 else captions // CAPTIONS_PER_IMAGE,
        )
    return out


def fit_calibration(
    pairs: dict[Direction, CalibrationPairs], fitted_on: str, candidates: int
) -> tuple[ScoreCalibration, dict]:
    """The maps fitted on all pairs, and a report: per direction and mode the map, the share
    of matching pairs, and the reliability in-sample and cross-fitted (even/odd images)."""
    maps: dict[tuple[Direction, Mode], PlattMap] = {}
    report: dict = {}
    for direction in DIRECTIONS:
        these = pairs[direction]
        even = these.image % 2 == 0
        for mode in CALIBRATION_MODES:
            raw = these.raw[mode]
            fitted = PlattMap.fit(raw, these.labels)
            maps[(direction, mode)] = fitted
            crossed = np.empty(len(raw), dtype=np.float32)
            for held_out in (even, ~even):
                crossed[held_out] = PlattMap.fit(raw[~held_out], these.labels[~held_out])(
                    raw[held_out]
                )
            report.setdefault(direction, {})[mode] = {
                "slope": fitted.slope,
                "intercept": fitted.intercept,
                "match_rate": float(these.labels.mean()),
                "in_sample": reliability(fitted(raw), these.labels),
                "cross_fitted": reliability(crossed, these.labels),
            }
    return ScoreCalibration(maps=maps, fitted_on=fitted_on, candidates=candidates), report


def check_calibration(
    pairs: dict[Direction, CalibrationPairs], calibration: ScoreCalibration
) -> dict:
    """The reliability of stored maps on other pairs (e.g. another domain), fitting nothing:
    the same report layout as `fit_calibration`, with the stored map and "held_out" curves."""
    report: dict = {}
    for direction in DIRECTIONS:
        these = pairs[direction]
        for mode in CALIBRATION_MODES:
            stored = calibration.maps[(direction, mode)]
            report.setdefault(direction, {})[mode] = {
                "slope": stored.slope,
                "intercept": stored.intercept,
                "match_rate": float(these.labels.mean()),
                "held_out": reliability(stored(these.raw[mode]), these.labels),
            }
    return report

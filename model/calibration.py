"""Calibrated match probabilities: one score with one meaning, reranked or not.

A raw score means different things per mode (the pooled shortlist's cosine, the two-stage fused
score) and per direction, so a `min_score` picked in one mode is meaningless in the other. Each
(direction, mode) gets a Platt map, P(match | raw score) = sigmoid(slope * raw + intercept),
fitted by logistic regression on Flickr8K dev pairs in the shortlist the service would rerank
(`camp-search calibrate`). The maps travel in the checkpoint's metadata under "calibration";
a checkpoint without them is served uncalibrated (raw scores, said so in /info).

"Match" means what the dev labels mean: the photo the caption was written for (text -> image),
or one of the photo's own captions (image -> text). An image that fits a query but was captioned
for another photo counts as a miss, so the probabilities are conservative for generic queries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Direction = Literal["t2i", "i2t"]
Mode = Literal["pooled", "two_stage"]
DIRECTIONS: tuple[Direction, ...] = ("t2i", "i2t")
CALIBRATION_MODES: tuple[Mode, ...] = ("pooled", "two_stage")
METADATA_KEY = "calibration"
FORMAT_VERSION = 1
RELIABILITY_BINS = 10


class CalibrationError(ValueError):
    """A calibration cannot be fitted or read; the message says why."""


@dataclass(frozen=True)
class PlattMap:
    """P(match) = sigmoid(slope * raw + intercept); slope > 0, so the map keeps the ranking."""

    slope: float
    intercept: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.slope) and np.isfinite(self.intercept)) or self.slope <= 0:
            raise CalibrationError(
                f"a calibration map needs a finite positive slope and a finite intercept, got "
                f"slope {self.slope!r}, intercept {self.intercept!r}"
            )

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """Probabilities in [0, 1], float32, of raw scores (any shape)."""
        logits = self.slope * np.asarray(raw, dtype=np.float64) + self.intercept
        # exp of a negative argument only: no overflow warning for large |logit|
        positive = logits >= 0
        out = np.empty_like(logits)
        out[positive] = 1.0 / (1.0 + np.exp(-logits[positive]))
        exp = np.exp(logits[~positive])
        out[~positive] = exp / (1.0 + exp)
        return out.astype(np.float32)

    @classmethod
    def fit(cls, raw: np.ndarray, labels: np.ndarray, iterations: int = 50) -> PlattMap:
        """Logistic regression of `labels` (0/1) on `raw` by Newton's method (two parameters:
        it converges in a handful of steps; the raw score is standardised first)."""
        raw = np.asarray(raw, dtype=np.float64).reshape(-1)
        labels = np.asarray(labels, dtype=np.float64).reshape(-1)
        if raw.shape != labels.shape or raw.size == 0:
            raise CalibrationError(f"need one label per score, got {raw.size} and {labels.size}")
        positives = labels.sum()
        if positives == 0 or positives == labels.size:
            raise CalibrationError("calibration needs both matching and non-matching pairs")
        centre, spread = raw.mean(), raw.std()
        if spread == 0:
            raise CalibrationError("every raw score is the same: nothing to calibrate")
        features = np.stack([(raw - centre) / spread, np.ones_like(raw)], axis=1)
        weights = np.array([1.0, np.log(positives / (labels.size - positives))])
        for _ in range(iterations):
            probability = 1.0 / (1.0 + np.exp(-(features @ weights)))
            gradient = features.T @ (probability - labels)
            curvature = (features * (probability * (1 - probability))[:, None]).T @ features
            step = np.linalg.solve(curvature + 1e-9 * np.eye(2), gradient)
            weights -= step
            if np.abs(step).max() < 1e-10:
                break
        slope = weights[0] / spread
        return cls(slope=float(slope), intercept=float(weights[1] - slope * centre))


def reliability(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = RELIABILITY_BINS
) -> dict[str, Any]:
    """The reliability curve over `bins` equal-width bins of predicted probability: per bin its
    pair count, mean prediction and observed match rate; and the expected calibration error
    (ECE: the count-weighted mean |predicted - observed|)."""
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    which = np.minimum((probabilities * bins).astype(np.int64), bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        predicted = float(probabilities[inside].mean()) if count else None
        observed = float(labels[inside].mean()) if count else None
        if count:
            ece += count * abs(predicted - observed)  # type: ignore[operator]
        rows.append(
            {"low": b / bins, "high": (b + 1) / bins, "count": count, "predicted": predicted,
             "observed": observed}
        )  # fmt: skip
    return {"bins": rows, "ece": ece / max(len(labels), 1), "pairs": len(labels)}


@dataclass(frozen=True)
class ScoreCalibration:
    """The Platt maps of one model, per direction and mode, and what they were fitted on."""

    maps: Mapping[tuple[Direction, Mode], PlattMap]
    fitted_on: str
    candidates: int

    def __post_init__(self) -> None:
        missing = [
            f"{d}/{m}" for d in DIRECTIONS for m in CALIBRATION_MODES if (d, m) not in self.maps
        ]
        if missing:
            raise CalibrationError(f"calibration lacks the maps {missing}")

    def probability(self, direction: Direction, reranked: bool, raw: np.ndarray) -> np.ndarray:
        """P(match) of raw scores of one search direction and mode."""
        return self.maps[(direction, "two_stage" if reranked else "pooled")](raw)

    def to_metadata(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Plain JSON-able record for the checkpoint's metadata (`extra`: e.g. reliability)."""
        return {
            "format_version": FORMAT_VERSION,
            "method": "platt",
            "fitted_on": self.fitted_on,
            "candidates": self.candidates,
            "maps": {
                d: {
                    m: {"slope": self.maps[(d, m)].slope, "intercept": self.maps[(d, m)].intercept}
                    for m in CALIBRATION_MODES
                }
                for d in DIRECTIONS
            },
            **dict(extra or {}),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ScoreCalibration | None:
        """The calibration in a checkpoint's metadata; None when it has none (an older model).
        A record that is there but unreadable is an error, never silently ignored."""
        record = metadata.get(METADATA_KEY)
        if record is None:
            return None
        try:
            if record["format_version"] != FORMAT_VERSION or record["method"] != "platt":
                raise CalibrationError(
                    f"unknown calibration format {record['format_version']!r}/{record['method']!r}"
                )
            maps = {
                (d, m): PlattMap(
                    float(record["maps"][d][m]["slope"]), float(record["maps"][d][m]["intercept"])
                )
                for d in DIRECTIONS
                for m in CALIBRATION_MODES
            }
            return cls(
                maps=maps, fitted_on=str(record["fitted_on"]), candidates=int(record["candidates"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(
                f"the checkpoint's calibration record is malformed: {exc}"
            ) from exc

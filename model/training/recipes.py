"""Training presets as data (model/configs/train_*.json) and the two recipes that run them.

* "residual" (the CPU recipe of the shipped model): frozen MiniLM + grid features; stage
  "pooled" trains the shortlist heads with InfoNCE, stage "reranker" trains CAMP as a residual
  over the frozen shortlist on mined shortlists (model/training/reranker.py).
* "camp_official" (BUTD precomputed features on a GPU, docs/ARCHITECTURE.md, Training): GRU text
encoder over a
  vocabulary built from the training captions (count >= 4), BCE hardest-negative loss on all
  B×B pairs of a batch, three stages: (1) everything, Adam; (2) encoders and the 8 attention
  projections frozen, SGD nesterov; (3) everything, SGD; then the shortlist heads (InfoNCE) on
  the frozen model. Deviation: the authors' stage 1 trains a separate attention-only variant
  with cosine scores; here stage 1 trains the full CAMP model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.architecture.network import NetworkSpec
from model.checkpoints.extractor import ExtractorRecord, ExtractorRecordError
from model.vision.extractors import (
    InvalidExtractorConfig,
    UnknownExtractor,
    check_extractor_config,
)

RECIPES = ("residual", "camp_official")


class TrainConfigError(ValueError):
    """A training preset is malformed; the message names the key."""


@dataclass
class TrainConfig:
    recipe: str
    version: str
    data: dict[str, Any]
    network: dict[str, Any]
    extractor: dict[str, Any]
    out: str
    seed: int = 0
    threads: int = 0  # 0: torch's default
    pooled: dict[str, Any] = field(default_factory=dict)
    reranker: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainConfigError(f"cannot read training config {path}: {exc}") from exc
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise TrainConfigError(f"{path}: unknown keys {sorted(unknown)}")
        try:
            config = cls(**raw)
        except TypeError as exc:
            raise TrainConfigError(f"{path}: {exc}") from exc
        if config.recipe not in RECIPES:
            raise TrainConfigError(f"{path}: recipe must be one of {RECIPES}, got {config.recipe}")
        try:  # a typo in the network section is refused here, before any data is read
            NetworkSpec.from_dict(config.network)
        except ValueError as exc:
            raise TrainConfigError(f"{path}: network: {exc}") from exc
        try:  # every checkpoint carries it: the service must be able to rebuild the extractor
            record = ExtractorRecord.from_dict(config.extractor)
            check_extractor_config(record.name, record.config)
        except (ExtractorRecordError, InvalidExtractorConfig, UnknownExtractor) as exc:
            raise TrainConfigError(f"{path}: extractor: {exc}") from exc
        return config

    def metadata(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "extractor": ExtractorRecord.from_dict(self.extractor).to_dict(),
            "training": {"recipe": self.recipe, "seed": self.seed, "data": self.data},
        }

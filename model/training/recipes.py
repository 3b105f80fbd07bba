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
* "heads_imported" (CPU): only the shortlist heads, on a frozen imported official CAMP named in
  `init.checkpoint` (model/training/heads_imported.py); `network` gives only the heads' sizes.
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

RECIPES = ("residual", "camp_official", "heads_imported")
# What a heads_imported preset may set of the network; everything else is the imported model's.
HEAD_SPEC_KEYS = ("pooled_dim", "pooled_hidden")
# How the heads_imported recipe orders a reranked shortlist: CAMP's score alone (the authors'
# ranking), or the fusion weight with the best two-stage rsum on dev.
FUSION_CHOICES = ("camp_alone", "tune")


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
    init: dict[str, Any] = field(default_factory=dict)  # heads_imported: {"checkpoint": path}
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
            spec = NetworkSpec.from_dict(config.network)
        except ValueError as exc:
            raise TrainConfigError(f"{path}: network: {exc}") from exc
        if config.reranker.get("warm_start"):
            config._check_warm_start(path, spec)
        if config.recipe == "heads_imported":  # the extractor record is the imported model's
            config._check_heads_imported(path)
            return config
        try:  # every checkpoint carries it: the service must be able to rebuild the extractor
            record = ExtractorRecord.from_dict(config.extractor)
            check_extractor_config(record.name, record.config)
        except (ExtractorRecordError, InvalidExtractorConfig, UnknownExtractor) as exc:
            raise TrainConfigError(f"{path}: extractor: {exc}") from exc
        return config

    @staticmethod
    def _check_warm_start(path: str | Path, spec: NetworkSpec) -> None:
        """A warm start copies the heads' linear maps into the scorer's encoders: the scorer
        must have one, the text side a projection to copy into (minilm), and d the heads' width."""
        if spec.reranker_kind.warm_start is None:
            raise TrainConfigError(
                f"{path}: reranker.warm_start: the {spec.scorer!r} scorer has no warm start "
                "from the shortlist heads; set it to false"
            )
        if spec.text_encoder != "minilm" or spec.embed_size != spec.pooled_dim:
            raise TrainConfigError(
                f"{path}: reranker.warm_start copies the heads' linear maps into the "
                f"{spec.scorer!r} scorer's encoders: it needs text_encoder 'minilm' (got "
                f"{spec.text_encoder!r}) and embed_size == pooled_dim (got {spec.embed_size} "
                f"and {spec.pooled_dim}); set it to false"
            )

    def _check_heads_imported(self, path: str | Path) -> None:
        if not self.init.get("checkpoint"):
            raise TrainConfigError(
                f"{path}: init.checkpoint must name the imported model (camp-search "
                "import-checkpoint writes it)"
            )
        other = sorted(set(self.network) - set(HEAD_SPEC_KEYS))
        if other:
            raise TrainConfigError(
                f"{path}: network may set only {list(HEAD_SPEC_KEYS)} here (the rest is the "
                f"imported model's), got {other}"
            )
        fusion = self.selection.get("fusion", FUSION_CHOICES[0])
        if fusion not in FUSION_CHOICES:
            raise TrainConfigError(
                f"{path}: selection.fusion must be one of {FUSION_CHOICES}, got {fusion!r}"
            )

    def metadata(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "extractor": ExtractorRecord.from_dict(self.extractor).to_dict(),
            "training": {"recipe": self.recipe, "seed": self.seed, "data": self.data},
        }

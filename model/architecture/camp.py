"""The whole CAMP model: image encoder + text encoder + cross-modal scorer (docs/ARCHITECTURE.md,
The model)."""

from __future__ import annotations

from torch import Tensor

from model.architecture.cross_modal import CrossModalModel
from model.architecture.encoders import GRUTextEncoder, ImageEncoder
from model.architecture.scorer import CampScorer, ScoreTrace
from model.checkpoints.config import CampConfig


class CampModel(CrossModalModel):
    """`image_encoder`, `text_encoder` and `scorer` under one state dict.

    `forward` is the training/evaluation direct form: all Ni images x Nc captions, scores
    [Ni, Nc]. Serving uses `model.architecture.precompute.PrecomputedScorer(model.scorer)` instead.
    """

    @classmethod
    def from_config(cls, config: CampConfig) -> CampModel:
        return cls(
            image_encoder=ImageEncoder.from_config(config),
            text_encoder=GRUTextEncoder.from_config(config),
            scorer=CampScorer.from_config(config),
            config=config,
        )

    def forward_with_trace(
        self,
        regions: Tensor,
        token_ids: Tensor,
        lengths: Tensor,
        region_mask: Tensor | None = None,
    ) -> ScoreTrace:
        text = self.encode_text(token_ids, lengths)
        return self.scorer.forward_with_trace(
            self.encode_images(regions), text.words, text.mask, region_mask
        )

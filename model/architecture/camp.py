"""The whole CAMP model: image encoder + text encoder + cross-modal scorer (docs/ARCHITECTURE.md,
The model)."""

from __future__ import annotations

from torch import Tensor, nn

from model.architecture.encoders import EncodedText, GRUTextEncoder, ImageEncoder, TextEncoder
from model.architecture.scorer import CampScorer, ScoreTrace
from model.checkpoints.config import CampConfig


class CampModel(nn.Module):
    """`image_encoder`, `text_encoder` and `scorer` under one state dict.

    `forward` is the training/evaluation direct form: all Ni images x Nc captions, scores
    [Ni, Nc]. Serving uses `model.architecture.precompute.PrecomputedScorer(model.scorer)` instead.
    """

    def __init__(
        self,
        *,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        scorer: CampScorer,
        config: CampConfig | None = None,
    ) -> None:
        super().__init__()
        sizes = {image_encoder.embed_size, text_encoder.embed_size, scorer.embed_size}
        if len(sizes) != 1:
            raise ValueError(f"encoders and scorer disagree on embed_size: {sorted(sizes)}")
        self.config = config
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.scorer = scorer

    @classmethod
    def from_config(cls, config: CampConfig) -> CampModel:
        return cls(
            image_encoder=ImageEncoder.from_config(config),
            text_encoder=GRUTextEncoder.from_config(config),
            scorer=CampScorer.from_config(config),
            config=config,
        )

    def encode_images(self, regions: Tensor) -> Tensor:
        """regions [Ni, R, img_dim] -> V [Ni, R, d]."""
        return self.image_encoder(regions)

    def encode_text(self, token_ids: Tensor, lengths: Tensor) -> EncodedText:
        """token_ids [Nc, L_in] (any order, any right padding) -> words [Nc, max_len, d]."""
        return self.text_encoder(token_ids, lengths)

    def forward(
        self,
        regions: Tensor,
        token_ids: Tensor,
        lengths: Tensor,
        region_mask: Tensor | None = None,
    ) -> Tensor:
        """Scores [Ni, Nc] of every image against every caption; `region_mask` [Ni, R] (True on
        real regions) when images are padded to a common region count."""
        text = self.encode_text(token_ids, lengths)
        return self.scorer(self.encode_images(regions), text.words, text.mask, region_mask)

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

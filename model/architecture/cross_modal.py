"""What every registered reranker's whole model shares: an image encoder, a text encoder and a
cross-modal scorer under one state dict, and the direct form over all Ni x Nc pairs."""

from __future__ import annotations

from torch import Tensor, nn

from model.architecture.encoders import EncodedText
from model.checkpoints.config import CampConfig


class CrossModalModel(nn.Module):
    """`image_encoder`, `text_encoder` and `scorer` of one embedding size; `forward` scores all
    Ni images x Nc captions, [Ni, Nc]. Subclasses build them (`from_config`) and trace them."""

    def __init__(
        self,
        *,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        scorer: nn.Module,
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

    def encode_images(self, regions: Tensor) -> Tensor:
        """regions [Ni, R, img_dim] -> region vectors [Ni, R, d]."""
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

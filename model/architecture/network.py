"""The trainable retrieval network: the reranker (encoders + scorer: CAMP, or another scorer of
the registry in model/architecture/rerankers.py) + shortlist heads + score fusion.

One `nn.Module` so training sees one parameter set; `RetrievalModel` (model/retrieval.py) is the
inference facade over it. Serialised as one `CampCheckpoint`: the CAMP part in `state_dict` (our
key names, so GRU models also rebuild with `CampCheckpoint.build_model`), the heads and fusion
in `extras`, the architecture in `extras["retrieval"]`, provenance in `metadata`.

The text side is named in the spec (`text_encoder`: "gru", "minilm") and everything that
depends on it comes from its entry in the text-encoder registry (model/text/registry.py); the
second-stage scorer likewise (`scorer`: "camp", "imram", with its `scorer_options`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from model.architecture.encoders import EncodedText
from model.architecture.fusion import ScoreFusion
from model.architecture.pooled import PooledHeads, masked_mean
from model.architecture.rerankers import RerankerKind, reranker_kind
from model.architecture.scorer import l2norm
from model.checkpoints.checkpoint import CampCheckpoint, CheckpointError
from model.checkpoints.config import CampConfig, ConfigError, config_from_dict
from model.text.minilm import DEFAULT_MAX_WORDPIECES, MiniLMBackbone, MiniLMWordEncoder
from model.text.registry import TextEncoderKind, text_encoder_kind
from model.text.vocab import Vocabulary

SPEC_VERSION = 1


@dataclass(frozen=True)
class NetworkSpec:
    """Architecture of a retrieval network (stored in the checkpoint's extras)."""

    text_encoder: str = "minilm"
    embed_size: int = 256  # CAMP's d
    region_dim: int = 1280
    num_heads: int = 4
    pooled_dim: int = 256  # e, the shortlist vectors
    pooled_hidden: int = 1024
    word_dim: int = 300  # gru only
    max_wordpieces: int = DEFAULT_MAX_WORDPIECES  # minilm only
    camp_cosine_skip: bool = False  # add cos(v*, t*) to CAMP's logit (model/architecture/fusion.py)
    scorer: str = "camp"  # the second stage, by its name in model/architecture/rerankers.py
    scorer_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        text_encoder_kind(self.text_encoder)  # refuses a name nothing is registered under
        self.reranker_kind.check_options(self.scorer_options)

    @property
    def reranker_kind(self) -> RerankerKind:
        """The registry entry of this spec's second-stage scorer."""
        return reranker_kind(self.scorer)

    @property
    def text_kind(self) -> TextEncoderKind:
        """The registry entry of this spec's text side."""
        return text_encoder_kind(self.text_encoder)

    @property
    def text_feature_dim(self) -> int:
        """Width of what the pooled text head reads."""
        return self.text_kind.feature_dim(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkSpec:
        """Unknown keys are refused, as in every model config."""
        return config_from_dict(cls, data, what="network spec")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RetrievalNetwork(nn.Module):
    """`camp` (the reranker: image_encoder, text_encoder, scorer; CAMP's returns logits; the
    attribute keeps its name so that CAMP state dicts and callers stay as they are), `heads`,
    `fusion`.

    `heads` may be None (e.g. an imported official checkpoint): the shortlist then falls back to
    l2-normalised means of CAMP's own encoder outputs.
    """

    def __init__(
        self,
        spec: NetworkSpec,
        *,
        vocabulary: Vocabulary | None = None,
        backbone: MiniLMBackbone | None = None,
        with_heads: bool = True,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.vocabulary = vocabulary
        self.camp = spec.reranker_kind.build_for_network(
            spec, vocabulary, backbone, self.camp_config()
        )
        self.heads = (
            PooledHeads(
                image_dim=spec.region_dim,
                text_dim=spec.text_feature_dim,
                embed_dim=spec.pooled_dim,
                hidden_dim=spec.pooled_hidden,
            )
            if with_heads
            else None
        )
        self.fusion = ScoreFusion()

    def camp_config(self) -> CampConfig:
        spec = self.spec
        vocab_size, word_dim = spec.text_kind.word_table(spec, self.vocabulary)
        return CampConfig(
            vocab_size=vocab_size,
            word_dim=word_dim,
            embed_size=spec.embed_size,
            img_dim=spec.region_dim,
            num_heads=spec.num_heads,
            max_words=spec.reranker_kind.max_words,
            pad_width=spec.reranker_kind.max_words + 3,
            name=f"retrieval-{spec.text_encoder}",
        )

    def pair_scorer(self):
        """The reranker's pair scorer over per-item tensors, on these weights (no copy): CAMP's
        `PrecomputedScorer`, or the registered scorer's (model/architecture/rerankers.py)."""
        return self.spec.reranker_kind.precomputed(self.camp.scorer)

    @property
    def pooled_dim(self) -> int:
        return self.heads.embed_dim if self.heads is not None else self.spec.embed_size

    # -- pieces used by both inference and training ------------------------------------------
    def text_features(self, token_ids: Tensor, lengths: Tensor) -> Tensor:
        """What the text side computes from token ids before CAMP's projection: [B, L, h]."""
        return self.camp.text_encoder.features(token_ids, lengths)

    def words_from_features(self, features: Tensor, lengths: Tensor) -> EncodedText:
        """[B, L, h] text features -> CAMP word features (identity for the GRU)."""
        return self.camp.text_encoder.project(features, lengths)

    def pooled_text(self, features: Tensor, lengths: Tensor) -> Tensor:
        """[B, L, h] text features -> [B, e] unit shortlist vectors."""
        if self.heads is not None:
            return self.heads.text(features, lengths)
        return l2norm(masked_mean(self.words_from_features(features, lengths).words, lengths))

    def pooled_images(self, regions: Tensor, region_counts: Tensor | None = None) -> Tensor:
        """[B, R, D] raw region features -> [B, e] unit shortlist vectors; `region_counts` [B]:
        real regions per image when padded to R (the mean skips the padding)."""
        if self.heads is not None:
            return self.heads.image(regions, region_counts)
        return l2norm(masked_mean(self.camp.image_encoder(regions), region_counts))

    # -- serialisation --------------------------------------------------------------------------
    def to_checkpoint(self, metadata: dict[str, Any]) -> CampCheckpoint:
        extras: dict[str, Any] = {
            "retrieval": {"spec_version": SPEC_VERSION, "spec": self.spec.to_dict()},
            "fusion": {k: v.detach().cpu() for k, v in self.fusion.state_dict().items()},
        }
        if self.heads is not None:
            extras["pooled_heads"] = {
                k: v.detach().cpu() for k, v in self.heads.state_dict().items()
            }
        return CampCheckpoint(
            config=self.camp_config(),
            state_dict={k: v.detach().cpu() for k, v in self.camp.state_dict().items()},
            vocabulary=self.vocabulary,
            extras=extras,
            metadata=dict(metadata),
            scorer=self.spec.scorer,
            scorer_options=dict(self.spec.scorer_options),
        )

    @classmethod
    def from_checkpoint(
        cls, checkpoint: CampCheckpoint, *, backbone_loader=None
    ) -> RetrievalNetwork:
        """Rebuild from our checkpoint, or from an imported official one (GRU, no heads).

        `backbone_loader()` supplies the MiniLM body for minilm networks (default: its package).
        """
        retrieval = checkpoint.extras.get("retrieval")
        if retrieval is None:  # a plain checkpoint (e.g. an official CAMP or IMRAM release)
            config = checkpoint.config
            try:
                spec = NetworkSpec(
                    text_encoder="gru",
                    embed_size=config.embed_size,
                    region_dim=config.img_dim,
                    num_heads=config.num_heads,
                    word_dim=config.word_dim,
                    scorer=checkpoint.scorer,
                    scorer_options=dict(checkpoint.scorer_options),
                )
            except ConfigError as exc:
                raise CheckpointError(f"the checkpoint's scorer record: {exc}") from exc
        else:
            if retrieval.get("spec_version") != SPEC_VERSION:
                raise CheckpointError(
                    f"retrieval spec_version {retrieval.get('spec_version')} is not "
                    f"{SPEC_VERSION}; this code cannot read it"
                )
            try:
                spec = NetworkSpec.from_dict(retrieval["spec"])
            except ConfigError as exc:
                raise CheckpointError(f"the checkpoint's retrieval spec: {exc}") from exc
            if spec.scorer != checkpoint.scorer:
                raise CheckpointError(
                    f"the checkpoint records scorer {checkpoint.scorer!r} but its retrieval "
                    f"spec says {spec.scorer!r}"
                )
        kind = spec.text_kind
        backbone = kind.load_backbone(backbone_loader)
        if kind.uses_vocabulary and checkpoint.vocabulary is None:
            raise CheckpointError(
                f"this checkpoint's {kind.name.upper()} text encoder needs its vocabulary; pass "
                "it to import_official_checkpoint(path, vocabulary=load_vocabulary(...))"
            )
        network = cls(
            spec,
            vocabulary=checkpoint.vocabulary,
            backbone=backbone,
            with_heads="pooled_heads" in checkpoint.extras,
        )
        _load_strict(network.camp, checkpoint.state_dict, "CAMP weights")
        if network.heads is not None:
            _load_strict(network.heads, checkpoint.extras["pooled_heads"], "pooled heads")
        if "fusion" in checkpoint.extras:
            _load_strict(network.fusion, checkpoint.extras["fusion"], "score fusion")
        else:  # no fusion saved: rank by CAMP alone (the official model's behaviour)
            network.fusion.shortlist_weight.data.zero_()
            network.fusion.camp_weight.data.fill_(1.0)
        return network.eval()

    def to(self, *args, **kwargs):  # the MiniLM body lives outside the module tree
        moved = super().to(*args, **kwargs)
        encoder = self.camp.text_encoder
        if isinstance(encoder, MiniLMWordEncoder) and encoder.backbone is not None:
            encoder.backbone.to(*args, **kwargs)
        return moved


def _load_strict(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the checkpoint's {what} do not fit the model: {exc}") from exc


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["NetworkSpec", "RetrievalNetwork", "count_parameters"]

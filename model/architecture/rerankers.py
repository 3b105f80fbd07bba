"""The registry of second-stage scorers (rerankers): a name -> how to build its model and its
per-item precompute, the pattern of the region-extractor registry.

A checkpoint records its scorer's name and options (`CampCheckpoint.scorer`,
`scorer_options`); everything that builds a model from a checkpoint goes through here, so a
new scorer is one `register_reranker` call, not a special case in each caller.

Every registered model has the same surface: `image_encoder` (regions -> [N, R, d]),
`text_encoder` (token ids -> `EncodedText`), `scorer`, `forward(regions, token_ids, lengths,
region_mask) -> [Ni, Nc]`, and `from_config(config, options)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from model.architecture.camp import CampModel
from model.architecture.encoders import ImageEncoder
from model.architecture.fusion import CampLogitScorer
from model.architecture.imram import (
    ImramImageEncoder,
    ImramMiniLMWordEncoder,
    ImramModel,
    ImramOptions,
    ImramScorer,
)
from model.architecture.imram_precompute import (
    ImramCaptionPrecompute,
    ImramImagePrecompute,
    ImramPrecomputedScorer,
)
from model.architecture.precompute import CaptionPrecompute, ImagePrecompute, PrecomputedScorer
from model.checkpoints.checkpoint import IMRAM_MAX_WORDS
from model.checkpoints.config import OFFICIAL_MAX_WORDS, CampConfig, ConfigError

if TYPE_CHECKING:
    from model.architecture.network import NetworkSpec
    from model.text.vocab import Vocabulary

# (word_region [Ni, Nc, L, R], region_weights [Ni, Nc, R], word_weights [Ni, Nc, L])
ExplanationTensors = tuple[Tensor, Tensor, Tensor]


class UnknownReranker(ConfigError):
    """No scorer is registered under this name."""


@dataclass(frozen=True)
class RerankerKind:
    """One registered scorer and everything that follows from choosing it.

    build: (sizes, options) -> the whole model (encoders + scorer), for checkpoints and parity;
    build_for_network: (spec, vocabulary, backbone, sizes) -> the model a `RetrievalNetwork`
    holds (CAMP: the text side named by the spec and a logit-returning scorer);
    precomputed: the scorer module -> its pair scorer over per-item tensors
    (`precompute_images`, `precompute_captions`, `score_pairs`, `score_grid`,
    `score_text_against_images`, `score_image_against_captions`, `bytes_per_pair`);
    image_precompute / caption_precompute: the per-item tensor types (`cat`, `select`,
    `repeat`, `trimmed`, `to`, `bytes_of_one`; fields `regions`/`words` + counts, which the
    stored tensors keep);
    explanation: maps from `score_*_against_*(explain=True)` -> `ExplanationTensors`;
    display_score: pair scores -> the scorer's own score shown in an explanation;
    max_words: the most words of a caption the scorer reads (the tokenizer cuts the rest);
    trainable_parameters: the model -> what the reranker stage trains (default: every
    parameter that requires a gradient; a frozen text encoder's do not);
    zero_output: scorer -> None, makes every pair score exactly 0 with gradients still flowing
    (the residual start: the ranking begins as the shortlist's); None when the scorer has no
    such layer, and the residual start then sets the fusion's scorer weight to 0 instead;
    warm_start: network -> None, starts the scorer from the shortlist heads' linear maps;
    None when the scorer has no such start (a preset asking for one is refused);
    score_scale: network -> the weight its scores get in the loss when it trains alone and the
    unit of the fusion weights tuned on dev: 1 for a scorer that returns logits (CAMP), the
    heads' InfoNCE scale over the number of cosines summed for one that returns a sum of
    cosines (IMRAM), so every scorer trains at the temperature the shortlist learned.
    """

    name: str
    build: Callable[[CampConfig, Mapping[str, Any]], nn.Module]
    build_for_network: Callable[..., nn.Module]
    precomputed: Callable[[nn.Module], Any]
    image_precompute: type
    caption_precompute: type
    explanation: Callable[[Any], ExplanationTensors]
    display_score: Callable[[Tensor], Tensor]
    check_options: Callable[[Mapping[str, Any]], None]
    max_words: int = OFFICIAL_MAX_WORDS
    trainable_parameters: Callable[[nn.Module], list[nn.Parameter]] = lambda model: [
        p for p in model.parameters() if p.requires_grad
    ]
    zero_output: Callable[[nn.Module], None] | None = None
    warm_start: Callable[[Any], None] | None = None
    score_scale: Callable[[Any], float] = lambda network: 1.0

    def build_model(self, config: CampConfig, options: Mapping[str, Any] | None = None):
        return self.build(config, dict(options or {}))


_REGISTRY: dict[str, RerankerKind] = {}


def register_reranker(kind: RerankerKind) -> RerankerKind:
    """Add a scorer; a second registration under one name is a bug and is refused."""
    if kind.name in _REGISTRY:
        raise ValueError(f"a reranker named {kind.name!r} is already registered")
    _REGISTRY[kind.name] = kind
    return kind


def reranker_kind(name: str) -> RerankerKind:
    """The registered scorer `name`; UnknownReranker names the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownReranker(
            f"unknown scorer {name!r}; registered: {registered_rerankers()}"
        ) from None


def registered_rerankers() -> list[str]:
    return sorted(_REGISTRY)


def reranker_of_tensors(images: Any) -> RerankerKind:
    """The scorer whose per-item image (or caption) tensors these are."""
    for kind in _REGISTRY.values():
        if isinstance(images, kind.image_precompute | kind.caption_precompute):
            return kind
    raise TypeError(f"{type(images).__name__} are no registered scorer's per-item tensors")


def bytes_per_pair(images: Any, captions: Any) -> int:
    """Working memory of one pair of these per-item tensors, by the scorer that made them."""
    return reranker_of_tensors(images).precomputed.bytes_per_pair(images, captions)


# -- CAMP ---------------------------------------------------------------------------------------
def _no_options(options: Mapping[str, Any]) -> None:
    if options:
        raise ConfigError(f"the CAMP scorer takes no options, got {sorted(options)}")


def _build_camp(config: CampConfig, options: Mapping[str, Any]) -> CampModel:
    _no_options(options)
    return CampModel.from_config(config)


def _camp_for_network(
    spec: NetworkSpec, vocabulary: Vocabulary | None, backbone: Any, config: CampConfig
) -> CampModel:
    return CampModel(
        image_encoder=ImageEncoder(img_dim=spec.region_dim, embed_size=spec.embed_size),
        text_encoder=spec.text_kind.build(spec, vocabulary, backbone),
        scorer=CampLogitScorer(
            embed_size=spec.embed_size,
            num_heads=spec.num_heads,
            cosine_skip=spec.camp_cosine_skip,
        ),
        config=config,
    )


def _camp_zero_output(scorer: CampLogitScorer) -> None:
    """Score MLP's output layer and the cosine skip to zero: every logit is 0, and the output
    layer still gets gradients (its input, the hidden ReLU layer, is not zero)."""
    with torch.no_grad():
        scorer.score_out.weight.zero_()
        scorer.score_out.bias.zero_()
        if scorer.cosine_scale is not None:
            scorer.cosine_scale.zero_()


# Fusion layers start this much smaller than PyTorch's default (exactly zero would freeze
# them: ReLU has no gradient at 0), so a warm-started CAMP begins near the heads' ranking.
WARM_START_FUSION_SCALE = 0.05


def _camp_warm_start(network: Any) -> None:
    """CAMP's encoders <- the heads' linear maps; fusion small; score = cosine skip only.

    At the start v*, t* are attention-pooled (near-uniform) encoder outputs, so the cosine
    skip reproduces the linear part of the pooled score and training refines it with the
    cross-modal messages instead of learning an image-text alignment from scratch.
    """
    spec, heads, camp = network.spec, network.heads, network.camp
    if heads is None or spec.embed_size != spec.pooled_dim or not spec.camp_cosine_skip:
        raise ValueError(
            "warm start needs shortlist heads, embed_size == pooled_dim and camp_cosine_skip=True"
        )
    if not hasattr(camp.text_encoder, "projection"):
        raise ValueError("warm start is implemented for the minilm text encoder")
    with torch.no_grad():
        camp.image_encoder.fc.load_state_dict(heads.image.linear.state_dict())
        camp.text_encoder.projection.load_state_dict(heads.text.linear.state_dict())
        camp.scorer.image_fusion.weight.mul_(WARM_START_FUSION_SCALE)
        camp.scorer.text_fusion.weight.mul_(WARM_START_FUSION_SCALE)
        camp.scorer.score_out.weight.zero_()
        camp.scorer.score_out.bias.zero_()
        camp.scorer.cosine_scale.fill_(float(heads.logit_scale))


def _camp_explanation(maps: Any) -> ExplanationTensors:
    """CAMP's word->region cross attention and its attention pooling, heads averaged."""
    return maps.attn_t2v, maps.pool_attn_v.float().mean(-2), maps.pool_attn_t.float().mean(-2)


# -- IMRAM --------------------------------------------------------------------------------------
def _build_imram(config: CampConfig, options: Mapping[str, Any]) -> ImramModel:
    return ImramModel.from_config(config, ImramOptions.from_dict(options))


IMRAM_TEXT_ENCODERS = ("gru", "minilm")


def _imram_for_network(
    spec: NetworkSpec, vocabulary: Vocabulary | None, backbone: Any, config: CampConfig
) -> ImramModel:
    """The official model over the GRU (parity, imported checkpoints), or over the shipped
    text side: MiniLM token features projected to d, then IMRAM's per-word l2norm."""
    options = ImramOptions.from_dict(spec.scorer_options)
    if spec.text_encoder == "gru":
        return ImramModel.from_config(config, options)
    if spec.text_encoder != "minilm":
        raise ConfigError(
            f"IMRAM reads l2-normalised words of one of {IMRAM_TEXT_ENCODERS}; text_encoder "
            f"{spec.text_encoder!r} is not supported with it"
        )
    text_encoder = spec.text_kind.build(spec, vocabulary, backbone)
    return ImramModel(
        image_encoder=ImramImageEncoder(img_dim=spec.region_dim, embed_size=spec.embed_size),
        text_encoder=ImramMiniLMWordEncoder(
            embed_size=spec.embed_size,
            hidden_size=text_encoder.hidden_size,
            backbone=text_encoder.backbone,
        ),
        scorer=ImramScorer(embed_size=spec.embed_size, options=options),
        config=config,
    )


def _imram_warm_start(network: Any) -> None:
    """IMRAM's encoders <- the heads' linear maps (its l2norms follow, as the heads' do); the
    memory layers keep their initialisation. Each step's score compares the encoder's
    fragments with the attended context, so at the start it reads the heads' linear space."""
    spec, heads, imram = network.spec, network.heads, network.camp
    if heads is None or spec.embed_size != spec.pooled_dim:
        raise ValueError("warm start needs shortlist heads and embed_size == pooled_dim")
    if not isinstance(imram.text_encoder, ImramMiniLMWordEncoder):
        raise ValueError("warm start is implemented for the minilm text encoder")
    with torch.no_grad():
        imram.image_encoder.fc.load_state_dict(heads.image.linear.state_dict())
        imram.text_encoder.projection.load_state_dict(heads.text.linear.state_dict())


def _imram_score_scale(network: Any) -> float:
    """The heads' InfoNCE scale per summed cosine: IMRAM's score sums K step cosines per
    direction, so scale x score is the mean cosine at the shortlist's temperature."""
    if network.heads is None:
        return 1.0
    options = network.camp.scorer.options
    return float(network.heads.logit_scale.detach()) / (
        options.iteration_steps * len(options.directions)
    )


def _imram_explanation(maps: Any) -> ExplanationTensors:
    return maps.word_region, maps.region_weights, maps.word_weights


def _check_imram_options(options: Mapping[str, Any]) -> None:
    ImramOptions.from_dict(options)


CAMP = register_reranker(
    RerankerKind(
        name="camp",
        build=_build_camp,
        build_for_network=_camp_for_network,
        precomputed=PrecomputedScorer,
        image_precompute=ImagePrecompute,
        caption_precompute=CaptionPrecompute,
        explanation=_camp_explanation,
        display_score=torch.sigmoid,  # the network's CAMP returns logits
        check_options=_no_options,
        zero_output=_camp_zero_output,
        warm_start=_camp_warm_start,
    )
)
IMRAM = register_reranker(
    RerankerKind(
        name="imram",
        build=_build_imram,
        build_for_network=_imram_for_network,
        precomputed=ImramPrecomputedScorer,
        image_precompute=ImramImagePrecompute,
        caption_precompute=ImramCaptionPrecompute,
        explanation=_imram_explanation,
        display_score=lambda scores: scores,  # a sum of cosines, already a similarity
        check_options=_check_imram_options,
        max_words=IMRAM_MAX_WORDS,
        warm_start=_imram_warm_start,
        score_scale=_imram_score_scale,
    )
)

__all__ = [
    "CAMP",
    "IMRAM",
    "ExplanationTensors",
    "RerankerKind",
    "UnknownReranker",
    "bytes_per_pair",
    "register_reranker",
    "registered_rerankers",
    "reranker_kind",
    "reranker_of_tensors",
]

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
from typing import Any

from torch import nn

from model.architecture.camp import CampModel
from model.architecture.imram import ImramModel, ImramOptions
from model.checkpoints.config import CampConfig, ConfigError


class UnknownReranker(KeyError):
    """No scorer is registered under this name."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class RerankerKind:
    """One registered scorer.

    build: (sizes, the checkpoint's scorer options) -> the whole model (encoders + scorer),
    refusing unknown options with ConfigError.
    """

    name: str
    build: Callable[[CampConfig, Mapping[str, Any]], nn.Module]

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


def _build_camp(config: CampConfig, options: Mapping[str, Any]) -> CampModel:
    if options:
        raise ConfigError(f"the CAMP scorer takes no options, got {sorted(options)}")
    return CampModel.from_config(config)


def _build_imram(config: CampConfig, options: Mapping[str, Any]) -> ImramModel:
    return ImramModel.from_config(config, ImramOptions.from_dict(options))


CAMP = register_reranker(RerankerKind(name="camp", build=_build_camp))
IMRAM = register_reranker(RerankerKind(name="imram", build=_build_imram))

__all__ = [
    "CAMP",
    "IMRAM",
    "RerankerKind",
    "UnknownReranker",
    "register_reranker",
    "registered_rerankers",
    "reranker_kind",
]

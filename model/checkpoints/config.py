"""Model sizes as data: one small JSON file per architecture, loaded into `CampConfig`.

`load_config("camp_f30k")` reads `model/configs/camp_f30k.json`; a path to any JSON file works
too. Unknown keys are refused so that a typo in a config file cannot silently fall back to a
default size.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# The official code pads word features to max_length (47) + 3 slots: <start>, <end> and one spare.
OFFICIAL_MAX_WORDS = 47
OFFICIAL_PAD_WIDTH = OFFICIAL_MAX_WORDS + 3


class ConfigError(ValueError):
    """A model configuration is missing, malformed or inconsistent."""


Config = TypeVar("Config")


def config_from_dict(cls: type[Config], data: Mapping[str, Any], *, what: str) -> Config:
    """Build the dataclass `cls` from `data`, refusing keys it does not have, so that a typo in a
    config file or a checkpoint cannot silently fall back to a default. Every model config
    (`CampConfig`, `NetworkSpec`) is read through here."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"invalid {what}: {exc}") from exc


@dataclass(frozen=True)
class CampConfig:
    """Sizes of the CAMP model (docs/ARCHITECTURE.md, The model).

    vocab_size: rows of the word embedding (ids 0-3 are <pad>, <start>, <end>, <unk>).
    word_dim: word embedding width (300 in the paper).
    embed_size: d, the joint feature width of regions and words (1024 in the paper).
    img_dim: width of one region feature from the extractor (2048 for bottom-up attention).
    num_heads: heads of the attention pooling (4 in the paper).
    num_gru_layers: layers of the bidirectional GRU text encoder.
    max_words: tokens kept between <start> and <end>.
    pad_width: word slots of the official padded layout (scores never depend on it).
    """

    vocab_size: int
    word_dim: int = 300
    embed_size: int = 1024
    img_dim: int = 2048
    num_heads: int = 4
    num_gru_layers: int = 1
    max_words: int = OFFICIAL_MAX_WORDS
    pad_width: int = OFFICIAL_PAD_WIDTH
    name: str = ""

    def __post_init__(self) -> None:
        for field in ("vocab_size", "word_dim", "embed_size", "img_dim", "num_heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if self.vocab_size <= 4:
            raise ConfigError(f"vocab_size must exceed the 4 reserved ids, got {self.vocab_size}")
        if self.num_gru_layers < 1:
            raise ConfigError(f"num_gru_layers must be >= 1, got {self.num_gru_layers}")
        if self.pad_width < self.max_words + 2:
            raise ConfigError(
                f"pad_width {self.pad_width} cannot hold max_words {self.max_words} + <start>/<end>"
            )

    @property
    def max_caption_length(self) -> int:
        """Longest token sequence the encoder sees, <start> and <end> included."""
        return self.max_words + 2

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CampConfig:
        return config_from_dict(cls, data, what="model config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> CampConfig:
        return dataclasses.replace(self, **changes)


def available_configs() -> list[str]:
    """Names of the configs that ship with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str | Path) -> CampConfig:
    """Load a config by shipped name (`camp_f30k`) or from a JSON file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ConfigError(
            f"model config {name_or_path!r} not found; shipped configs: {available_configs()}"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    data.setdefault("name", path.stem)
    return CampConfig.from_dict(data)

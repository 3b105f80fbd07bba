"""A zero-shot channel: the frozen ImageNet classifier's predictions, named in MiniLM's space.

The trained model learned from Flickr8K's people and dogs and does not know cups, coins or the
moon; the frozen backbones do. The grid regions an image is stored as are EfficientNet-Lite's
head features (`features()`), and its classifier is `_fc(mean of them)`, so each stored image
has class probabilities p = softmax(_fc(mean of regions) / T) without re-extraction. Its
zero-shot vector is z = normalise(p @ E), with E [1000, 384] the all-MiniLM-L6-v2 sentence
embeddings (mean-pooled tokens, l2-normalised: that model's sentence-transformers convention) of
the class names in a prompt ("a photo of a {name}."). A text's vector u is the same kind of
sentence embedding of itself, from the MiniLM token features the model computes anyway; the
channel's score is zs = u . z, a cosine in MiniLM's sentence space.

Fused into both stages with one weight w (stored in the checkpoint's metadata under
"zero_shot"): the shortlist vector is [pooled, sqrt(w) z] / sqrt(1 + w) for images and
[pooled, sqrt(w) u] / sqrt(1 + w) for texts, so the shortlist's inner product is exactly
(pooled + w zs) / (1 + w), a unit vector's cosine that the FAISS index needs no change for;
the rerank stage undoes the 1/(1 + w) (`RetrievalModel.fuse`), so its score is
a (pooled + w zs) + b camp.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

CLASS_NAMES_FILE = Path(__file__).resolve().parent / "vision" / "imagenet_classes.txt"
METADATA_KEY = "zero_shot"
EXTRAS_KEY = "zero_shot"  # checkpoint extras: {"prompt": str, "class_embeddings": [1000, 384]}
DEFAULT_PROMPT = "a photo of a {}."
FORMAT_VERSION = 1
# Which extractor's features the channel reads: the grid's EfficientNet-Lite head features.
GRID_EXTRACTOR = "grid"


class ZeroShotError(ValueError):
    """The channel cannot be built or read; the message says why."""


def load_class_names(path: Path = CLASS_NAMES_FILE) -> list[str]:
    """The 1000 ImageNet class names in logit order ('#' lines are the file's header)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    names = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if len(names) != 1000:
        raise ZeroShotError(f"{path} holds {len(names)} class names, not 1000")
    return names


def sentence_vectors(features: Tensor, lengths: Tensor) -> Tensor:
    """MiniLM token features [B, L, h] + lengths [B] -> [B, h] unit sentence embeddings (the
    attention-masked mean of the tokens, l2-normalised)."""
    positions = torch.arange(features.shape[1], device=features.device)
    mask = (positions[None, :] < lengths.to(features.device)[:, None]).to(features.dtype)
    mean = (features * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    return F.normalize(mean.float(), dim=-1)


def imagenet_classifier(variant: str) -> tuple[Tensor, Tensor]:
    """The EfficientNet-Lite variant's `_fc` weight [1000, 1280] and bias [1000], from the
    weights the grid extractor uses."""
    from model.vision.efficientnet_lite import pretrained_weights_path

    state = torch.load(pretrained_weights_path(variant), map_location="cpu", weights_only=True)
    return state["_fc.weight"].float(), state["_fc.bias"].float()


def stored_class_embeddings(extras: Mapping[str, Any]) -> dict[str, Tensor]:
    """{prompt: E} from a checkpoint's extras; {} when it stores none."""
    record = extras.get(EXTRAS_KEY)
    if not isinstance(record, Mapping) or "class_embeddings" not in record:
        return {}
    embeddings = torch.as_tensor(record["class_embeddings"]).float()
    if embeddings.ndim != 2 or embeddings.shape[0] != 1000:
        raise ZeroShotError(f"stored class embeddings have shape {tuple(embeddings.shape)}")
    return {str(record["prompt"]): embeddings}


@dataclass(frozen=True)
class ZeroShotSettings:
    """What the checkpoint records: weight w (0: off), temperature T, the prompt."""

    weight: float
    temperature: float
    prompt: str = DEFAULT_PROMPT

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ZeroShotError(f"zero-shot weight must be finite and >= 0, got {self.weight!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ZeroShotError(f"zero-shot temperature must be > 0, got {self.temperature!r}")
        if "{}" not in self.prompt:
            raise ZeroShotError(f"the prompt needs a {{}} for the class name: {self.prompt!r}")

    def to_metadata(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, **asdict(self), **dict(extra or {})}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ZeroShotSettings | None:
        """The checkpoint's settings, or None when it has no channel."""
        record = metadata.get(METADATA_KEY)
        if record is None:
            return None
        if not isinstance(record, Mapping) or record.get("format") != FORMAT_VERSION:
            raise ZeroShotError(f"unreadable zero-shot record in the checkpoint: {record!r}")
        try:
            return cls(
                weight=float(record["weight"]),
                temperature=float(record["temperature"]),
                prompt=str(record.get("prompt", DEFAULT_PROMPT)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ZeroShotError(f"unreadable zero-shot record in the checkpoint: {exc}") from exc


class ZeroShotChannel:
    """Zero-shot vectors of images (from stored grid regions) and texts (from MiniLM tokens)."""

    def __init__(
        self,
        classifier_weight: Tensor,
        classifier_bias: Tensor,
        class_embeddings: Tensor,
        settings: ZeroShotSettings,
    ) -> None:
        self.classifier_weight = classifier_weight.float()
        self.classifier_bias = classifier_bias.float()
        self.class_embeddings = F.normalize(class_embeddings.float(), dim=-1)
        self.settings = settings

    @property
    def dim(self) -> int:
        return int(self.class_embeddings.shape[1])

    @property
    def weight(self) -> float:
        return self.settings.weight

    def to(self, device: torch.device) -> ZeroShotChannel:
        self.classifier_weight = self.classifier_weight.to(device)
        self.classifier_bias = self.classifier_bias.to(device)
        self.class_embeddings = self.class_embeddings.to(device)
        return self

    def class_probabilities(self, regions: Tensor, region_counts: Tensor | None = None) -> Tensor:
        """[B, R, 1280] grid regions -> [B, 1000] softmax(_fc(mean of real regions) / T)."""
        regions = regions.float()
        if region_counts is None:
            mean = regions.mean(1)
        else:
            keep = torch.arange(regions.shape[1], device=regions.device)[None, :]
            keep = (keep < region_counts[:, None]).to(regions.dtype).unsqueeze(-1)
            mean = (regions * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        logits = F.linear(mean, self.classifier_weight, self.classifier_bias)
        return torch.softmax(logits / self.settings.temperature, dim=-1)

    def image_vectors(self, regions: Tensor, region_counts: Tensor | None = None) -> Tensor:
        """[B, R, 1280] -> [B, 384] unit zero-shot vectors z = normalise(p @ E)."""
        return F.normalize(self.class_probabilities(regions, region_counts) @ self.class_embeddings)

    def augment(self, pooled: Tensor, zero_shot: Tensor) -> Tensor:
        """[B, e] unit pooled + [B, 384] unit zero-shot -> [B, e + 384] unit shortlist vectors
        [pooled, sqrt(w) z] / sqrt(1 + w): two of them give (pooled . pooled' + w z . z')/(1+w)."""
        w = self.settings.weight
        joined = torch.cat((pooled.float(), math.sqrt(w) * zero_shot.float()), dim=-1)
        return joined / math.sqrt(1.0 + w)

    @property
    def shortlist_scale(self) -> float:
        """What undoes the shortlist's 1/(1 + w): fused = scale * shortlist = pooled + w zs."""
        return 1.0 + self.settings.weight

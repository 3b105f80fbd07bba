"""Evaluation/training data: the precomputed layout (N-row or 5N-row images) and manifests.

Precomputed layout (SCAN/VSE++/CAMP, docs/ARCHITECTURE.md, Data formats): `{split}_ims.npy` [N or
5N, R, D], `{split}_caps.txt` with 5 consecutive captions per image, optional `{split}_ids.txt`. The
official loader accepts only 5N rows (one image row per caption); both load here, and a 5N array
is reduced to its N distinct rows (every 5th). Features with a varying number of regions (a
detector's adaptive boxes) are padded to the most regions R, with the real count of each row in
`{split}_region_counts.npy` [N or 5N] (the padding is masked wherever the regions are used).
A manifest (`manifest.jsonl`) is turned into that layout once with the model's region extractor
and cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.types import region_counts_problem

CAPTIONS_PER_IMAGE = 5


class DataError(ValueError):
    """A split cannot be loaded; the message names the file and what is wrong."""


@dataclass
class RetrievalSplit:
    """N images (region features, memory-mapped) and their 5N captions, caption j of image j//5."""

    name: str
    images: np.ndarray  # [N, R, D] float16/32 (possibly a read-only memmap)
    captions: list[str]
    image_ids: list[str]
    # [N] int64 real regions of each image when `images` is padded to R; None: all R are real
    region_counts: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.captions) != CAPTIONS_PER_IMAGE * len(self.images):
            raise DataError(
                f"split {self.name}: {len(self.images)} images need "
                f"{CAPTIONS_PER_IMAGE * len(self.images)} captions, found {len(self.captions)}"
            )
        if self.region_counts is not None:
            counts = np.asarray(self.region_counts)
            if counts.shape != (len(self.images),):
                raise DataError(
                    f"split {self.name}: {len(self.images)} images need as many region counts, "
                    f"got shape {counts.shape}"
                )
            problem = region_counts_problem(counts, self.images.shape[1])
            if problem:
                raise DataError(f"split {self.name}: {problem}")

    @property
    def num_images(self) -> int:
        return len(self.images)

    def caption_image(self) -> np.ndarray:
        """[5N] index of each caption's image."""
        return np.arange(len(self.captions)) // CAPTIONS_PER_IMAGE

    def subset(self, image_indices: np.ndarray | slice) -> RetrievalSplit:
        """Images (and their 5 captions each) at `image_indices`, in that order."""
        picked = np.arange(self.num_images)[image_indices]
        caps = [self.captions[CAPTIONS_PER_IMAGE * i + k] for i in picked for k in range(5)]
        return RetrievalSplit(
            name=self.name,
            images=np.asarray(self.images[picked]),
            captions=caps,
            image_ids=[self.image_ids[i] for i in picked],
            region_counts=None if self.region_counts is None else self.region_counts[picked],
        )

    def region_counts_of(self, image_indices: np.ndarray | slice) -> np.ndarray | None:
        """Real regions of these images [n], or None when no image is padded."""
        return None if self.region_counts is None else self.region_counts[image_indices]


def read_lines(path: Path) -> list[str]:
    return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]


def load_precomputed(data_dir: str | Path, split: str) -> RetrievalSplit:
    """Load `{split}_ims.npy` (N or 5N rows) and `{split}_caps.txt` from `data_dir`."""
    data_dir = Path(data_dir)
    ims_path, caps_path = data_dir / f"{split}_ims.npy", data_dir / f"{split}_caps.txt"
    for path in (ims_path, caps_path):
        if not path.exists():
            raise DataError(
                f"{path} not found: a precomputed split needs {split}_ims.npy and "
                f"{split}_caps.txt (make them with `camp-search extract`)"
            )
    images = np.load(ims_path, mmap_mode="r")
    captions = read_lines(caps_path)
    if len(captions) % CAPTIONS_PER_IMAGE:
        raise DataError(f"{caps_path} has {len(captions)} lines, not a multiple of 5")
    num_images = len(captions) // CAPTIONS_PER_IMAGE
    if images.ndim != 3:
        raise DataError(f"{ims_path} must be [N, R, D], got shape {images.shape}")
    counts = _region_counts(data_dir / f"{split}_region_counts.npy", images)
    if len(images) == CAPTIONS_PER_IMAGE * num_images and num_images > 0:
        images = images[::CAPTIONS_PER_IMAGE]  # 5N layout: one row per caption
        counts = None if counts is None else counts[::CAPTIONS_PER_IMAGE]
    elif len(images) != num_images:
        raise DataError(
            f"{ims_path} has {len(images)} rows; {caps_path} needs {num_images} (N) or "
            f"{CAPTIONS_PER_IMAGE * num_images} (5N)"
        )
    ids_path = data_dir / f"{split}_ids.txt"
    ids = read_lines(ids_path) if ids_path.exists() else [str(i) for i in range(num_images)]
    if len(ids) == CAPTIONS_PER_IMAGE * num_images:
        ids = ids[::CAPTIONS_PER_IMAGE]
    if len(ids) != num_images:
        raise DataError(f"{ids_path} has {len(ids)} lines for {num_images} images")
    return RetrievalSplit(
        name=split, images=images, captions=captions, image_ids=ids, region_counts=counts
    )


def _region_counts(path: Path, images: np.ndarray) -> np.ndarray | None:
    """`{split}_region_counts.npy`: one integer per row of `{split}_ims.npy`, each in [1, R]; None
    when the file is absent (every row has all R regions)."""
    if not path.exists():
        return None
    try:
        counts = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable .npy array: {exc}") from exc
    if counts.ndim != 1 or len(counts) != len(images):
        raise DataError(
            f"{path} must hold one region count per row of the features ({len(images)}), got "
            f"shape {counts.shape}"
        )
    problem = region_counts_problem(counts, images.shape[1])
    if problem:
        raise DataError(f"{path}: {problem}")
    return counts.astype(np.int64)


def manifest_cache_dir(manifest: Path, extractor_name: str, extractor_config: dict) -> Path:
    """Where a manifest's extracted features are cached: next to it, keyed by the extractor."""
    suffix = "-".join(f"{k}={v}" for k, v in sorted(extractor_config.items()))
    return manifest.parent / ".camp-cache" / f"{extractor_name}{'-' + suffix if suffix else ''}"


def load_split(
    source: str | Path,
    split: str,
    *,
    extractor_name: str = "grid",
    extractor_config: dict | None = None,
    cache_dir: Path | None = None,
) -> RetrievalSplit:
    """A precomputed folder, or a manifest.jsonl whose features are extracted once and cached.

    The extractor must be the one the model was trained on (RetrievalModel.extractor_name /
    extractor_config); the cache folder is keyed by it.
    """
    source = Path(source)
    if source.is_dir():
        return load_precomputed(source, split)
    if not source.exists():
        raise DataError(f"{source} does not exist")
    config = dict(extractor_config or {})
    out_dir = cache_dir or manifest_cache_dir(source, extractor_name, config)
    if not (out_dir / f"{split}_ims.npy").exists():
        from model.vision.extract import extract_dataset
        from model.vision.extractors import create_extractor

        extract_dataset(source, out_dir, create_extractor(extractor_name, config))
    return load_precomputed(out_dir, split)

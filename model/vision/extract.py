"""Extract region features for a manifest or a folder of images into the precomputed layout.

Output, per split (docs/ARCHITECTURE.md, Data formats), in `out_dir`:
    {split}_ims.npy    float16/float32 [N, R, D]  region features, one row per kept image
    {split}_boxes.npy  float32 [N, R, 4]          normalised (x0, y0, x1, y1) boxes
    {split}_region_counts.npy  int32 [N]          real regions of each image: the first
                                                  count rows are real, the rest zero padding
    {split}_ids.txt    N lines                    image ids
    {split}_caps.txt   5N lines                   5 consecutive captions per image (manifests
                                                  only: a folder has no captions, no file)
    meta.json          extractor name/version, dtype, counts, refused count per split
    refused.jsonl      one {"image", "id", "split", "code", "reason"} per refused image

Work is done in shards (`shard_size` images of one split) written atomically under
`out_dir/.shards/<run fingerprint>/`; a rerun with the same inputs and settings reuses every
finished shard, then the final files are assembled and the shards removed. Images the
decoder refuses are skipped, listed in refused.jsonl, and their captions dropped with them.

Extractors with adaptive box counts (detectron2 with min_boxes < max_boxes) give images
different numbers of regions: a split's R is the most any of its images got, and
`{split}_region_counts.npy` says how many rows of each image are real (a region mask). With a
fixed count every entry is R.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from model.files import READABLE_FILE_MODE, write_atomically
from model.vision.extractors.base import RegionExtractor
from model.vision.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageInputError, decode_image

CAPTIONS_PER_IMAGE = 5
DEFAULT_SHARD_SIZE = 512
FOLDER_SPLIT = "images"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
OUTPUT_DTYPES = ("float16", "float32")
META_FILE = "meta.json"
REFUSED_FILE = "refused.jsonl"
SHARDS_DIR = ".shards"
SHARD_ARRAYS = ("features", "boxes", "counts", "ids", "refused")
LAYOUT_VERSION = 2  # 2: region counts (adaptive box counts, padded)
REGION_COUNT_DTYPE = np.int32


Entry = TypeVar("Entry")


class ExtractInputError(ValueError):
    """The manifest or folder cannot be used (missing, malformed, empty)."""


@dataclass(frozen=True)
class ImageRecord:
    """One image to extract. `captions` is empty for folder inputs."""

    path: Path
    id: str
    split: str
    captions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Refusal:
    """A file that was not taken, and why: `code` is the decoder's (extract), `status` the
    HTTP status or its local equivalent (ingest; 0: the file could not be read). `id` and
    `split` are a manifest's, when it gives them."""

    image: str
    reason: str
    code: str = ""
    status: int = 0
    id: str = ""
    split: str = ""

    def extract_line(self) -> dict[str, str]:
        """The record of refused.jsonl."""
        return {
            "image": self.image,
            "id": self.id,
            "split": self.split,
            "code": self.code,
            "reason": self.reason,
        }


@dataclass
class ExtractSummary:
    """What a run produced: kept images per split, refusals, and how much work was reused."""

    out_dir: Path
    images: dict[str, int] = field(default_factory=dict)
    regions: dict[str, int] = field(default_factory=dict)  # per split: R, the padded width
    refused: list[Refusal] = field(default_factory=list)
    shards_total: int = 0
    shards_reused: int = 0
    seconds: float = 0.0
    has_captions: bool = True


# --- inputs ---------------------------------------------------------------------------------


def read_manifest_lines(
    path: Path,
    entry: Callable[[int, Any], Entry],
    problem: Callable[[int, Exception], Exception],
) -> list[Entry]:
    """Every non-blank line of a JSON-lines manifest, as `entry(line number, parsed JSON)` makes
    it (image paths are relative to the manifest's folder). A line that is not JSON, or that
    `entry` cannot read (a missing key, a wrong type), raises `problem(line number, error)`."""
    entries: list[Entry] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entries.append(entry(number, json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise problem(number, error) from error
    return entries


def read_manifest(path: Path) -> list[ImageRecord]:
    """Records of a JSON-lines manifest ({"image", "id", "split", "captions"} per line)."""
    seen: set[tuple[str, str]] = set()

    def record(number: int, entry: Any) -> ImageRecord:
        image, image_id, split = entry["image"], str(entry["id"]), str(entry["split"])
        captions = tuple(str(c) for c in entry.get("captions", ()))
        if not SPLIT_NAME.match(split):
            raise ExtractInputError(
                f"{path}:{number}: split {split!r} is not a file-name-safe name"
            )
        if (split, image_id) in seen:
            raise ExtractInputError(f"{path}:{number}: id {image_id!r} repeats in split {split!r}")
        seen.add((split, image_id))
        return ImageRecord(path.parent / image, image_id, split, captions)

    def problem(number: int, error: Exception) -> ExtractInputError:
        return ExtractInputError(
            f"{path}:{number}: expected a JSON object with image, id, split and captions ({error})"
        )

    records = read_manifest_lines(path, record, problem)
    if not records:
        raise ExtractInputError(f"{path} lists no images")
    return records


def list_image_folder(folder: Path, split: str = FOLDER_SPLIT) -> list[ImageRecord]:
    """Every non-hidden file with an image suffix under `folder`, sorted; the id is the path
    relative to the folder. The suffix only selects candidates: the decoder decides."""
    paths = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not paths:
        raise ExtractInputError(
            f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return [ImageRecord(p, p.relative_to(folder).as_posix(), split) for p in paths]


def load_inputs(source: Path) -> tuple[list[ImageRecord], bool]:
    """(records, has_captions) from a manifest file or a folder of images."""
    if source.is_dir():
        return list_image_folder(source), False
    if source.is_file():
        return read_manifest(source), True
    raise ExtractInputError(f"{source} is neither a manifest file nor a folder of images")


# --- atomic files (readable by whoever reads the output folder) -----------------------------


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    write_atomically(path, write, mode=READABLE_FILE_MODE)


def _write_text_lines(path: Path, lines: Sequence[str]) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in lines), "utf-8"))


# --- shards ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shard:
    split: str
    index: int
    records: tuple[ImageRecord, ...]

    @property
    def file_name(self) -> str:
        return f"{self.split}-{self.index:05d}.npz"


def _shards(records: Sequence[ImageRecord], shard_size: int) -> Iterator[_Shard]:
    by_split: dict[str, list[ImageRecord]] = {}
    for record in records:
        by_split.setdefault(record.split, []).append(record)
    for split, items in by_split.items():
        for index, start in enumerate(range(0, len(items), shard_size)):
            yield _Shard(split, index, tuple(items[start : start + shard_size]))


def _run_fingerprint(
    records: Sequence[ImageRecord], extractor: RegionExtractor, dtype: str, shard_size: int
) -> str:
    """Changes whenever a shard's content would: inputs, extractor version, dtype, sharding."""
    digest = hashlib.sha256()
    header = [LAYOUT_VERSION, extractor.name, extractor.version, dtype, shard_size]
    digest.update(json.dumps(header).encode())
    for r in records:
        digest.update(json.dumps([str(r.path), r.id, r.split, list(r.captions)]).encode())
    return digest.hexdigest()[:16]


def _refusal(record: ImageRecord, code: str, reason: str) -> Refusal:
    return Refusal(str(record.path), reason, code=code, id=record.id, split=record.split)


def _decode(
    record: ImageRecord,
    has_captions: bool,
    max_bytes: int,
    max_pixels: int,
    reduce_to: tuple[int, int] | None = None,
) -> Any:
    """The decoded PIL image (a large JPEG at reduced size when the extractor allows it:
    `reduce_to`), or a Refusal saying why not."""
    if has_captions and len(record.captions) < CAPTIONS_PER_IMAGE:
        return _refusal(
            record,
            "too_few_captions",
            f"the manifest gives {len(record.captions)} captions; "
            f"the layout needs {CAPTIONS_PER_IMAGE}",
        )
    try:
        size = record.path.stat().st_size
        if size > max_bytes:  # refuse before reading a huge file into memory
            return _refusal(
                record, "image_too_large", f"{size:,} bytes; the limit is {max_bytes:,}"
            )
        data = record.path.read_bytes()
    except OSError as exc:
        return _refusal(record, "unreadable_file", f"cannot read the file: {exc.strerror or exc}")
    try:
        return decode_image(
            data, max_bytes=max_bytes, max_pixels=max_pixels, reduce_to=reduce_to
        ).image
    except ImageInputError as exc:
        return _refusal(record, exc.code, str(exc))


def _extract_shard(
    shard: _Shard,
    extractor: RegionExtractor,
    dtype: str,
    has_captions: bool,
    max_bytes: int,
    max_pixels: int,
    progress: Callable[[int], None] | None,
) -> dict[str, Any]:
    """Decode and extract one shard batch by batch; returns the arrays to store, each image's
    regions padded with zeros to the extractor's `num_regions`."""
    features: list[np.ndarray] = []
    boxes: list[np.ndarray] = []
    counts: list[int] = []
    kept: list[str] = []
    refused: list[Refusal] = []
    for start in range(0, len(shard.records), extractor.batch_size):
        batch = shard.records[start : start + extractor.batch_size]
        images, batch_records = [], []
        for record in batch:
            decoded = _decode(record, has_captions, max_bytes, max_pixels, extractor.decode_size)
            if isinstance(decoded, Refusal):
                refused.append(decoded)
            else:
                images.append(decoded)
                batch_records.append(record)
        if images:
            for record, regions in zip(batch_records, extractor.extract(images), strict=True):
                padded_features, padded_boxes = _padded(regions, extractor.num_regions, dtype)
                features.append(padded_features)
                boxes.append(padded_boxes)
                counts.append(regions.num_regions)
                kept.append(record.id)
        if progress is not None:
            progress(len(batch))
    shape = (0, extractor.num_regions, extractor.feature_dim)
    return {
        "features": np.stack(features) if features else np.zeros(shape, dtype=dtype),
        "boxes": np.stack(boxes) if boxes else np.zeros((*shape[:2], 4), dtype=np.float32),
        "counts": np.asarray(counts, dtype=REGION_COUNT_DTYPE),
        "ids": np.asarray(kept, dtype=str),
        "refused": np.asarray(json.dumps([r.extract_line() for r in refused])),
    }


def _padded(regions: Any, width: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(features [width, D], boxes [width, 4]): the regions, then zero rows."""
    count = regions.num_regions
    if count > width:
        raise ValueError(
            f"the extractor gave {count} regions for one image but says it gives at most {width}"
        )
    features = np.zeros((width, regions.feature_dim), dtype=dtype)
    boxes = np.zeros((width, 4), dtype=np.float32)
    features[:count] = regions.features
    boxes[:count] = regions.boxes
    return features, boxes


def _load_shard(path: Path, shard: _Shard) -> dict[str, Any] | None:
    """A finished shard's arrays, or None when the file is missing or does not match."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in SHARD_ARRAYS}
    except (OSError, ValueError, KeyError):
        return None
    refused_ids = {r["id"] for r in json.loads(str(arrays["refused"]))}
    expected = [r.id for r in shard.records if r.id not in refused_ids]
    if arrays["ids"].tolist() != expected or any(
        len(arrays[key]) != len(expected) for key in ("features", "boxes", "counts")
    ):
        return None
    return arrays


def _save_shard(path: Path, arrays: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.savez(handle, **arrays)

    _atomic_write(path, write)


# --- assembly -------------------------------------------------------------------------------


def _assemble_split(
    split: str,
    shard_paths: Sequence[Path],
    records: Sequence[ImageRecord],
    out_dir: Path,
    extractor: RegionExtractor,
    dtype: str,
    has_captions: bool,
) -> tuple[int, int]:
    """Concatenate a split's shards into the final files (written atomically), padded to the
    most regions any image of the split got; returns (N, that R)."""
    ids: list[str] = []
    counts: list[np.ndarray] = []
    for path in shard_paths:
        with np.load(path, allow_pickle=False) as stored:
            ids.extend(stored["ids"].tolist())
            counts.append(stored["counts"])
    count = len(ids)
    region_counts = np.concatenate(counts).astype(REGION_COUNT_DTYPE)
    regions = int(region_counts.max()) if count else extractor.num_regions
    dim = extractor.feature_dim

    def write_array(name: str, shape: tuple[int, ...], array_dtype: str) -> None:
        def write(tmp: Path) -> None:
            target = np.lib.format.open_memmap(tmp, mode="w+", dtype=array_dtype, shape=shape)
            row = 0
            for path in shard_paths:
                with np.load(path, allow_pickle=False) as stored:
                    block = stored[name][:, :regions]
                target[row : row + len(block)] = block
                row += len(block)
            target.flush()
            del target

        suffix = "ims" if name == "features" else "boxes"
        _atomic_write(out_dir / f"{split}_{suffix}.npy", write)

    write_array("features", (count, regions, dim), dtype)
    write_array("boxes", (count, regions, 4), "float32")
    _atomic_write(out_dir / f"{split}_region_counts.npy", lambda tmp: _save_npy(tmp, region_counts))
    _write_text_lines(out_dir / f"{split}_ids.txt", ids)
    if has_captions:
        by_id = {r.id: r.captions for r in records}
        captions = [c for image_id in ids for c in by_id[image_id][:CAPTIONS_PER_IMAGE]]
        _write_text_lines(out_dir / f"{split}_caps.txt", [c.replace("\n", " ") for c in captions])
    return count, regions


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as handle:
        np.save(handle, array)


def extract_dataset(
    source: Path,
    out_dir: Path,
    extractor: RegionExtractor,
    *,
    dtype: str = "float16",
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> ExtractSummary:
    """Extract every image of `source` (manifest.jsonl or folder) into `out_dir`.

    `on_start(total_images)` is called once before work starts, `progress(n)` after each
    batch (reused shards count at once), for a progress bar. Resumable: rerunning after an
    interrupt redoes only unfinished shards.
    """
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    started = time.perf_counter()
    records, has_captions = load_inputs(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _run_fingerprint(records, extractor, dtype, shard_size)
    shard_dir = out_dir / SHARDS_DIR / fingerprint
    shards = list(_shards(records, shard_size))
    summary = ExtractSummary(out_dir=out_dir, shards_total=len(shards), has_captions=has_captions)
    if on_start is not None:
        on_start(len(records))
    if _finished_run(out_dir, fingerprint, summary):
        if progress is not None:
            progress(len(records))
        return summary

    paths_by_split: dict[str, list[Path]] = {}
    for shard in shards:
        path = shard_dir / shard.file_name
        arrays = _load_shard(path, shard)
        if arrays is None:
            arrays = _extract_shard(
                shard, extractor, dtype, has_captions, max_bytes, max_pixels, progress
            )
            _save_shard(path, arrays)
        else:
            summary.shards_reused += 1
            if progress is not None:
                progress(len(shard.records))
        summary.refused.extend(Refusal(**r) for r in json.loads(str(arrays["refused"])))
        paths_by_split.setdefault(shard.split, []).append(path)

    for split, paths in paths_by_split.items():
        summary.images[split], summary.regions[split] = _assemble_split(
            split, paths, records, out_dir, extractor, dtype, has_captions
        )
    _write_text_lines(
        out_dir / REFUSED_FILE,
        [json.dumps(r.extract_line(), ensure_ascii=False) for r in summary.refused],
    )
    summary.seconds = time.perf_counter() - started
    _write_meta(out_dir, source, extractor, dtype, fingerprint, summary)
    shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)
    return summary


def _finished_run(out_dir: Path, fingerprint: str, summary: ExtractSummary) -> bool:
    """True (and `summary` filled from disk) when `out_dir` already holds this exact run."""
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
        refused_lines = (out_dir / REFUSED_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("fingerprint") != fingerprint:
        return False
    splits = meta["splits"]
    for split in splits:
        names = [f"{split}_{name}" for name in ("ims.npy", "boxes.npy", "region_counts.npy")]
        names.append(f"{split}_ids.txt")
        if summary.has_captions:
            names.append(f"{split}_caps.txt")
        if not all((out_dir / name).is_file() for name in names):
            return False
    summary.images = {split: int(info["images"]) for split, info in splits.items()}
    summary.regions = {split: int(info["regions"]) for split, info in splits.items()}
    summary.refused = [Refusal(**json.loads(line)) for line in refused_lines if line.strip()]
    summary.shards_reused = summary.shards_total
    return True


def _write_meta(
    out_dir: Path,
    source: Path,
    extractor: RegionExtractor,
    dtype: str,
    fingerprint: str,
    summary: ExtractSummary,
) -> None:
    refused_per_split: dict[str, int] = {}
    for r in summary.refused:
        refused_per_split[r.split] = refused_per_split.get(r.split, 0) + 1
    meta = {
        "layout_version": LAYOUT_VERSION,
        "fingerprint": fingerprint,
        "source": str(source),
        "extractor": extractor.name,
        "extractor_version": extractor.version,
        "fit": getattr(extractor, "fit", None),
        "num_regions": extractor.num_regions,
        "feature_dim": extractor.feature_dim,
        "dtype": dtype,
        "captions_per_image": CAPTIONS_PER_IMAGE if summary.has_captions else 0,
        "splits": {
            split: {
                "images": count,
                "regions": summary.regions[split],
                "captions": count * CAPTIONS_PER_IMAGE if summary.has_captions else 0,
                "refused": refused_per_split.get(split, 0),
            }
            for split, count in summary.images.items()
        },
        "seconds": round(summary.seconds, 1),
    }
    _atomic_write(
        out_dir / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n")
    )

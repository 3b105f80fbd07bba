"""The reranker's per-item tensors as stored records: computed once at ingest (or by a rebuild
after a model change), kept in float16 beside the region features, read back by searches.

An image's record is its per-item tensors (`ImagePrecompute` for CAMP, or the type of the
model's scorer, model/architecture/rerankers.py) trimmed to its own regions, plus the geometry
its explanation draws (boxes, image size), so a search needs no region features at all; a
caption's is its per-caption tensors trimmed to its own words. Shapes carry the counts.
Records are plain named numpy arrays (`index.codec`), written through `Corpus` only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TypeVar

import numpy as np
import torch

from model.architecture.precompute import CaptionPrecompute, ImagePrecompute
from model.types import RegionFeatures

# float16 keeps every stored value within 1e-3 of its float32 form relative to its row's scale;
# tests/test_stored_tensors.py shows real shortlists rank the same (scores within 2e-3).
STORED_DTYPE = np.float16
_STORED_MAX = float(np.finfo(STORED_DTYPE).max)
_IMAGE_COUNTS = "region_counts"
_CAPTION_COUNTS = "lengths"
BOXES_KEY = "boxes"
IMAGE_SIZE_KEY = "image_size"

Record = Mapping[str, np.ndarray]
Item = TypeVar("Item")

logger = logging.getLogger(__name__)


class TensorOverflowError(ValueError):
    """A tensor does not fit float16 (|x| > 65504); the item is scored from its features."""


@dataclass(frozen=True)
class ImageTensors:
    """The reranker's precomputed tensors of one image (cached per image id), with the geometry
    of its region record that the explanation draws. Not a second region record: the features
    are left out and the boxes copied, so a cached entry pins neither the stored record nor its
    batch (the search memory budget reckons exactly these bytes)."""

    precompute: ImagePrecompute  # [1]
    boxes: np.ndarray  # [R, 4]
    image_size: tuple[int, int]

    @classmethod
    def of(cls, precompute: ImagePrecompute, regions: RegionFeatures) -> ImageTensors:
        return cls(precompute, np.array(regions.boxes), regions.image_size)


def image_record(tensors: ImageTensors) -> dict[str, np.ndarray]:
    """The stored record of one image's tensors (trimmed to its own regions), float16."""
    precompute = tensors.precompute
    if len(precompute) != 1:
        raise ValueError(f"store one image at a time, got {len(precompute)}")
    own = precompute.trimmed(int(precompute.region_counts[0]))
    record = {name: _half(getattr(own, name)[0]) for name in _stored(type(own), _IMAGE_COUNTS)}
    record[BOXES_KEY] = np.asarray(tensors.boxes, dtype=np.float32)
    record[IMAGE_SIZE_KEY] = np.asarray(tensors.image_size, dtype=np.int32)
    return record


def image_tensors(
    record: Record, device: torch.device, precompute_type: type = ImagePrecompute
) -> ImageTensors:
    """An image's tensors (of `precompute_type`, the model's scorer's) from its stored record,
    float32 on `device`."""
    return image_tensors_many({0: record}, device, precompute_type)[0]


def image_tensors_many(
    records: Mapping[int, Record], device: torch.device, precompute_type: type = ImagePrecompute
) -> dict[int, ImageTensors]:
    """Images' tensors (of `precompute_type`) from their stored records, float32 on `device`,
    in the records' order.

    Records of one region count are decoded together: per tensor one stack of the float16
    views and one conversion, not one per record (100 records: 7 conversions, not 700). Each
    item's tensors are rows of those batches (views: `_compacted` them before caching)."""
    names = _stored(precompute_type, _IMAGE_COUNTS)
    decoded: dict[int, ImageTensors] = {}
    for ids, group in _same_shapes(records, "regions"):
        batch = _stacked(group, names, device)
        counts = torch.full((len(ids),), group[0]["regions"].shape[0], dtype=torch.int64)
        counts = counts.to(device)
        for row, (item_id, record) in enumerate(zip(ids, group, strict=True)):
            precompute = precompute_type(
                region_counts=counts[row : row + 1],
                **{name: tensor[row : row + 1] for name, tensor in batch.items()},
            )
            width, height = (int(v) for v in record[IMAGE_SIZE_KEY])
            decoded[item_id] = ImageTensors(
                precompute, np.array(record[BOXES_KEY]), (width, height)
            )
    return {item_id: decoded[item_id] for item_id in records}


def caption_record(precompute: CaptionPrecompute) -> dict[str, np.ndarray]:
    """The stored record of one caption's tensors (trimmed to its own words), float16."""
    if len(precompute) != 1:
        raise ValueError(f"store one caption at a time, got {len(precompute)}")
    own = precompute.trimmed()
    return {name: _half(getattr(own, name)[0]) for name in _stored(type(own), _CAPTION_COUNTS)}


def caption_tensors(
    record: Record, device: torch.device, precompute_type: type = CaptionPrecompute
) -> CaptionPrecompute:
    """A caption's tensors (of `precompute_type`) from its stored record, float32 on `device`."""
    return caption_tensors_many({0: record}, device, precompute_type)[0]


def caption_tensors_many(
    records: Mapping[int, Record], device: torch.device, precompute_type: type = CaptionPrecompute
) -> dict[int, CaptionPrecompute]:
    """Captions' tensors (of `precompute_type`) from their stored records, float32 on `device`,
    in the records' order: records of one length decoded together, as `image_tensors_many`
    does."""
    names = _stored(precompute_type, _CAPTION_COUNTS)
    decoded: dict[int, CaptionPrecompute] = {}
    for ids, group in _same_shapes(records, "words"):
        batch = _stacked(group, names, device)
        lengths = torch.full((len(ids),), group[0]["words"].shape[0], dtype=torch.int64)
        lengths = lengths.to(device)
        for row, item_id in enumerate(ids):
            decoded[item_id] = precompute_type(
                lengths=lengths[row : row + 1],
                **{name: tensor[row : row + 1] for name, tensor in batch.items()},
            )
    return {item_id: decoded[item_id] for item_id in records}


def _stored(precompute_type: type, counts_field: str) -> tuple[str, ...]:
    """The tensors a record keeps: every field but the counts (the shapes carry those)."""
    return tuple(f.name for f in fields(precompute_type) if f.name != counts_field)


def record_or_none(
    to_record: Callable[[Item], dict[str, np.ndarray]], item: Item, what: str
) -> dict[str, np.ndarray] | None:
    """`to_record(item)`, or None (logged) when its tensors overflow float16: the item is then
    stored without them and scored from its features or text when a search needs it."""
    try:
        return to_record(item)
    except TensorOverflowError:
        logger.warning("the rerank tensors of %s overflow float16; stored without them", what)
        return None


def stored_bytes(record: Record) -> int:
    """Bytes of a record's arrays (the codec adds ~20 bytes a name of header)."""
    return sum(int(np.asarray(value).nbytes) for value in record.values())


def _half(tensor: torch.Tensor) -> np.ndarray:
    array = tensor.detach().float().cpu().numpy()
    if array.size and not np.abs(array).max() <= _STORED_MAX:  # NaN fails too
        raise TensorOverflowError("a rerank tensor overflows float16; it is not stored")
    return array.astype(STORED_DTYPE)


def _same_shapes(records: Mapping[int, Record], key: str) -> list[tuple[list[int], list[Record]]]:
    """(ids, records) groups whose `key` arrays have one shape (one region count, one length)."""
    groups: dict[tuple[int, ...], tuple[list[int], list[Record]]] = {}
    for item_id, record in records.items():
        ids, group = groups.setdefault(tuple(record[key].shape), ([], []))
        ids.append(item_id)
        group.append(record)
    return list(groups.values())


def _stacked(
    group: list[Record], names: tuple[str, ...], device: torch.device
) -> dict[str, torch.Tensor]:
    """{name: float32 [n, ...] on `device`}: the records' float16 arrays stacked (one copy into
    memory this process owns; the records are read-only views), then converted once."""
    return {
        name: torch.from_numpy(np.stack([record[name] for record in group])).to(
            device=device, dtype=torch.float32
        )
        for name in names
    }

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
from torch import Tensor

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
    in the records' order; each item's tensors own their memory (`_decoded`), so a cache may
    keep any of them alone."""
    names = _stored(precompute_type, _IMAGE_COUNTS)
    decoded: dict[int, ImageTensors] = {}
    for ids, group in _same_shapes(records, "regions"):
        counts = _count(group, "regions", device)
        for item_id, record, tensors in zip(
            ids, group, _decoded(group, names, device), strict=True
        ):
            width, height = (int(v) for v in record[IMAGE_SIZE_KEY])
            decoded[item_id] = ImageTensors(
                precompute_type(region_counts=counts, **tensors),
                np.array(record[BOXES_KEY]),
                (width, height),
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
    in the records' order, decoded as `image_tensors_many` decodes images."""
    names = _stored(precompute_type, _CAPTION_COUNTS)
    decoded: dict[int, CaptionPrecompute] = {}
    for ids, group in _same_shapes(records, "words"):
        lengths = _count(group, "words", device)
        for item_id, tensors in zip(ids, _decoded(group, names, device), strict=True):
            decoded[item_id] = precompute_type(lengths=lengths, **tensors)
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


def _decoded(
    group: list[Record], names: tuple[str, ...], device: torch.device
) -> list[dict[str, Tensor]]:
    """Per record of one shape, {name: float32 [1, ...] on `device`}, each tensor owning its
    memory.

    On a CPU each is its record's float16 array widened in one copy (the search's misses go
    to the cache as they are; stacking them into a batch and copying each row out again
    cost two more passes, and large short-lived buffers). On a GPU the records travel as one
    stacked batch per tensor (one host-to-device copy, not one per record), then each row is
    copied out on the device."""
    if device.type == "cpu":
        return [
            {name: torch.tensor(record[name][None], dtype=torch.float32) for name in names}
            for record in group
        ]
    batch = {
        name: torch.from_numpy(np.stack([record[name] for record in group])).to(
            device=device, dtype=torch.float32
        )
        for name in names
    }
    return [
        {name: batch[name][row : row + 1].clone() for name in names} for row in range(len(group))
    ]


def _count(group: list[Record], key: str, device: torch.device) -> Tensor:
    """The region count or length (`key`'s rows) that records of one shape share: one [1]
    int64 tensor on `device` for all of them (never written to)."""
    return torch.tensor([group[0][key].shape[0]], dtype=torch.int64, device=device)

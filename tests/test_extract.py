"""`extract`: real flickr8k photos and a corrupt file in a tmp folder -> the precomputed
layout; refusals; resume after an interrupt; the CLI command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from model.types import RegionFeatures
from model.vision.extract import (
    META_FILE,
    REFUSED_FILE,
    SHARDS_DIR,
    ExtractInputError,
    extract_dataset,
    read_manifest,
)
from model.vision.extractors import RegionExtractor, register_extractor
from model.vision.extractors.grid import GridExtractor
from model.vision.images import decode_image
from service.cli.main import app

ADAPTIVE_DIM = 6
SPLIT_SIZES = {"train": 5, "dev": 3}  # real photos per split; dev also gets a corrupt file
SHARD_SIZE = 2
BATCH_SIZE = 2


@pytest.fixture(scope="module")
def grid() -> GridExtractor:
    return GridExtractor(device="cpu", batch_size=BATCH_SIZE)


@pytest.fixture
def dataset(tmp_path: Path, shared_dir: Path) -> Path:
    """A manifest over copies of real flickr8k photos, plus one truncated JPEG in `dev`."""
    source = shared_dir / "data" / "flickr8k"
    entries = [
        json.loads(line) for line in (source / "manifest.jsonl").read_text().splitlines()[:8]
    ]
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    lines = []
    splits = ["train"] * SPLIT_SIZES["train"] + ["dev"] * SPLIT_SIZES["dev"]
    for entry, split in zip(entries, splits, strict=True):
        shutil.copy(source / entry["image"], root / entry["image"])
        lines.append({**entry, "split": split})
    corrupt = root / "images" / "broken.jpg"
    corrupt.write_bytes((source / entries[0]["image"]).read_bytes()[:3000])
    lines.insert(
        6, {"image": "images/broken.jpg", "id": "broken", "split": "dev", "captions": ["a"] * 5}
    )
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "manifest.jsonl"


def test_manifest_to_precomputed_layout(dataset: Path, tmp_path: Path, grid: GridExtractor) -> None:
    out = tmp_path / "out"
    summary = extract_dataset(dataset, out, grid, dtype="float16", shard_size=SHARD_SIZE)
    assert summary.images == SPLIT_SIZES
    records = read_manifest(dataset)
    for split, count in SPLIT_SIZES.items():
        ims = np.load(out / f"{split}_ims.npy")
        boxes = np.load(out / f"{split}_boxes.npy")
        assert ims.shape == (count, 49, 1280) and ims.dtype == np.float16
        assert boxes.shape == (count, 49, 4) and boxes.dtype == np.float32
        ids = (out / f"{split}_ids.txt").read_text().splitlines()
        kept = [r for r in records if r.split == split and r.id != "broken"]
        assert ids == [r.id for r in kept]
        captions = (out / f"{split}_caps.txt").read_text().splitlines()
        assert captions == [c for r in kept for c in r.captions]  # 5 consecutive per image
        assert len(captions) == 5 * count
    # the stored features are the extractor's own, cast to float16
    first = next(r for r in records if r.split == "dev")
    (direct,) = grid.extract([decode_image(first.path.read_bytes()).image])
    np.testing.assert_array_equal(
        np.load(out / "dev_ims.npy")[0], direct.features.astype(np.float16)
    )
    # the corrupt file is refused, listed with its reason, and its captions are gone
    refused = [json.loads(line) for line in (out / REFUSED_FILE).read_text().splitlines()]
    assert [(r["id"], r["split"], r["code"]) for r in refused] == [
        ("broken", "dev", "corrupt_image")
    ]
    assert "truncated or damaged" in refused[0]["reason"]
    meta = json.loads((out / META_FILE).read_text())
    assert meta["extractor"] == "grid" and meta["extractor_version"] == grid.version
    assert meta["dtype"] == "float16" and meta["fit"] == "squash"
    assert meta["splits"]["dev"] == {"images": 3, "regions": 49, "captions": 15, "refused": 1}
    np.testing.assert_array_equal(np.load(out / "dev_region_counts.npy"), [49, 49, 49])
    assert not (out / SHARDS_DIR).exists()


def test_folder_input_has_no_captions(
    tmp_path: Path, shared_dir: Path, grid: GridExtractor
) -> None:
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    photos = sorted((shared_dir / "data" / "coco-mini" / "images").iterdir())[:2]
    shutil.copy(photos[0], folder / "a.jpg")
    shutil.copy(photos[1], folder / "nested" / "b.jpg")
    (folder / "notes.png").write_text("not an image")
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    summary = extract_dataset(folder, tmp_path / "out", grid, dtype="float32")
    assert summary.images == {"images": 2} and not summary.has_captions
    assert (tmp_path / "out" / "images_ids.txt").read_text().splitlines() == [
        "a.jpg",
        "nested/b.jpg",
    ]
    assert not (tmp_path / "out" / "images_caps.txt").exists()
    assert np.load(tmp_path / "out" / "images_ims.npy").dtype == np.float32
    assert [(r.id, r.code) for r in summary.refused] == [("notes.png", "unsupported_image_format")]


class CountingExtractor:
    """Wraps a real extractor: counts extract calls and can fail on the n-th one."""

    def __init__(self, inner: GridExtractor, fail_on_call: int | None = None) -> None:
        self.inner, self.fail_on_call, self.calls = inner, fail_on_call, 0
        self.extract_original = inner.extract

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt("simulated interrupt")
        return self.extract_original(images)


def test_resume_after_interrupt_redoes_only_unfinished_shards(
    dataset: Path, tmp_path: Path, grid: GridExtractor, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    # shards of 2 images, batches of 2: one extract call per shard of real images.
    # train: 3 shards (2+2+1); dev (4 incl. broken): 2 shards -> 5 shards, 5 calls.
    interrupted = CountingExtractor(grid, fail_on_call=3)
    monkeypatch.setattr(grid, "extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_dataset(dataset, out, grid, shard_size=SHARD_SIZE)
    finished = sorted(p.name for p in (out / SHARDS_DIR).glob("*/*.npz"))
    assert finished == ["train-00000.npz", "train-00001.npz"]
    assert not (out / "train_ims.npy").exists()

    resumed = CountingExtractor(grid)
    monkeypatch.setattr(grid, "extract", resumed)
    summary = extract_dataset(dataset, out, grid, shard_size=SHARD_SIZE)
    assert resumed.calls == 3  # the 2 finished shards were not redone
    assert (summary.shards_total, summary.shards_reused) == (5, 2)

    fresh = tmp_path / "fresh"
    monkeypatch.setattr(grid, "extract", CountingExtractor(grid))
    extract_dataset(dataset, fresh, grid, shard_size=SHARD_SIZE)
    for name in ("train_ims.npy", "dev_ims.npy", "train_boxes.npy"):
        np.testing.assert_array_equal(np.load(out / name), np.load(fresh / name))

    again = CountingExtractor(grid)
    monkeypatch.setattr(grid, "extract", again)
    rerun = extract_dataset(dataset, out, grid, shard_size=SHARD_SIZE)
    assert again.calls == 0 and rerun.images == SPLIT_SIZES  # a finished run is not redone
    assert [r.id for r in rerun.refused] == ["broken"]


def test_changed_settings_do_not_reuse_shards(
    dataset: Path, tmp_path: Path, grid: GridExtractor, monkeypatch
) -> None:
    out = tmp_path / "out"
    extract_dataset(dataset, out, grid, dtype="float16", shard_size=SHARD_SIZE)
    counting = CountingExtractor(grid)
    monkeypatch.setattr(grid, "extract", counting)
    extract_dataset(dataset, out, grid, dtype="float32", shard_size=SHARD_SIZE)
    assert counting.calls == 5
    assert np.load(out / "train_ims.npy").dtype == np.float32


def test_bad_inputs(tmp_path: Path, grid: GridExtractor) -> None:
    with pytest.raises(ExtractInputError, match="neither a manifest"):
        extract_dataset(tmp_path / "missing", tmp_path / "out", grid)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.jpg"}\n')
    with pytest.raises(ExtractInputError, match=r"bad\.jsonl:1"):
        extract_dataset(bad, tmp_path / "out", grid)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExtractInputError, match="holds no image files"):
        extract_dataset(tmp_path / "empty", tmp_path / "out", grid)
    with pytest.raises(ValueError, match="dtype"):
        extract_dataset(tmp_path / "empty", tmp_path / "out", grid, dtype="int8")


def test_cli_extract(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-out"
    result = CliRunner().invoke(
        app,
        [
            "extract",
            str(dataset),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--fit",
            "pad",
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "1 image(s) refused" in result.output and "broken.jpg" in result.output
    assert np.load(out / "train_ims.npy").shape == (5, 49, 1280)
    assert json.loads((out / META_FILE).read_text())["fit"] == "pad"
    bad = CliRunner().invoke(
        app, ["extract", str(dataset), "--out", str(out), "--extractor", "clip"]
    )
    assert bad.exit_code == 2 and "no extractor named 'clip'" in bad.output


def test_cli_extract_with_lite2_at_another_input_size(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "lite2"
    args = ["extract", str(dataset), "--out", str(out), "--device", "cpu", "--variant", "lite2"]
    result = CliRunner().invoke(app, [*args, "--input-size", "96"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert np.load(out / "train_ims.npy").shape == (5, 9, 1280)  # a 3 x 3 grid
    meta = json.loads((out / META_FILE).read_text())
    assert meta["extractor_version"] == "effnet-lite2-imagenet-squash96-v1"
    bad = CliRunner().invoke(app, [*args, "--input-size", "100"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "multiple of 32" in bad.output


@register_extractor("test-adaptive")
class AdaptiveExtractor(RegionExtractor):
    """Stands in for detectron2 with adaptive box counts: each photo gets its own number of
    regions between min_boxes and max_boxes, and features, both read from its pixels (so a
    rerun gives the same), without a detector."""

    CONFIG_KEYS = ("min_boxes", "max_boxes", "batch_size", "device")

    def __init__(
        self, *, min_boxes: int = 10, max_boxes: int = 100, batch_size: int = 2, device="cpu"
    ) -> None:
        super().__init__(batch_size=batch_size, device=device)
        self.min_boxes, self.max_boxes = min_boxes, max_boxes

    @classmethod
    def from_config(cls, config) -> AdaptiveExtractor:
        cls.check_config(config)
        return cls(**dict(config))

    @property
    def version(self) -> str:
        return f"adaptive-{self.min_boxes}-{self.max_boxes}"

    @property
    def feature_dim(self) -> int:
        return ADAPTIVE_DIM

    @property
    def num_regions(self) -> int:
        return self.max_boxes

    def count_for(self, image) -> int:
        brightness = int(np.asarray(image, dtype=np.float32).mean() * 10)
        return self.min_boxes + brightness % (self.max_boxes - self.min_boxes + 1)

    def _extract_batch(self, images) -> list[RegionFeatures]:
        results = []
        for image in images:
            count = self.count_for(image)
            mean = float(np.asarray(image, dtype=np.float32).mean())
            features = mean + np.arange(count * ADAPTIVE_DIM, dtype=np.float32)
            boxes = np.linspace(0, 1, count, dtype=np.float32)[:, None] * [0, 0, 1, 1]
            results.append(
                RegionFeatures(
                    boxes=boxes.astype(np.float32),
                    features=features.reshape(count, ADAPTIVE_DIM) / 100,
                    image_size=image.size,
                    extractor=self.name,
                    extractor_version=self.version,
                )
            )
        return results


def test_adaptive_box_counts_are_padded_to_the_split_and_counted(
    dataset: Path, tmp_path: Path
) -> None:
    extractor = AdaptiveExtractor(min_boxes=10, max_boxes=100)
    out = tmp_path / "out"
    summary = extract_dataset(dataset, out, extractor, dtype="float32", shard_size=SHARD_SIZE)
    records = {r.id: r for r in read_manifest(dataset)}
    meta = json.loads((out / META_FILE).read_text())
    for split in SPLIT_SIZES:
        ids = (out / f"{split}_ids.txt").read_text().splitlines()
        photos = [decode_image(records[i].path.read_bytes()).image for i in ids]
        expected = [extractor.count_for(photo) for photo in photos]
        counts = np.load(out / f"{split}_region_counts.npy")
        ims, boxes = np.load(out / f"{split}_ims.npy"), np.load(out / f"{split}_boxes.npy")
        np.testing.assert_array_equal(counts, expected)
        assert counts.dtype == np.int32
        assert ims.shape == (len(ids), max(expected), ADAPTIVE_DIM)
        assert boxes.shape == (len(ids), max(expected), 4)
        assert summary.regions[split] == meta["splits"][split]["regions"] == max(expected)
        for row, (photo, count) in enumerate(zip(photos, expected, strict=True)):
            (direct,) = extractor.extract([photo])
            np.testing.assert_array_equal(ims[row, :count], direct.features)
            np.testing.assert_array_equal(boxes[row, :count], direct.boxes)
            assert not ims[row, count:].any() and not boxes[row, count:].any()
    assert len(set(np.load(out / "train_region_counts.npy").tolist())) > 1  # really mixed
    # a finished run is recognised, region widths included
    rerun = extract_dataset(dataset, out, extractor, dtype="float32", shard_size=SHARD_SIZE)
    assert rerun.shards_reused == rerun.shards_total and rerun.regions == summary.regions


def test_an_extractor_giving_more_regions_than_it_promised_is_refused(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extractor = AdaptiveExtractor(min_boxes=10, max_boxes=20)
    monkeypatch.setattr(AdaptiveExtractor, "num_regions", property(lambda self: 5))
    with pytest.raises(ValueError, match=r"gave 1[0-9] regions .* at most 5"):
        extract_dataset(dataset, tmp_path / "out", extractor)


def test_cli_extract_with_adaptive_box_counts(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-out"
    arguments = ["extract", str(dataset), "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(
        app,
        [*arguments, "--extractor", "test-adaptive", "--min-boxes", "10", "--max-boxes", "20"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    counts = np.load(out / "train_region_counts.npy")
    assert counts.min() >= 10 and counts.max() <= 20
    assert np.load(out / "train_ims.npy").shape == (5, counts.max(), ADAPTIVE_DIM)
    assert "_region_counts.npy" in result.output
    # a box setting the extractor does not take is refused by name, not ignored
    grid = CliRunner().invoke(app, [*arguments, "--min-boxes", "10"], env={"COLUMNS": "200"})
    assert grid.exit_code == 2
    assert "unknown setting(s) for the 'grid' extractor: min_boxes" in grid.output
    # detectron2's own checks run before anything is built or imported
    files = ["--weights", "w.pth", "--config-file", "c.yaml"]
    boxes = ["--min-boxes", "50", "--max-boxes", "10", "--confidence-threshold", "0.3"]
    detector = CliRunner().invoke(
        app, [*arguments, "--extractor", "detectron2", *files, *boxes], env={"COLUMNS": "200"}
    )
    assert detector.exit_code == 2 and "min_boxes <= max_boxes" in detector.output
    missing = CliRunner().invoke(
        app,
        [*arguments, "--extractor", "detectron2", "--min-boxes", "10", "--max-boxes", "100"],
        env={"COLUMNS": "200", "CAMPSEARCH_DETECTRON2_CONFIG": str(tmp_path / "butd.yaml")},
    )
    assert missing.exit_code == 2
    assert "needs weights;" in missing.output  # the config came from the setting

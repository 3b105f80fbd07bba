"""Loaders: both precomputed layouts (N-row and 5N-row image arrays) and manifests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.eval.data import DataError, load_precomputed, load_split


@pytest.fixture(scope="module")
def fake_split(shared_dir):
    """The official evaluation's fake split: 12 images [36, 64] and 60 captions."""
    payload = torch.load(
        shared_dir / "parity" / "camp_tiny_eval_fake_5N_rows.pt", weights_only=False
    )
    return payload["image_feats"].numpy(), list(payload["captions_txt"])


def _write(folder, images, captions, split="test"):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}_ims.npy", images)
    (folder / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
    return folder


def test_n_row_and_5n_row_layouts_load_the_same(tmp_path, fake_split):
    images, captions = fake_split
    n_rows = load_precomputed(_write(tmp_path / "n", images, captions), "test")
    five_n = load_precomputed(_write(tmp_path / "5n", np.repeat(images, 5, 0), captions), "test")
    for split in (n_rows, five_n):
        assert split.num_images == 12 and len(split.captions) == 60
        np.testing.assert_array_equal(np.asarray(split.images), images)
        assert split.caption_image()[:7].tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert n_rows.captions == five_n.captions == captions
    assert n_rows.image_ids == [str(i) for i in range(12)]


def test_ids_file_is_read_per_image_or_per_caption(tmp_path, fake_split):
    images, captions = fake_split
    folder = _write(tmp_path, images, captions)
    ids = [f"img{i}" for i in range(12)]
    (folder / "test_ids.txt").write_text("\n".join(ids) + "\n")
    assert load_precomputed(folder, "test").image_ids == ids
    (folder / "test_ids.txt").write_text("\n".join(np.repeat(ids, 5)) + "\n")
    assert load_precomputed(folder, "test").image_ids == ids


def test_row_count_that_fits_neither_layout_is_refused(tmp_path, fake_split):
    images, captions = fake_split
    folder = _write(tmp_path, images[:11], captions)
    with pytest.raises(DataError, match=r"11 rows.*12 \(N\) or 60 \(5N\)"):
        load_precomputed(folder, "test")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DataError, match=r"test_ims\.npy not found"):
        load_precomputed(tmp_path, "test")


def test_subset_keeps_captions_with_their_images(tmp_path, fake_split):
    images, captions = fake_split
    split = load_precomputed(_write(tmp_path, images, captions), "test")
    sub = split.subset(np.array([3, 1]))
    assert sub.captions == captions[15:20] + captions[5:10]
    np.testing.assert_array_equal(sub.images, images[[3, 1]])


def test_manifest_is_extracted_once_and_cached(tmp_path, shared_dir):
    """A manifest of real photos becomes the precomputed layout with the model's extractor."""
    source = shared_dir / "data" / "coco-mini" / "manifest.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()[:2]]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        "".join(
            json.dumps(
                {
                    **row,
                    "image": str(source.parent / row["image"]),
                    "split": "val",
                    "captions": row["captions"][:5],
                }
            )
            + "\n"
            for row in rows
        )
    )
    config = {"fit": "squash", "input_size": 64, "device": "cpu"}
    split = load_split(manifest, "val", extractor_name="grid", extractor_config=config)
    assert split.images.shape == (2, 4, 1280) and len(split.captions) == 10
    cached = next(manifest.parent.glob(".camp-cache/grid-*/val_ims.npy"))
    stamp = cached.stat().st_mtime_ns
    again = load_split(manifest, "val", extractor_name="grid", extractor_config=config)
    assert cached.stat().st_mtime_ns == stamp  # read from the cache, not re-extracted
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(split.images))

"""The SQLite catalog: schema version, dedupe, cascading deletes, id allocation, threads."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from index.catalog import MIGRATIONS, CaptionRecord, Catalog, ImageRecord
from index.errors import CatalogSchemaError


def _image(image_id: int, sha: str) -> ImageRecord:
    return ImageRecord(image_id, sha, f"images/{sha}", 640, 480, 1.0)


def test_schema_is_versioned_and_wal(tmp_path):
    catalog = Catalog(tmp_path / "c.db")
    assert catalog.schema_version == len(MIGRATIONS)
    assert catalog._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    catalog.close()
    db = sqlite3.connect(tmp_path / "c.db")
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(CatalogSchemaError, match="upgrade"):
        Catalog(tmp_path / "c.db")


def test_dedupe_by_sha256_and_cascade(tmp_path):
    catalog = Catalog(tmp_path / "c.db")
    image_ids = catalog.allocate_ids("images", 2)
    caption_ids = catalog.allocate_ids("captions", 3)
    catalog.insert(
        [_image(image_ids[0], "aa")],
        [
            CaptionRecord(caption_ids[0], image_ids[0], "a dog", (1, 4, 2), 1.0),
            CaptionRecord(caption_ids[1], image_ids[0], "a cat", (1, 5, 2), 1.0),
            CaptionRecord(caption_ids[2], None, "free text", (1, 6, 2), 1.0),
        ],
    )
    assert catalog.find_image_by_sha256("aa").id == image_ids[0]
    with pytest.raises(sqlite3.IntegrityError):
        catalog.insert([_image(image_ids[1], "aa")])
    assert catalog.count_images() == 1
    assert catalog.get_caption(caption_ids[0]).token_ids == (1, 4, 2)
    sequence = catalog.sequence
    assert catalog.delete_image(image_ids[0]) == caption_ids[:2]
    assert catalog.sequence == sequence + 1
    assert catalog.caption_ids().tolist() == [caption_ids[2]]
    assert catalog.delete_image(image_ids[0]) is None
    assert catalog.delete_caption(caption_ids[2]) and not catalog.delete_caption(caption_ids[2])


def test_ids_are_never_reused(tmp_path):
    catalog = Catalog(tmp_path / "c.db")
    (first,) = catalog.allocate_ids("images", 1)
    catalog.insert([_image(first, "aa")])
    catalog.delete_image(first)
    catalog.close()
    reopened = Catalog(tmp_path / "c.db")
    assert reopened.allocate_ids("images", 2) == [first + 1, first + 2]


def test_concurrent_writers_from_threads(tmp_path):
    catalog = Catalog(tmp_path / "c.db")

    def add(worker: int) -> None:
        for n in range(20):
            (image_id,) = catalog.allocate_ids("images", 1)
            catalog.insert([_image(image_id, f"{worker}-{n}")])

    threads = [threading.Thread(target=add, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert catalog.count_images() == 80
    assert len(catalog.get_images(catalog.image_ids().tolist())) == 80

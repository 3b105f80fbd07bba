"""Copy an embedded data directory (SQLite catalog + LMDB features) into PostgreSQL, so a
corpus can grow to several replicas without re-ingesting (`camp-search migrate --to URL`).

Batches of catalog rows, each with every stored record of its items (all namespaces: region
features, pooled vectors, rerank tensors of any version), go in ONE transaction each, with
``ON CONFLICT DO NOTHING``: a batch is all there or not at all, and a rerun (after a kill, or
to pick up what changed) skips what is there and copies the rest. Ids are preserved (the
shortlist, clients and stored paths keep them) and the id sequences are set past both the
largest id and the embedded counter, so no id is ever handed out twice. Rows copied are
recorded as changes, so replicas already running pick them up. Image files stay where they
are: point every replica's CAMPSEARCH_DATA_DIR at that folder (or copy its ``images/``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import sql

from index.catalog import Catalog
from index.errors import StorageError
from index.feature_store import FeatureStore
from index.namespaces import CAPTION_PREFIXES, IMAGE_PREFIXES
from index.postgres import (
    PostgresCatalog,
    PostgresDatabase,
    insert_catalog_rows,
    record_changes,
    write_features,
)

DEFAULT_BATCH = 500
CATALOG_FILE = "catalog.sqlite3"
STORE_DIR = "features"

Kind = Literal["images", "captions"]


@dataclass
class MigrationReport:
    """What one run copied; `skipped` rows were already in the database."""

    images: int = 0
    captions: int = 0
    features: int = 0
    skipped: int = 0
    total: int = 0


def migrate_data_dir(
    data_dir: Path,
    database_url: str,
    *,
    batch: int = DEFAULT_BATCH,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[Kind, int], None] | None = None,
) -> MigrationReport:
    """Copy `data_dir`'s catalog and features into the database at `database_url`.

    `on_start(total rows)` and `on_batch(kind, rows in the batch)` (called after each commit)
    drive a progress bar. Safe to rerun; the caller must keep writers off `data_dir` (the CLI
    holds its lock)."""
    catalog_path = Path(data_dir) / CATALOG_FILE
    if not catalog_path.is_file():
        raise FileNotFoundError(f"no embedded catalog at {catalog_path}")
    catalog = Catalog(catalog_path)
    store = FeatureStore(Path(data_dir) / STORE_DIR)
    database = PostgresDatabase(database_url)
    report = MigrationReport()
    try:
        image_ids = catalog.image_ids().tolist()
        caption_ids = catalog.caption_ids().tolist()
        report.total = len(image_ids) + len(caption_ids)
        if on_start is not None:
            on_start(report.total)
        namespaces = store.namespaces()
        owned = {
            "images": [ns for ns in namespaces if ns.startswith(IMAGE_PREFIXES)],
            "captions": [ns for ns in namespaces if ns.startswith(CAPTION_PREFIXES)],
        }
        for kind, ids in (("images", image_ids), ("captions", caption_ids)):
            for start in range(0, len(ids), batch):
                chunk = ids[start : start + batch]
                _copy_batch(catalog, store, database, kind, chunk, owned[kind], report)
                if on_batch is not None:
                    on_batch(kind, len(chunk))
        _advance_id_sequences(catalog, database)
    finally:
        database.close()
        store.close()
        catalog.close()
    return report


def _copy_batch(
    catalog: Catalog,
    store: FeatureStore,
    database: PostgresDatabase,
    kind: Kind,
    ids: Sequence[int],
    namespaces: Sequence[str],
    report: MigrationReport,
) -> None:
    """One batch of rows and all their stored records, in one transaction."""
    features = {ns: store.get_many_encoded(ns, ids) for ns in namespaces}
    source = catalog.get_images(ids) if kind == "images" else catalog.get_captions(ids)
    with database.write_transaction() as conn:
        if kind == "images":
            inserted, _ = insert_catalog_rows(conn, list(source.values()), (), skip_present=True)
        else:
            _, inserted = insert_catalog_rows(conn, (), list(source.values()), skip_present=True)
        _refuse_foreign_rows(conn, kind, source, set(inserted))
        write_features(conn, features, replace=False)
        record_changes(conn, [(kind, item_id, "add") for item_id in inserted])
    if kind == "images":
        report.images += len(inserted)
    else:
        report.captions += len(inserted)
    report.skipped += len(ids) - len(inserted)
    report.features += sum(len(items) for items in features.values())


class ForeignRowsError(StorageError):
    """The database holds other items under ids of the data dir (it was not empty)."""


def _refuse_foreign_rows(
    conn: psycopg.Connection, kind: Kind, source: Mapping[int, Any], inserted: set[int]
) -> None:
    """Rows skipped as present must be this data dir's own (copied by an earlier run): an id
    that holds something else means another corpus, and copying on would mix the two."""
    present = [i for i in source if i not in inserted]
    if not present:
        return
    existing = (
        PostgresCatalog.images_in(conn, present)
        if kind == "images"
        else PostgresCatalog.captions_in(conn, present)
    )
    differing = [i for i in present if existing.get(i) != source[i]]
    if differing:
        raise ForeignRowsError(
            f"the database holds other {kind} under ids of this data dir (e.g. {differing[:5]}):"
            " migrate into an empty database (or the one an earlier run of this copy filled)"
        )


def _advance_id_sequences(catalog: Catalog, database: PostgresDatabase) -> None:
    """Set each id sequence past the largest copied id and the embedded counter."""
    next_ids = catalog.next_ids()
    with database.write_transaction() as conn:
        for table, sequence in (("images", "image_ids"), ("captions", "caption_ids")):
            (largest,) = conn.execute(
                sql.SQL("SELECT coalesce(max(id), 0) FROM {}").format(sql.Identifier(table))
            ).fetchone()
            (current, called) = conn.execute(
                sql.SQL("SELECT last_value, is_called FROM {}").format(sql.Identifier(sequence))
            ).fetchone()
            handed_out = current if called else current - 1
            floor = max(int(largest), next_ids.get(table, 1) - 1, int(handed_out))
            if floor > 0:
                conn.execute("SELECT setval(%s, %s, true)", (sequence, floor))

"""The catalog of images and captions: SQLite in WAL mode, the record of what exists.

A committed catalog row is what makes an item exist (see `index.corpus` for the ingest order).
Commits use ``synchronous=FULL`` so an acknowledged write survives power loss.

Ids are allocated from a persistent counter (`allocate_ids`), never reused after a delete, so a
client holding an id never sees it point at a different image, and features written under a
reserved id before a crash can be recognised as orphans and removed.

Schema changes are appended to `MIGRATIONS`; ``PRAGMA user_version`` records how many ran.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from index.errors import CatalogSchemaError, StorageError, StorageFullError

BUSY_TIMEOUT_MS = 10_000
Table = Literal["images", "captions"]

MIGRATIONS: tuple[str, ...] = (
    # 1: images, captions, the id counters and the change sequence.
    """
    CREATE TABLE images (
        id INTEGER PRIMARY KEY,
        sha256 TEXT NOT NULL UNIQUE,
        stored_path TEXT NOT NULL,
        width INTEGER NOT NULL CHECK (width > 0),
        height INTEGER NOT NULL CHECK (height > 0),
        created REAL NOT NULL
    );
    CREATE TABLE captions (
        id INTEGER PRIMARY KEY,
        image_id INTEGER REFERENCES images(id) ON DELETE CASCADE,
        text TEXT NOT NULL,
        token_ids TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE INDEX captions_by_image ON captions(image_id);
    CREATE TABLE id_counters (name TEXT PRIMARY KEY, next_id INTEGER NOT NULL);
    INSERT INTO id_counters VALUES ('images', 1), ('captions', 1);
    CREATE TABLE state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO state VALUES ('sequence', 0);
    """,
)


@dataclass(frozen=True)
class ImageRecord:
    id: int
    sha256: str
    stored_path: str  # relative to the corpus data folder
    width: int
    height: int
    created: float  # unix seconds


@dataclass(frozen=True)
class CaptionRecord:
    id: int
    image_id: int | None  # None: a free-standing caption (searchable text, no image)
    text: str
    token_ids: tuple[int, ...]
    created: float


class Catalog:
    """Thread-safe access to the catalog database (one connection behind a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    # --- schema -----------------------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self._lock:
            version = self.schema_version
            if version > len(MIGRATIONS):
                raise CatalogSchemaError(
                    f"catalog {self.path} has schema version {version}, this camp-search knows "
                    f"up to {len(MIGRATIONS)}: upgrade camp-search"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                # executescript commits first; user_version is set inside the same script.
                self._db.executescript(
                    f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;"
                )

    # --- writes -----------------------------------------------------------------------------

    def allocate_ids(self, table: Table, count: int) -> list[int]:
        """Reserve `count` fresh ids for `table` (committed; never handed out again)."""
        if count <= 0:
            return []
        with self._lock, self._transaction():
            (start,) = self._db.execute(
                "SELECT next_id FROM id_counters WHERE name = ?", (table,)
            ).fetchone()
            self._db.execute(
                "UPDATE id_counters SET next_id = ? WHERE name = ?", (start + count, table)
            )
        return list(range(start, start + count))

    def insert(
        self, images: Sequence[ImageRecord] = (), captions: Sequence[CaptionRecord] = ()
    ) -> None:
        """Insert rows in ONE transaction: when this returns, they exist durably.

        Raises sqlite3.IntegrityError for a duplicate sha256 or a caption of a missing image.
        """
        with self._lock, self._transaction():
            self._db.executemany(
                "INSERT INTO images (id, sha256, stored_path, width, height, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(r.id, r.sha256, r.stored_path, r.width, r.height, r.created) for r in images],
            )
            self._db.executemany(
                "INSERT INTO captions (id, image_id, text, token_ids, created) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (r.id, r.image_id, r.text, json.dumps(list(r.token_ids)), r.created)
                    for r in captions
                ],
            )
            self._bump_sequence()

    def delete_image(self, image_id: int) -> list[int] | None:
        """Delete an image and its captions in one transaction.

        Returns the ids of the captions deleted with it, or None when the image did not exist.
        """
        with self._lock, self._transaction():
            if (
                self._db.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone()
                is None
            ):
                return None
            caption_ids = [
                row[0]
                for row in self._db.execute(
                    "SELECT id FROM captions WHERE image_id = ? ORDER BY id", (image_id,)
                )
            ]
            self._db.execute("DELETE FROM images WHERE id = ?", (image_id,))
            self._bump_sequence()
        return caption_ids

    def delete_caption(self, caption_id: int) -> bool:
        with self._lock, self._transaction():
            deleted = self._db.execute("DELETE FROM captions WHERE id = ?", (caption_id,)).rowcount
            if deleted:
                self._bump_sequence()
        return bool(deleted)

    # --- reads ------------------------------------------------------------------------------

    def get_image(self, image_id: int) -> ImageRecord | None:
        return self.get_images([image_id]).get(int(image_id))

    def get_images(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        """{id: record} for the ids that exist."""
        rows = self._select_in(
            "SELECT id, sha256, stored_path, width, height, created FROM images", ids
        )
        return {row[0]: ImageRecord(*row) for row in rows}

    def find_image_by_sha256(self, sha256: str) -> ImageRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, sha256, stored_path, width, height, created FROM images "
                "WHERE sha256 = ?",
                (sha256,),
            ).fetchone()
        return ImageRecord(*row) if row else None

    def get_caption(self, caption_id: int) -> CaptionRecord | None:
        return self.get_captions([caption_id]).get(int(caption_id))

    def get_captions(self, ids: Iterable[int]) -> dict[int, CaptionRecord]:
        rows = self._select_in("SELECT id, image_id, text, token_ids, created FROM captions", ids)
        return {row[0]: _caption(row) for row in rows}

    def captions_of(self, image_id: int) -> list[CaptionRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, image_id, text, token_ids, created FROM captions "
                "WHERE image_id = ? ORDER BY id",
                (image_id,),
            ).fetchall()
        return [_caption(row) for row in rows]

    def captions_of_images(self, image_ids: Iterable[int]) -> dict[int, list[CaptionRecord]]:
        """{image id: its captions by id} for the images that exist (an image without captions
        maps to []), in one query: what a search needs of all its hits at once."""
        wanted = [int(i) for i in image_ids]
        if not wanted:
            return {}
        with self._lock:
            rows = self._db.execute(
                "SELECT images.id, captions.id, captions.image_id, captions.text, "
                "captions.token_ids, captions.created FROM images "
                "LEFT JOIN captions ON captions.image_id = images.id "
                "WHERE images.id IN (SELECT value FROM json_each(?)) "
                "ORDER BY images.id, captions.id",
                (json.dumps(wanted),),
            ).fetchall()
        return captions_by_image(rows, _caption)

    def image_ids(self) -> np.ndarray:
        """Every image id, sorted, int64."""
        return self._ids("SELECT id FROM images ORDER BY id")

    def caption_ids(self) -> np.ndarray:
        return self._ids("SELECT id FROM captions ORDER BY id")

    def count_images(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def count_captions(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM captions").fetchone()[0])

    def next_ids(self) -> dict[str, int]:
        """{table: the next id its counter hands out} (a copy elsewhere must not reuse ids)."""
        with self._lock:
            rows = self._db.execute("SELECT name, next_id FROM id_counters").fetchall()
        return {name: int(next_id) for name, next_id in rows}

    @property
    def sequence(self) -> int:
        """Bumped by every committed change; a saved index records the value it matches."""
        with self._lock:
            return int(
                self._db.execute("SELECT value FROM state WHERE key = 'sequence'").fetchone()[0]
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- internals --------------------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self.path)

    def _bump_sequence(self) -> None:
        self._db.execute("UPDATE state SET value = value + 1 WHERE key = 'sequence'")

    def _ids(self, query: str) -> np.ndarray:
        with self._lock:
            rows = self._db.execute(query).fetchall()
        return np.asarray([row[0] for row in rows], dtype=np.int64)

    def _select_in(self, query: str, ids: Iterable[int]) -> list[tuple]:
        wanted = [int(i) for i in ids]
        if not wanted:
            return []
        with self._lock:
            # A JSON array as one parameter: no limit on the number of ids, one statement.
            return self._db.execute(
                f"{query} WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(wanted),)
            ).fetchall()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on error); a full disk becomes StorageFullError."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error as error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise _typed(error, self._path) from error
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.OperationalError):
            raise _typed(exc, self._path) from exc


def _typed(error: sqlite3.Error, path: Path) -> StorageError:
    if "full" in str(error).lower():
        return StorageFullError(f"catalog {path}: disk full ({error}); free disk space")
    return StorageError(f"catalog {path}: {error}")


def _caption(row: tuple) -> CaptionRecord:
    caption_id, image_id, text, token_ids, created = row
    return CaptionRecord(caption_id, image_id, text, tuple(json.loads(token_ids)), created)


def captions_by_image(
    rows: Iterable[tuple], caption: Callable[[tuple], CaptionRecord]
) -> dict[int, list[CaptionRecord]]:
    """{image id: its captions} from (image_id, caption columns...) rows of an images LEFT JOIN
    captions (caption columns all NULL for an image without captions), in the rows' order;
    `caption` reads one caption's columns (each database stores token ids its own way)."""
    found: dict[int, list[CaptionRecord]] = {}
    for image_id, *columns in rows:
        captions = found.setdefault(int(image_id), [])
        if columns[0] is not None:
            captions.append(caption(tuple(columns)))
    return found

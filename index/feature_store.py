"""The durable region-feature store: LMDB, one sub-database per namespace, keyed by int64 id.

A namespace names who produced the values, e.g. ``regions:grid:effnet-lite0-v1`` or
``pooled:images:camp-f30k-v3``, so features of two extractor versions never mix and an
upgrade re-extracts into a fresh namespace. Values are `index.codec` records (named numpy
arrays, float16 for region features), the same bytes the Redis cache holds.

Durability: every write is one LMDB transaction committed with LMDB's default full sync, so
after `put_many`/`write` returns the values survive a crash or power loss, and a crash in the
middle leaves none of them. The memory map grows (doubling) when full, up to `max_map_size`;
beyond that, or when the disk is full, writes raise `StorageFullError`.

Layout on disk: ``<path>/data.mdb`` and ``<path>/lock.mdb`` (LMDB's own files). Keys are the
id as 8 bytes big-endian, so iteration is in id order.
"""

from __future__ import annotations

import errno
import logging
import re
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import lmdb
import numpy as np

from index.codec import decode_arrays, encode_arrays
from index.errors import StorageError, StorageFullError

logger = logging.getLogger(__name__)

GIBIBYTE = 1024**3
DEFAULT_MAP_SIZE = 1 * GIBIBYTE  # address space, not disk: the file grows with the data
DEFAULT_MAX_MAP_SIZE = 1024 * GIBIBYTE
MAX_NAMESPACES = 64
NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9_.:@+-]{1,200}$")
_KEY = struct.Struct(">q")

Arrays = Mapping[str, np.ndarray]


def encode_id(item_id: int) -> bytes:
    return _KEY.pack(int(item_id))


def decode_id(key: bytes) -> int:
    return _KEY.unpack(key)[0]


class FeatureStore:
    """Named arrays per (namespace, id), durable, with batched reads and writes.

    Thread-safe. One process may write at a time (LMDB's own lock enforces it across
    processes); readers in other processes are fine.
    """

    def __init__(
        self,
        path: Path,
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        max_map_size: int = DEFAULT_MAX_MAP_SIZE,
        max_namespaces: int = MAX_NAMESPACES,
    ) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_map_size = max_map_size
        try:
            self._env = lmdb.open(
                str(self.path),
                map_size=map_size,
                max_dbs=max_namespaces,
                subdir=True,
                sync=True,
                metasync=True,
                readahead=False,  # random access by id: read-ahead only pollutes the page cache
                meminit=False,
            )
        except lmdb.Error as error:
            raise StorageError(f"cannot open the feature store at {self.path}: {error}") from error
        # LMDB forbids resizing the map while this process has a transaction open: reads share
        # the gate, a resize takes it alone.
        self._gate = threading.Condition(threading.Lock())
        self._active = 0
        self._resizing = False
        self._write_lock = threading.Lock()
        self._databases: dict[str, object] = {}
        self._open_lock = threading.Lock()

    # --- writes -----------------------------------------------------------------------------

    def put_many(self, namespace: str, items: Mapping[int, Arrays]) -> None:
        """Store `items` ({id: {name: array}}) in one durable transaction, replacing old values."""
        self.write({namespace: items})

    def write(
        self,
        puts: Mapping[str, Mapping[int, Arrays]] | None = None,
        deletes: Mapping[str, Iterable[int]] | None = None,
    ) -> None:
        """Apply puts and deletes across namespaces in ONE transaction: all or nothing."""
        encoded = {
            namespace: {int(i): encode_arrays(arrays) for i, arrays in items.items()}
            for namespace, items in (puts or {}).items()
        }
        self.write_encoded(encoded, deletes)

    def write_encoded(
        self,
        puts: Mapping[str, Mapping[int, bytes]] | None = None,
        deletes: Mapping[str, Iterable[int]] | None = None,
    ) -> None:
        """Like `write`, with values already encoded by `index.codec.encode_arrays`."""
        puts = puts or {}
        deletes = {namespace: [int(i) for i in ids] for namespace, ids in (deletes or {}).items()}
        with self._write_lock:
            while True:
                try:
                    put_dbs = {ns: self._database(ns, create=True) for ns in puts}
                    delete_dbs = {ns: self._database(ns, create=False) for ns in deletes}
                    with self._transaction(write=True) as txn:
                        for namespace, items in puts.items():
                            for item_id, value in items.items():
                                txn.put(encode_id(item_id), value, db=put_dbs[namespace])
                        for namespace, ids in deletes.items():
                            if delete_dbs[namespace] is None:
                                continue
                            for item_id in ids:
                                txn.delete(encode_id(item_id), db=delete_dbs[namespace])
                    return
                except lmdb.MapFullError:
                    self._grow()
                except (lmdb.Error, OSError) as error:
                    raise _storage_error(error, self.path) from error

    def delete_many(self, namespace: str, ids: Iterable[int]) -> None:
        """Delete `ids` from `namespace` in one transaction; unknown ids are ignored."""
        self.write(deletes={namespace: ids})

    # --- reads ------------------------------------------------------------------------------

    def get_many(self, namespace: str, ids: Iterable[int]) -> dict[int, dict[str, np.ndarray]]:
        """{id: {name: array}} for the ids present; missing ids are absent from the result."""
        return {
            i: decode_arrays(value) for i, value in self.get_many_encoded(namespace, ids).items()
        }

    def get_many_encoded(self, namespace: str, ids: Iterable[int]) -> dict[int, bytes]:
        """The stored bytes of the ids present, read in one transaction."""
        found: dict[int, bytes] = {}
        db = self._database(namespace, create=False)
        if db is None:
            return {}
        with self._transaction(write=False) as txn:
            for item_id in ids:
                value = txn.get(encode_id(item_id), db=db)
                if value is not None:
                    found[int(item_id)] = bytes(value)
        return found

    def ids(self, namespace: str) -> np.ndarray:
        """Every id stored in `namespace`, sorted, int64."""
        db = self._database(namespace, create=False)
        if db is None:
            return np.empty(0, dtype=np.int64)
        with self._transaction(write=False) as txn:
            keys = [decode_id(key) for key in txn.cursor(db=db).iternext(keys=True, values=False)]
        return np.asarray(keys, dtype=np.int64)

    def count(self, namespace: str) -> int:
        db = self._database(namespace, create=False)
        if db is None:
            return 0
        with self._transaction(write=False) as txn:
            return int(txn.stat(db)["entries"])

    def namespaces(self) -> list[str]:
        """Namespaces that exist in the store (created by a put)."""
        with self._transaction(write=False) as txn:
            names = [key.decode("utf-8") for key in txn.cursor().iternext(keys=True, values=False)]
        return sorted(names)

    def size_bytes(self) -> int:
        """Bytes of the map in use (pages actually written)."""
        info = self._env.info()
        return int(info["last_pgno"] + 1) * int(self._env.stat()["psize"])

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals --------------------------------------------------------------------------

    def _database(self, namespace: str, *, create: bool) -> object | None:
        """The handle of `namespace`'s sub-database; None when absent and not `create`.

        Handles are opened once, in LMDB's own short write transaction, and cached. Callers
        must not hold a write transaction (LMDB allows one writer: it would deadlock).
        """
        if namespace in self._databases:
            return self._databases[namespace]
        if not NAMESPACE_PATTERN.match(namespace):
            raise ValueError(
                f"namespace {namespace!r} must match {NAMESPACE_PATTERN.pattern} "
                "(e.g. 'regions:grid:effnet-lite0-v1')"
            )
        name = namespace.encode("utf-8")
        with self._open_lock:
            if namespace in self._databases:
                return self._databases[namespace]
            if not create:
                with self._transaction(write=False) as txn:
                    if txn.get(name) is None:
                        return None
            with self._gated():
                db = self._env.open_db(name, create=True)
            self._databases[namespace] = db
            return db

    @contextmanager
    def _gated(self) -> Iterator[None]:
        """Hold off a map resize while this block uses the environment."""
        with self._gate:
            while self._resizing:
                self._gate.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._gate:
                self._active -= 1
                self._gate.notify_all()

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[lmdb.Transaction]:
        with self._gated(), self._env.begin(write=write) as txn:
            yield txn

    def _grow(self) -> None:
        current = int(self._env.info()["map_size"])
        if current >= self.max_map_size:
            raise StorageFullError(
                f"feature store {self.path} reached its maximum size of {self.max_map_size} "
                "bytes: raise the limit or move old extractor versions out"
            )
        new_size = min(current * 2, self.max_map_size)
        with self._gate:
            self._resizing = True
            while self._active:
                self._gate.wait()
            try:
                self._env.set_mapsize(new_size)
            finally:
                self._resizing = False
                self._gate.notify_all()
        logger.info("feature store map grown from %d to %d bytes", current, new_size)


def _storage_error(error: Exception, path: Path) -> StorageError:
    """A typed error for an LMDB/OS failure; a full disk becomes StorageFullError."""
    code = getattr(error, "errno", None)
    message = str(error)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in message:
        return StorageFullError(f"no space left on the device holding {path}: free disk space")
    return StorageError(f"feature store {path} failed: {message}")

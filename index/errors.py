"""Typed storage errors. The service maps them to HTTP statuses in one place.

Every error names what failed and what an operator can do about it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from model.files import DiskFullError


class StorageError(Exception):
    """Base class for every failure of the stored side (catalog, feature store, indexes)."""


class StorageFullError(StorageError):
    """The disk (or the feature store's configured maximum size) is full; nothing was written.

    The service answers 507 Insufficient Storage: free disk space or raise the limit.
    """


class CorruptIndexError(StorageError):
    """A saved shortlist index cannot be read back (truncated, bad checksum, wrong format)."""


class IndexMismatchError(StorageError):
    """A saved index does not fit the settings (dimension or factory string changed)."""


class DimensionError(StorageError, ValueError):
    """Vectors of the wrong shape were passed to an index (e.g. 512-d into a 256-d index)."""


class CatalogSchemaError(StorageError):
    """The catalog was written by a newer camp-search (its schema version is unknown here)."""


class InvalidRecordError(StorageError, ValueError):
    """A stored record cannot be encoded or decoded (unsupported dtype, bad header)."""


class DatabaseUnavailableError(StorageError):
    """The database a call needs cannot be reached (the primary is down or restarting).

    Nothing was written. The service answers 503 with Retry-After `retry_after_s`: the client
    retries once the operator (or the orchestrator) has the primary back.
    """

    def __init__(self, message: str, *, retry_after_s: int = 2) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotFoundError(StorageError, KeyError):
    """An id that the caller expected to exist does not (e.g. a caption for a missing image)."""


@contextmanager
def full_disk_as_storage_full() -> Iterator[None]:
    """A full disk met while writing a file (`model.files.DiskFullError`) is a StorageFullError
    of the stored side, like a full catalog or feature store."""
    try:
        yield
    except DiskFullError as error:
        raise StorageFullError(str(error)) from error

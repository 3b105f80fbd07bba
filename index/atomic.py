"""Atomic, durable file replacement: write a temp file in the same folder, fsync, rename, fsync
the folder. A reader (or a restart after a crash) sees either the old file or the new one,
never a torn mixture.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from index.errors import StorageFullError

TEMP_SUFFIX = ".tmp"


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable (POSIX needs the folder fsynced)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, chunks: Iterable[bytes | memoryview]) -> None:
    """Replace `path` with the concatenated `chunks`, atomically and durably.

    Raises StorageFullError when the disk is full (the old file, if any, is left intact).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
        fsync_directory(path.parent)
    except OSError as error:
        Path(temp_name).unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFullError(f"no space left to write {path}: free disk space") from error
        raise
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise

"""Files replaced whole or not at all: write a temp file in the same folder, fsync it, rename it
over the target, fsync the folder. A reader, or a restart after a crash, sees the old file or
the new one, never a torn mixture. Stored photos, shortlist indexes, checkpoints, extracted
features and token caches are all written through `write_atomically`.

Standard library only: the storage layer (`index`) imports this module as it imports the region
record (`model.types`), and nothing else of `model` (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

TEMP_SUFFIX = ".tmp"
READABLE_FILE_MODE = 0o644  # what a shared output folder needs; a temp file starts at 0600


class DiskFullError(OSError):
    """No space (or quota) was left to write a file; the old file, if any, is intact."""


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable (POSIX needs the folder fsynced)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[Path], None], *, mode: int | None = None) -> Path:
    """Replace `path` with what `write` puts into the temp path it is given, atomically and
    durably; `mode`: the file's permission bits (None keeps the temp file's 0600).

    `write` may open the temp path as it likes (a stream, a memory map). Raises DiskFullError
    when the disk is full; the temp file never outlives a failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    temp = Path(temp_name)
    try:
        write(temp)
        with temp.open("rb+") as handle:
            os.fsync(handle.fileno())
        if mode is not None:
            temp.chmod(mode)
        os.replace(temp, path)
        fsync_directory(path.parent)
    except OSError as error:
        temp.unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left to write {path}: free disk space") from error
        raise
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomically(path: Path, chunks: Iterable[bytes | memoryview]) -> Path:
    """`write_atomically` of the concatenated `chunks` (no copy of them is joined in memory)."""

    def write(temp: Path) -> None:
        with temp.open("wb") as handle:
            for chunk in chunks:
                handle.write(chunk)

    return write_atomically(path, write)

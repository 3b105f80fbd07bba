"""`camp-search migrate --to postgresql://...`: copy an embedded data directory into PostgreSQL
(see `index.migrate`), with a progress bar. Idempotent and resumable: rerun it after an
interrupt and it finishes; nothing is copied twice."""

from __future__ import annotations

from pathlib import Path

from index.errors import StorageError
from index.migrate import DEFAULT_BATCH, ForeignRowsError, migrate_data_dir
from index.postgres import redacted_url
from service.cli.output import console, fail, load_settings, progress_bar
from service.runtime.lifecycle import DataDirBusyError, DataDirLock


def run_migrate(to: str, data_dir: Path | None, batch: int = DEFAULT_BATCH) -> None:
    """Copy `data_dir` (default CAMPSEARCH_DATA_DIR) into the database at `to`."""
    if not to.startswith(("postgresql://", "postgres://")):
        fail(f"--to must be a postgresql:// URL, got {redacted_url(to)!r}")
    source = data_dir if data_dir is not None else load_settings().data_dir
    try:
        lock = DataDirLock(source).acquire()  # no server may write while it is copied
    except DataDirBusyError as error:
        fail(error)
    try:
        with progress_bar() as progress:
            task = progress.add_task(f"copying {source} to {redacted_url(to)}", total=None)
            report = migrate_data_dir(
                source,
                to,
                batch=batch,
                on_start=lambda total: progress.update(task, total=total),
                on_batch=lambda _kind, rows: progress.advance(task, rows),
            )
    except (ForeignRowsError, FileNotFoundError) as error:
        fail(error)
    except StorageError as error:
        fail(f"{error} (rerun the same command to resume)")
    finally:
        lock.release()
    console.print(
        f"copied {report.images} images and {report.captions} captions with "
        f"{report.features} stored records ({report.skipped} rows were already there); "
        f"serve with CAMPSEARCH_DATABASE_URL and CAMPSEARCH_DATA_DIR={source} "
        "(the images folder every replica mounts)"
    )

"""`camp-search ingest` and `demo`: bulk ingest, locally or into a running server."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import typer
from rich.table import Table

from service.cli.bulk_ingest import (
    DEFAULT_JOBS,
    HttpTarget,
    IngestAbortedError,
    IngestItem,
    IngestReport,
    IngestSourceError,
    LocalTarget,
    Outcome,
    ingest,
    read_source,
    write_refusals,
)
from service.cli.output import console, fail, load_settings, progress_bar

API_KEY_ENV = "CAMPSEARCH_API_KEY"  # the client-side key for --server (never logged)
MAX_REFUSALS_SHOWN = 20


def run_ingest(
    source: Path | None,
    items: Sequence[IngestItem] | None,
    *,
    server: str | None,
    jobs: int = DEFAULT_JOBS,
    max_captions: int | None = None,
    refused_out: Path | None = None,
) -> IngestReport:
    """Ingest `source` (or ready `items`) locally or into `server`; prints a progress bar and
    a summary; exits 1 when a file was refused, 2 when the run could not proceed."""
    if items is None:
        assert source is not None
        try:
            items = read_source(source, max_captions=max_captions)
        except IngestSourceError as error:
            fail(error)
    try:
        report = asyncio.run(_run(list(items), server=server, jobs=jobs))
    except IngestAbortedError as error:
        console.print(f"[red]stopped:[/red] {error}")
        console.print("rerun the same command to resume: stored photos are skipped")
        raise typer.Exit(2) from error
    except KeyboardInterrupt:
        console.print("interrupted: rerun the same command to resume (stored photos are skipped)")
        raise typer.Exit(130) from None
    _print_report(report, refused_out)
    if report.refused:
        raise typer.Exit(1)
    return report


def run_demo(server: str | None) -> IngestReport:
    """Ingest the demo corpus (exits 2 when its photos are not installed)."""
    from service.cli.demo import DemoUnavailableError, demo_items

    try:
        items = demo_items()
    except DemoUnavailableError as error:
        fail(error)
    return run_ingest(None, items, server=server)


def summary_line(report: IngestReport) -> str:
    """One line: what was added, what was there (and what captions it gained), what not."""
    existing = f"{report.existing} already stored"
    if report.captions_added:
        existing += (
            f" ({plural(report.captions_added, 'caption')} added to "
            f"{plural(report.photos_captioned, 'stored photo')})"
        )
    return (
        f"{report.added} added, {existing}, {len(report.refused)} refused in {report.seconds:.1f} s"
    )


def plural(count: int, noun: str) -> str:
    """`1 caption`, `2 captions`."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


async def _run(items: list[IngestItem], *, server: str | None, jobs: int) -> IngestReport:
    counts: dict[Outcome, int] = {"added": 0, "existing": 0, "refused": 0}
    with progress_bar() as bar:
        task = bar.add_task("ingesting", total=len(items))

        def on_done(_item: IngestItem, outcome: Outcome) -> None:
            counts[outcome] += 1
            description = ", ".join(f"{n} {name}" for name, n in counts.items())
            bar.update(task, advance=1, description=description)

        if server:
            target = await HttpTarget(server, api_key=os.environ.get(API_KEY_ENV)).open()
            try:
                return await ingest(items, target, jobs=jobs, on_done=on_done)
            finally:
                await target.close()
        return await _run_locally(items, jobs, on_done)


async def _run_locally(items: list[IngestItem], jobs: int, on_done) -> IngestReport:
    from service.runtime.lifecycle import DataDirBusyError, ServiceRuntime
    from service.runtime.metrics import ServiceMetrics

    settings = load_settings()
    try:
        runtime = await asyncio.to_thread(ServiceRuntime.build, settings, ServiceMetrics())
    except DataDirBusyError as error:
        raise IngestAbortedError(str(error)) from error
    console.print(
        f"ingesting into {settings.data_dir} (model {runtime.model.version}, "
        f"extractor {runtime.extractor.version} on {runtime.extractor.device})"
    )
    try:
        return await ingest(items, LocalTarget(runtime), jobs=jobs, on_done=on_done)
    finally:
        await runtime.stop_batchers()
        await asyncio.to_thread(runtime.close)


def _print_report(report: IngestReport, refused_out: Path | None) -> None:
    console.print(summary_line(report))
    if not report.refused:
        return
    table = Table("file", "status", "reason", title=f"{len(report.refused)} file(s) refused")
    for refusal in report.refused[:MAX_REFUSALS_SHOWN]:
        table.add_row(refusal.image, str(refusal.status), refusal.reason)
    console.print(table)
    if len(report.refused) > MAX_REFUSALS_SHOWN:
        console.print(f"... and {len(report.refused) - MAX_REFUSALS_SHOWN} more")
    if refused_out is not None:
        write_refusals(report, refused_out)
        console.print(f"refused files listed in {refused_out}")

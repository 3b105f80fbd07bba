"""What `camp-search serve`, `ingest` and `demo` do (service/cli.py only declares them)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from service.ingest import (
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
from service.settings import Settings

API_KEY_ENV = "CAMPSEARCH_API_KEY"  # the client-side key for --server (never logged)
MAX_REFUSALS_SHOWN = 20
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

console = Console(stderr=True)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment with command-line overrides; exits 2 when invalid."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as error:
        for problem in error.errors():
            console.print(f"[red]invalid setting:[/red] {problem['msg']}")
        raise typer.Exit(2) from None


def serve(host: str | None, port: int | None, log_level: str) -> None:
    """Run the API and the web UI with uvicorn (one process: it owns the data directory)."""
    import uvicorn

    from service.app import create_app

    settings = load_settings(host=host, port=port)
    listener = bind_listener(settings.host, settings.port)
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    console.print(
        f"camp-search on http://{settings.host}:{settings.port} (data in {settings.data_dir}, "
        f"cache: {'Redis' if settings.redis_url else 'in-process'}, "
        f"writes: {'API key' if settings.writes_need_key else 'open on loopback'})"
    )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=10,
    )
    with listener:
        uvicorn.Server(config).run(sockets=[listener])


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything loads; a port that cannot be had exits 1
    with one line that says which setting moves it (uvicorn would log a bare errno)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        console.print(f"[red]error:[/red] {_bind_problem(host, port, error)}", soft_wrap=True)
        raise typer.Exit(1) from None
    listener.set_inheritable(True)
    return listener


def _bind_problem(host: str, port: int, error: OSError) -> str:
    move = f"choose another port with CAMPSEARCH_PORT or --port (e.g. --port {port + 1})"
    if error.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use by another program; {move}"
    if error.errno == errno.EACCES:
        return f"port {port} on {host} needs more privileges than this user has; {move}"
    return (
        f"cannot listen on {host}:{port} ({error.strerror or error}); set CAMPSEARCH_HOST or "
        f"--host to an address of this machine, or {move}"
    )


def ingest_command(
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
            console.print(f"[red]error:[/red] {error}")
            raise typer.Exit(2) from error
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
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    counts: dict[Outcome, int] = {"added": 0, "existing": 0, "refused": 0}
    with Progress(*columns, console=console) as bar:
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
    from service.metrics import ServiceMetrics
    from service.runtime import DataDirBusyError, ServiceRuntime

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

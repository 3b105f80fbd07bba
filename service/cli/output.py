"""What every command shares: one stderr console, one progress bar, one way to fail, settings."""

from __future__ import annotations

from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from service.runtime.settings import Settings

console = Console(stderr=True)  # stdout stays free for what a command is asked to print


def progress_bar(*columns: ProgressColumn, transient: bool = False) -> Progress:
    """A progress bar on the console; by default description, bar, done/total, elapsed, left."""
    columns = columns or (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console, transient=transient)


def fail(message: object, code: int = 2) -> NoReturn:
    """Print `error: message` and exit with `code` (2: the command could not proceed).

    The message is printed literally: errors quote keys and shapes in square brackets, which
    rich would otherwise take for markup and drop."""
    console.print(f"[red]error:[/red] {escape(str(message))}")
    raise typer.Exit(code)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment with command-line overrides; exits 2 when invalid."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as error:
        for problem in error.errors():
            console.print(f"[red]invalid setting:[/red] {problem['msg']}")
        raise typer.Exit(2) from None

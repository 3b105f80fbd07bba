"""The `camp-search` command line: one typer app; each command lives in its own module."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    name="camp-search",
    help="Self-hosted text-image retrieval with a FAISS shortlist and the CAMP reranker.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """camp-search: text-to-image and image-to-caption retrieval."""


@app.command()
def extract(
    source: Path = typer.Argument(
        ..., help="manifest.jsonl (one output split per 'split') or a folder of images"
    ),
    out: Path = typer.Option(..., "--out", help="output folder for the precomputed layout"),
    extractor: str = typer.Option("grid", help="region extractor: grid or detectron2"),
    batch_size: int = typer.Option(32, min=1, help="images per forward pass"),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N"),
    dtype: str = typer.Option("float16", help="feature dtype: float16 or float32"),
    fit: str = typer.Option("squash", help="grid only: squash, pad or crop the image to the input"),
    shard_size: int = typer.Option(512, min=1, help="images per resumable shard"),
    weights: Path | None = typer.Option(
        None, help="detectron2 only: the bottom-up-attention weights"
    ),
    config_file: Path | None = typer.Option(None, help="detectron2 only: its config yaml"),
) -> None:
    """Extract region features into {split}_ims.npy, _boxes.npy, _ids.txt and _caps.txt.

    Resumable: rerun the same command after an interrupt and finished shards are kept.
    """
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

    from model.extract import ExtractInputError, extract_dataset
    from model.extractors import InvalidExtractorConfig, UnknownExtractor, create_extractor

    console = Console(stderr=True)
    settings: dict[str, object] = {"batch_size": batch_size, "device": device}
    if extractor == "grid":
        settings["fit"] = fit
    elif extractor == "detectron2":
        settings.update(weights=weights, config_file=config_file)
    try:
        backend = create_extractor(extractor, settings)
    except (UnknownExtractor, InvalidExtractorConfig, ImportError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"extractor {backend.name} {backend.version} on {backend.device}")

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("extracting", total=None)
        try:
            summary = extract_dataset(
                source,
                out,
                backend,
                dtype=dtype,
                shard_size=shard_size,
                on_start=lambda total: bar.update(task, total=total),
                progress=lambda n: bar.advance(task, n),
            )
        except (ExtractInputError, ValueError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
        except KeyboardInterrupt:
            console.print("interrupted: rerun the same command to resume from finished shards")
            raise typer.Exit(130) from None

    for split, count in summary.images.items():
        console.print(f"{split}: {count} images -> {out}/{split}_ims.npy")
    if not summary.has_captions:
        console.print("input is a folder: no captions, so no *_caps.txt was written")
    console.print(
        f"{summary.shards_total - summary.shards_reused} shards extracted, "
        f"{summary.shards_reused} reused, {summary.seconds:.1f} s"
    )
    if summary.refused:
        table = Table("file", "reason", title=f"{len(summary.refused)} image(s) refused")
        for refusal in summary.refused:
            table.add_row(refusal.image, refusal.reason)
        console.print(table)
        console.print(f"(also in {out}/refused.jsonl)")

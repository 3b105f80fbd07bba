"""`camp-search extract`: region features of a manifest or a folder into the precomputed layout."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import typer
from rich.table import Table

from model.vision.extract import ExtractInputError, extract_dataset
from model.vision.extractors import InvalidExtractorConfig, UnknownExtractor, create_extractor
from service.cli.output import console, fail, progress_bar


def run_extract(
    source: Path,
    out: Path,
    extractor: str,
    *,
    batch_size: int,
    device: str,
    dtype: str,
    fit: str,
    shard_size: int,
    variant: str,
    input_size: int,
    weights: Path | None,
    config_file: Path | None,
    box_settings: Mapping[str, object] | None = None,
) -> None:
    """Extract with a progress bar, then print what was written, reused and refused; exits 2
    on a bad extractor or input and 130 on an interrupt (finished shards are kept).

    `box_settings` (min_boxes, max_boxes, confidence_threshold) go to the extractor only when
    given; one that does not take them refuses them by name rather than ignoring them."""
    settings: dict[str, object] = {"batch_size": batch_size, "device": device}
    if extractor == "grid":
        settings.update(fit=fit, variant=variant, input_size=input_size)
    elif extractor == "detectron2":
        settings.update(weights=weights, config_file=config_file)
    settings.update({k: v for k, v in (box_settings or {}).items() if v is not None})
    try:
        backend = create_extractor(extractor, settings)
    except (UnknownExtractor, InvalidExtractorConfig, ImportError) as exc:
        fail(exc)
    console.print(f"extractor {backend.name} {backend.version} on {backend.device}")

    with progress_bar() as bar:
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
            fail(exc)
        except KeyboardInterrupt:
            console.print("interrupted: rerun the same command to resume from finished shards")
            raise typer.Exit(130) from None

    for split, count in summary.images.items():
        console.print(
            f"{split}: {count} images, {summary.regions[split]} regions each at most "
            f"-> {out}/{split}_ims.npy (real counts in {split}_region_counts.npy)"
        )
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

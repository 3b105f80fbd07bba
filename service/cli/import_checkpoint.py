"""`camp-search import-checkpoint`: an official CAMP or IMRAM release -> one servable
checkpoint."""

from __future__ import annotations

from pathlib import Path

from model.checkpoints.checkpoint import CheckpointError
from model.checkpoints.release import import_release
from service.cli.output import console, fail


def run_import_checkpoint(
    official: Path,
    vocabulary: Path,
    out: Path,
    *,
    extractor: str | None,
    version: str | None,
    min_boxes: int,
    max_boxes: int,
    detectron2_files: dict[str, Path | None] | None = None,
) -> Path:
    """Convert and write `out` atomically; exits 2 naming what is wrong with an input."""
    try:
        checkpoint = import_release(
            official,
            vocabulary,
            extractor=extractor,
            version=version,
            min_boxes=min_boxes,
            max_boxes=max_boxes,
            detectron2_files=detectron2_files,
        )
    except CheckpointError as exc:
        fail(exc)
    try:
        path = checkpoint.save(out)
    except OSError as exc:
        fail(f"cannot write {out}: {exc}")
    config, meta = checkpoint.config, checkpoint.metadata
    extractor_meta = meta["extractor"]
    console.print(
        f"imported {official.name}: vocabulary {config.vocab_size} words, d={config.embed_size}, "
        f"{config.img_dim}-d regions from the {extractor_meta['name']!r} extractor "
        f"{extractor_meta['config']}; scorer {checkpoint.scorer!r} "
        f"{checkpoint.scorer_options or ''}; no shortlist heads (ranked by "
        f"{checkpoint.scorer.upper()} alone)"
    )
    console.print(f"wrote {path} (version {meta['version']})")
    return path

"""`camp-search calibrate`: fit a model's match-probability maps on dev, store them in its
checkpoint, print the reliability (model/calibration.py, model/eval/calibrate.py)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from model.calibration import CALIBRATION_MODES, DIRECTIONS, METADATA_KEY, CalibrationError
from model.checkpoints.checkpoint import CheckpointError, load_checkpoint
from model.eval.calibrate import calibration_pairs, check_calibration, fit_calibration
from model.eval.data import DataError, load_split
from model.retrieval import DEFAULT_CHECKPOINT, RetrievalModel
from service.cli.output import console, fail


def reliability_table(report: dict, direction: str, mode: str, kind: str) -> Table:
    """One reliability curve as a table: bin, pairs, mean predicted, observed match rate."""
    curve = report[direction][mode][kind]
    table = Table(
        "P(match) bin",
        "pairs",
        "predicted",
        "observed",
        title=f"{direction} {mode} ({kind.replace('_', '-')}), ECE {curve['ece']:.4f}",
    )
    for row in curve["bins"]:
        if row["count"]:
            table.add_row(
                f"{row['low']:.1f}-{row['high']:.1f}",
                f"{row['count']:,}",
                f"{row['predicted']:.3f}",
                f"{row['observed']:.3f}",
            )
    return table


def run_calibrate(
    data: Path,
    split: str,
    checkpoint: Path | None,
    out: Path | None,
    candidates: int,
    device: str,
    json_out: Path | None,
    check: bool = False,
) -> dict:
    source = checkpoint or DEFAULT_CHECKPOINT
    target = out or source
    try:
        stored = load_checkpoint(source)
        model = RetrievalModel.from_checkpoint(stored, device=device)
        dataset = load_split(
            data,
            split,
            extractor_name=model.extractor_name,
            extractor_config=model.extractor_config,
        )
    except (CheckpointError, CalibrationError, DataError, FileNotFoundError) as exc:
        fail(exc)
    if dataset.images.shape[-1] != model.region_dim:
        fail(
            f"{data} holds {dataset.images.shape[-1]}-d regions; the model expects "
            f"{model.region_dim}-d"
        )
    console.print(
        f"model {model.version} on {model.device}; {split}: {dataset.num_images} images, "
        f"top {candidates} per query"
    )
    pairs = calibration_pairs(model, dataset, candidates)
    if check:
        return _check(model, pairs, json_out)
    fitted_on = f"{data.name or data} {split} ({dataset.num_images} images), top {candidates}"
    try:
        calibration, report = fit_calibration(pairs, fitted_on, candidates)
    except CalibrationError as exc:
        fail(exc)
    for direction in DIRECTIONS:
        for mode in CALIBRATION_MODES:
            console.print(reliability_table(report, direction, mode, "in_sample"))
            crossed = report[direction][mode]["cross_fitted"]["ece"]
            console.print(f"  cross-fitted (even/odd images) ECE {crossed:.4f}")
    ece = {
        d: {
            m: {k: report[d][m][k]["ece"] for k in ("in_sample", "cross_fitted")} for m in report[d]
        }
        for d in report
    }
    stored.metadata[METADATA_KEY] = calibration.to_metadata({"ece": ece})
    stored.save(target)
    console.print(f"calibration stored in {target}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1))
    return report


def _check(model: RetrievalModel, pairs: dict, json_out: Path | None) -> dict:
    """Print (and write) the reliability of the model's stored maps on these pairs."""
    if model.calibration is None:
        fail("this checkpoint has no calibration to check: run `camp-search calibrate` first")
    report = check_calibration(pairs, model.calibration)
    for direction in DIRECTIONS:
        for mode in CALIBRATION_MODES:
            console.print(reliability_table(report, direction, mode, "held_out"))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1))
    return report

"""`camp-search evaluate`: load a model and a split, print a table, optionally write JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from rich.progress import TextColumn, TimeElapsedColumn
from rich.table import Table

from model.checkpoints.checkpoint import CheckpointError
from model.checkpoints.release import PRECOMPUTED
from model.eval.data import DataError, load_split
from model.eval.evaluate_model import MODES, evaluate_model
from model.retrieval import RetrievalModel
from service.cli.output import console, fail, progress_bar


def _row(table: Table, name: str, metrics: dict) -> None:
    i2t, t2i = metrics["i2t"], metrics["t2i"]
    table.add_row(
        name,
        *(f"{i2t[k]:.1f}" for k in ("r1", "r5", "r10")),
        *(f"{t2i[k]:.1f}" for k in ("r1", "r5", "r10")),
        f"{metrics['rsum']:.1f}",
    )


def metrics_table(result: dict, title: str, reranker: str) -> Table:
    """The metrics as a table; `reranker` names the second-stage scorer in the rows that rank
    by its score alone (`camp_alone` in the result, whichever scorer it is)."""
    table = Table("mode", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "rsum", title=title)
    if "pooled" in result:
        _row(table, "pooled", result["pooled"])
    for k, metrics in result.get("two_stage", {}).items():
        _row(table, f"two-stage K={k}", metrics)
    if "exhaustive" in result:
        _row(table, "exhaustive", result["exhaustive"])
    camp_alone = result.get("camp_alone", {})
    for k, metrics in camp_alone.get("two_stage", {}).items():
        _row(table, f"{reranker} alone, top {k}", metrics)
    if "exhaustive" in camp_alone:
        _row(table, f"{reranker} alone, every pair", camp_alone["exhaustive"])
    return table


def run_evaluate(
    data: Path,
    split: str,
    checkpoint: Path | None,
    json_out: Path | None,
    modes: Sequence[str],
    device: str,
    ks: str = "10,50,100,200",
    scores_out: Path | None = None,
    without_zero_shot: bool = False,
) -> dict:
    modes = [m.strip() for m in modes if m.strip()]
    if not modes or set(modes) - set(MODES):
        fail(f"modes must be a comma-separated subset of {MODES}")
    if scores_out is not None and "exhaustive" not in modes:
        fail("--scores writes the exhaustive score matrix: add exhaustive to --modes")
    try:
        model = RetrievalModel.load(checkpoint, device=device)
        if model.extractor_name == PRECOMPUTED and not data.is_dir():
            fail(
                f"{checkpoint} was imported for precomputed features (--extractor {PRECOMPUTED}) "
                f"and cannot extract regions from {data}: give a precomputed folder"
            )
        dataset = load_split(
            data,
            split,
            extractor_name=model.extractor_name,
            extractor_config=model.extractor_config,
        )
    except (CheckpointError, DataError, FileNotFoundError) as exc:
        fail(exc)
    if dataset.images.shape[-1] != model.region_dim:
        fail(
            f"{data} holds {dataset.images.shape[-1]}-d regions; the model "
            f"expects {model.region_dim}-d ({model.extractor_name})"
        )
    console.print(f"model {model.version} on {model.device}; {split}: {dataset.num_images} images")
    try:
        shortlist_sizes = sorted({int(k) for k in ks.split(",") if k.strip()})
    except ValueError:
        fail(f"--ks must be comma-separated integers, got {ks!r}")
    columns = (
        TextColumn(f"scoring pairs with {reranker_label(model)}"),
        TextColumn("{task.completed:,.0f} pairs"),
        TimeElapsedColumn(),
    )
    matrices: dict[str, np.ndarray] = {}
    with progress_bar(*columns, transient=True) as bar:
        task = bar.add_task("pairs", total=None)
        result = evaluate_model(
            model,
            dataset,
            modes=modes,
            ks=shortlist_sizes,
            on_pairs=lambda count: bar.advance(task, count),
            on_scores=matrices.update,
        )
    console.print(metrics_table(result, f"{split} ({model.version})", reranker_label(model)))
    if without_zero_shot:
        result["without_zero_shot"] = _without_zero_shot(model, dataset, modes, shortlist_sizes)
    if "shortlist_recall" in result:
        recall = result["shortlist_recall"]
        console.print(
            "shortlist recall (%): t2i "
            + json.dumps(recall["t2i"])
            + "  i2t "
            + json.dumps(recall["i2t"])
        )
    console.print(
        "timings (s): " + json.dumps({k: round(v, 2) for k, v in result["timings_s"].items()})
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1))
    if scores_out is not None:
        write_score_matrices(scores_out, matrices, model.reranker.display_score)
    return result


def reranker_label(model: RetrievalModel) -> str:
    """The checkpoint's second-stage scorer as the tables name it ("CAMP", "IMRAM")."""
    return model.network.spec.scorer.upper()


def write_score_matrices(
    path: Path,
    matrices: dict[str, np.ndarray],
    display_score: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid,
) -> None:
    """The exhaustive matrices, images x captions, as .npz: `final` (what the product ranks
    by), `camp_logits` (the reranker's raw pair scores), and `camp_scores` (its own scores as
    the official code returns them: CAMP's sigmoid of the logits, IMRAM's sums as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    camp = matrices["camp"].astype(np.float32)
    scores = display_score(torch.from_numpy(camp.astype(np.float64))).numpy()
    with path.open("wb") as handle:
        np.savez(
            handle,
            final=matrices["final"].astype(np.float32),
            camp_logits=camp,
            camp_scores=scores.astype(np.float32),
        )
    console.print(f"score matrices (images x captions) written to {path}")


def _without_zero_shot(
    model: RetrievalModel, dataset, modes: Sequence[str], ks: Sequence[int]
) -> dict:
    """The same split ranked with the model's zero-shot channel off (model/zeroshot.py)."""
    if model.zero_shot is None:
        fail(f"{model.version} has no zero-shot channel to compare with")
    settings = model.zero_shot.settings
    model.set_zero_shot(None)
    try:
        result = evaluate_model(model, dataset, modes=modes, ks=ks)
        title = f"{dataset.name} ({model.version})"
        console.print(metrics_table(result, title, reranker_label(model)))
    finally:
        model.set_zero_shot(settings)
    return result

"""`camp-search train --config FILE`: run a preset into a run folder (resumable)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from model.eval.data import DataError
from model.training.recipes import TrainConfig, TrainConfigError
from model.training.run_state import RunFolder
from service.cli.output import console, fail


def run_train(
    config_path: Path, out: Path | None, resume: bool, *, seed: int | None = None
) -> Path:
    """Train `config_path` into its run folder; exits 2 on a bad preset or missing data.
    `seed` replaces the preset's (the run folder's config.json records the one used)."""
    try:
        config = TrainConfig.load(config_path)
    except TrainConfigError as exc:
        fail(exc)
    if seed is not None:
        config = dataclasses.replace(config, seed=seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    run = RunFolder(out or Path(config.out))
    (run.path / "config.json").write_text(json.dumps(config.__dict__, indent=1))
    run.log(event="start", config=str(config_path), recipe=config.recipe)
    try:
        if config.recipe == "residual":
            from model.training.residual import run_residual

            best = run_residual(config, run, resume, console)
        elif config.recipe == "heads_imported":  # minutes on a CPU: reruns whole
            from model.training.heads_imported import run_heads_imported

            best = run_heads_imported(config, run, console)
        else:
            from model.training.official import run_official

            best = run_official(config, run, resume, console)
    except (DataError, FileNotFoundError, TrainConfigError) as exc:
        fail(exc)
    console.print(f"best checkpoint: {best}")
    return best

"""A training run's folder: per-epoch checkpoints, resume state, best model, metrics log.

run/
  epoch-{stage}-{n}.pt   our checkpoint format after every epoch (loads with RetrievalModel)
  best.pt                the checkpoint with the best dev rsum so far
  resume.pt              weights + optimizer state + position, for `--resume`
  metrics.jsonl          one JSON object per logged event (steps, epochs, evaluations)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from model.architecture.network import RetrievalNetwork
from model.checkpoints.checkpoint import _atomic_torch_save


class RunFolder:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"

    def log(self, **event: Any) -> None:
        event = {"time": round(time.time(), 3), **event}
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")

    def save_epoch(
        self,
        network: RetrievalNetwork,
        metadata: dict,
        stage: str,
        epoch: int,
        optimizer: torch.optim.Optimizer,
        best_rsum: float,
    ) -> Path:
        path = network.to_checkpoint(metadata).save(self.path / f"epoch-{stage}-{epoch}.pt")
        state = {
            "stage": stage,
            "epoch": epoch,
            "best_rsum": best_rsum,
            "network": {k: v.detach().cpu() for k, v in network.state_dict().items()},
            "optimizer": optimizer.state_dict(),
        }
        _atomic_torch_save(state, self.path / "resume.pt")
        return path

    def save_best(self, network: RetrievalNetwork, metadata: dict) -> Path:
        return network.to_checkpoint(metadata).save(self.path / "best.pt")

    def resume_state(self) -> dict | None:
        path = self.path / "resume.pt"
        return torch.load(path, weights_only=True) if path.exists() else None

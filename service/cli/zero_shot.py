"""`camp-search zero-shot`: store the zero-shot channel's settings in a checkpoint as a new
model version (model/zeroshot.py): its weight and temperature in the metadata, the class-name
embeddings E in the extras (loading them is cheaper than embedding 1000 prompts at start)."""

from __future__ import annotations

from pathlib import Path

from model.calibration import METADATA_KEY as CALIBRATION_KEY
from model.checkpoints.checkpoint import CheckpointError, load_checkpoint
from model.retrieval import DEFAULT_CHECKPOINT, RetrievalModel
from model.zeroshot import EXTRAS_KEY, METADATA_KEY, ZeroShotError, ZeroShotSettings
from service.cli.output import console, fail


def run_zero_shot(
    checkpoint: Path | None,
    out: Path | None,
    *,
    weight: float,
    temperature: float,
    prompt: str,
    version: str,
    chosen_by: str,
) -> Path:
    source = checkpoint or DEFAULT_CHECKPOINT
    target = out or source
    try:
        settings = ZeroShotSettings(weight=weight, temperature=temperature, prompt=prompt)
        stored = load_checkpoint(source)
        model = RetrievalModel.from_checkpoint(stored, device="cpu")
        model.set_zero_shot(settings)  # refuses a model the channel does not fit
    except (CheckpointError, ZeroShotError, FileNotFoundError) as exc:
        fail(exc)
    if version == stored.metadata.get("version"):
        fail(f"give the model a new version (--version): {version!r} is the current one")
    stored.metadata[METADATA_KEY] = settings.to_metadata({"chosen_by": chosen_by})
    stored.metadata["version"] = version
    stored.extras[EXTRAS_KEY] = {
        "prompt": prompt,
        "class_embeddings": model.zero_shot.class_embeddings.cpu().clone(),
    }
    if stored.metadata.pop(CALIBRATION_KEY, None) is not None:
        console.print(
            "[yellow]the stored calibration was fitted on the old scores and is removed: "
            "run `camp-search calibrate` on this checkpoint[/yellow]"
        )
    stored.save(target)
    console.print(f"{version}: zero-shot channel w={weight:g}, T={temperature:g} in {target}")
    return target

"""Shortlist heads for an imported official CAMP, which is left exactly as released.

An imported checkpoint (`camp-search import-checkpoint`) has CAMP but no shortlist heads, so a
search would have to score every photo with CAMP. This recipe trains only the heads
(docs/ARCHITECTURE.md, Shortlist heads) on the frozen model's own inputs: the mean of each
image's regions and the mean of the frozen GRU's word states of each caption, both computed
once, so an epoch over Flickr30K's 145,000 captions is a CPU matter of seconds. CAMP's weights
and vocabulary are copied, never trained. The reranked shortlist is ordered by CAMP alone, as
the authors rank (or, with `selection.fusion` "tune", by the fusion weight best on dev).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from model.architecture.network import NetworkSpec, RetrievalNetwork
from model.checkpoints.checkpoint import CheckpointError, load_checkpoint
from model.eval.data import DataError, RetrievalSplit, load_precomputed
from model.training.dev_eval import evaluate_frozen
from model.training.fusion_tuning import tune_fusion
from model.training.gru_text import frozen_means, gru_frozen_split
from model.training.pooled import PooledTrainingConfig, train_pooled_heads
from model.training.recipes import TrainConfig, TrainConfigError
from model.training.residual import frozen_subset
from model.training.run_state import RunFolder

DEFAULT_SELECTION_K = 100


def frozen_network(base: Path, network: dict[str, Any]) -> tuple[RetrievalNetwork, dict]:
    """The imported model with fresh heads of the preset's sizes, CAMP frozen; and its metadata.

    Refuses a checkpoint whose text side is not the official GRU over its own vocabulary.
    """
    try:
        checkpoint = load_checkpoint(base)
        imported = RetrievalNetwork.from_checkpoint(checkpoint)
    except (CheckpointError, OSError, RuntimeError) as exc:  # RuntimeError: not a torch file
        raise TrainConfigError(f"init.checkpoint: {exc}") from exc
    if imported.spec.text_encoder != "gru" or imported.vocabulary is None:
        raise TrainConfigError(
            f"init.checkpoint {base} has a {imported.spec.text_encoder} text encoder; this recipe "
            "trains heads for imported official checkpoints (GRU over their vocabulary)"
        )
    spec: NetworkSpec = dataclasses.replace(imported.spec, **network)
    trained = RetrievalNetwork(spec, vocabulary=imported.vocabulary, with_heads=True)
    trained.camp.load_state_dict(imported.camp.state_dict())
    trained.camp.eval()
    for parameter in trained.camp.parameters():
        parameter.requires_grad_(False)
    return trained, dict(checkpoint.metadata)


def _split(root: Path, name: str, region_dim: int) -> RetrievalSplit:
    split = load_precomputed(root, name)
    if split.images.shape[-1] != region_dim:
        raise DataError(
            f"{root / (name + '_ims.npy')} holds {split.images.shape[-1]}-d regions; the imported "
            f"model reads {region_dim}-d ones"
        )
    return split


def run_heads_imported(config: TrainConfig, run: RunFolder, console: Console) -> Path:
    """Train the heads, set the fusion, save `best.pt` (a model that serves two-stage)."""
    torch.manual_seed(config.seed)
    base = Path(config.init["checkpoint"])
    network, imported_metadata = frozen_network(base, config.network)
    extractor = imported_metadata.get("extractor") or {}
    if config.extractor and config.extractor.get("name") != extractor.get("name"):
        raise TrainConfigError(
            f"extractor {config.extractor.get('name')!r} differs from the imported model's "
            f"{extractor.get('name')!r}; leave extractor empty to keep the model's"
        )
    root = Path(config.data["root"])
    train = _split(root, config.data.get("train", "train"), network.spec.region_dim)
    camp_before = {k: v.clone() for k, v in network.camp.state_dict().items()}
    region_means, text_means = frozen_means(network, train)
    captions = len(train.captions)
    console.print(
        f"frozen CAMP from {base}: {train.num_images} train images, {captions} captions encoded"
    )

    def on_epoch(epoch: int, loss: float, seconds: float) -> None:
        rate = captions / max(seconds, 1e-9)
        run.log(event="epoch", stage="heads", epoch=epoch, loss=loss, captions_per_s=rate)
        console.print(f"heads epoch {epoch}: loss {loss:.4f} ({rate:.0f} captions/s)")

    train_pooled_heads(
        network.heads,
        region_means,
        text_means,
        train.caption_image(),
        PooledTrainingConfig(**{"seed": config.seed, **config.pooled}),
        on_epoch=on_epoch,
    )
    fusion = config.selection.get("fusion", "camp_alone")
    with torch.no_grad():  # the authors rank by CAMP's score alone
        network.fusion.shortlist_weight.fill_(0.0)
        network.fusion.camp_weight.fill_(1.0)
    dev_name = config.data.get("dev")
    if dev_name:
        k = int(config.selection.get("k", DEFAULT_SELECTION_K))
        dev_split = _split(root, dev_name, network.spec.region_dim)
        dev_images = int(config.selection.get("dev_images", dev_split.num_images))
        dev = frozen_subset(gru_frozen_split(network, dev_split), dev_images)
        if fusion == "tune":
            weight, _ = tune_fusion(network, dev, k, float(network.heads.logit_scale))
            console.print(f"fusion tuned on dev: CAMP weight {weight}")
        result = evaluate_frozen(network, dev, ks=(k,))
        run.log(
            event="dev",
            stage="heads",
            pooled_rsum=result["pooled"]["rsum"],
            shortlist_recall=result["shortlist_recall"],
            two_stage_rsum=result["two_stage"][str(k)]["rsum"],
            k=k,
        )
        console.print(
            f"dev ({dev_images} images): pooled rsum {result['pooled']['rsum']:.1f}, "
            f"shortlist recall@{k} t2i {result['shortlist_recall']['t2i'][str(k)]:.1f}%, "
            f"two-stage K={k} rsum {result['two_stage'][str(k)]['rsum']:.1f}"
        )
    elif fusion == "tune":
        raise TrainConfigError("selection.fusion 'tune' needs a dev split in data.dev")
    for key, value in network.camp.state_dict().items():  # the release stays as released
        if not torch.equal(value, camp_before[key]):
            raise RuntimeError(f"CAMP weight {key} changed while training the heads")
    metadata = {
        **imported_metadata,
        "version": config.version,
        "extractor": extractor,
        "training": {
            "recipe": config.recipe,
            "seed": config.seed,
            "data": config.data,
            "base_checkpoint": str(base),
            "base_version": imported_metadata.get("version"),
        },
    }
    return run.save_best(network, metadata)

"""The CPU recipe of the shipped model: pooled heads (InfoNCE), then CAMP as a residual reranker.

Every epoch is checkpointed; `resume` continues after the last finished epoch; the best
checkpoint is chosen by the dev rsum of two-stage ranking at the product's K on the first
`selection.dev_images` dev images (a subset keeps per-epoch selection cheap on a CPU).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from rich.console import Console

from model.architecture.network import NetworkSpec, RetrievalNetwork
from model.eval.data import load_precomputed
from model.eval.protocol import retrieval_metrics
from model.text.glove import GLOVE_NAME, init_embedding_from_glove
from model.text.vocab import DEFAULT_MIN_COUNT, Vocabulary
from model.training.dev_eval import evaluate_frozen, pooled_scores
from model.training.features import FrozenSplit, frozen_split, region_means
from model.training.fusion_tuning import tune_fusion
from model.training.gru_text import caption_ids, gru_frozen_split, train_gru_pooled
from model.training.mining import mine_shortlists
from model.training.pooled import PooledTrainingConfig, train_pooled_heads
from model.training.recipes import TrainConfig, TrainConfigError
from model.training.reranker import (
    NEGATIVE_SOURCES,
    RerankerTrainingConfig,
    init_residual,
    reranker_optimizer,
    train_reranker,
    warm_start_from_heads,
)
from model.training.run_state import RunFolder

DEFAULT_SELECTION_IMAGES = 250
DEFAULT_SELECTION_K = 100
MINE_K = 200


def frozen_subset(data: FrozenSplit, images: int) -> FrozenSplit:
    from model.training.features import token_means

    images = min(images, len(data.region_means))
    split = data.split.subset(slice(0, images))
    tokens = data.tokens
    end = tokens.offsets[5 * images]
    from model.text.token_cache import TokenFeatures

    sub_tokens = TokenFeatures(
        features=tokens.features[:end], offsets=tokens.offsets[: 5 * images + 1]
    )
    return FrozenSplit(
        split=split,
        region_means=data.region_means[:images],
        tokens=sub_tokens,
        text_means=token_means(sub_tokens),
    )


def negatives_schedule(reranker: dict) -> list[str]:
    """`reranker.negatives_from` as one source per epoch (the last one repeats): a string for
    every epoch, or a list such as ["batch", "shortlist"] (in-batch negatives while the scorer
    warms up, then each query's own shortlist, the candidates it must order at search time)."""
    given = reranker.get("negatives_from", RerankerTrainingConfig.negatives_from)
    schedule = [given] if isinstance(given, str) else list(given)
    if not schedule or any(source not in NEGATIVE_SOURCES for source in schedule):
        raise TrainConfigError(
            f"reranker.negatives_from must be one of {NEGATIVE_SOURCES} or a non-empty list of "
            f"them (one per epoch), got {given!r}"
        )
    return schedule


# The scorer whose network's draws from the seed start every run's shortlist heads.
HEADS_SEED_SCORER = "camp"


def network_with_seed_heads(
    spec: NetworkSpec, vocabulary: Vocabulary | None = None
) -> RetrievalNetwork:
    """`RetrievalNetwork(spec)` whose shortlist heads start as the default (CAMP) network's do
    from the current seed, and which leaves the global RNG where that network leaves it.

    The heads are built after the scorer, so without this a scorer with other parameters would
    start (and, the heads' stage being deterministic, end) with other heads: the scorers could
    not be compared on the same shortlist. CAMP's runs are unchanged by it.
    """
    reference = RetrievalNetwork(
        dataclasses.replace(spec, scorer=HEADS_SEED_SCORER, scorer_options={}),
        vocabulary=vocabulary,
        backbone=None,
    )
    if spec.scorer == HEADS_SEED_SCORER:
        return reference
    with torch.random.fork_rng(devices=[]):
        network = RetrievalNetwork(spec, vocabulary=vocabulary, backbone=None)
    network.heads.load_state_dict(reference.heads.state_dict())
    return network


def run_residual(config: TrainConfig, run: RunFolder, resume: bool, console: Console) -> Path:
    """Train and return the path of the best checkpoint."""
    torch.manual_seed(config.seed)
    data_root = Path(config.data["root"])
    spec = NetworkSpec.from_dict(config.network)
    train_split = load_precomputed(data_root, config.data.get("train", "train"))
    dev_split = load_precomputed(data_root, config.data.get("dev", "dev"))
    dev_images = int(config.selection.get("dev_images", DEFAULT_SELECTION_IMAGES))
    select_k = str(config.selection.get("k", DEFAULT_SELECTION_K))
    # A text side over our own vocabulary (the GRU) is trained here; MiniLM's is frozen and
    # read from the token cache.
    own_vocabulary = spec.text_kind.uses_vocabulary
    if own_vocabulary:
        vocabulary = Vocabulary.build(
            train_split.captions, min_count=int(config.data.get("min_count", DEFAULT_MIN_COUNT))
        )
        network = network_with_seed_heads(spec, vocabulary)
        train_means = region_means(train_split.images, train_split.region_counts)
        console.print(f"vocabulary: {len(vocabulary)} words (count >= min_count in train)")
    else:
        network = network_with_seed_heads(spec)
        started = time.perf_counter()
        cache = Path(config.data["text_cache"])
        train = frozen_split(train_split, cache)
        dev = frozen_subset(frozen_split(dev_split, cache), dev_images)
        console.print(
            f"features ready in {time.perf_counter() - started:.1f} s "
            f"(train {len(train.caption_image)} captions, dev subset {dev_images} images)"
        )
    metadata = config.metadata()
    state = run.resume_state() if resume else None
    best = state["best_rsum"] if state else float("-inf")
    pooled_cfg = PooledTrainingConfig(**{"seed": config.seed, **config.pooled})
    rerank_epochs = int(config.reranker.get("epochs", 1))
    negatives = negatives_schedule(config.reranker)
    rerank_cfg = RerankerTrainingConfig(
        **{
            "seed": config.seed,
            **{k: v for k, v in config.reranker.items() if k not in ("epochs", "negatives_from")},
            "negatives_from": negatives[0],
        }
    )
    done_pooled = state is not None
    done_rerank = state["epoch"] + 1 if state and state["stage"] == "reranker" else 0
    if state is not None:
        network.load_state_dict(state["network"])
        console.print(f"resumed after {state['stage']} epoch {state['epoch']}")

    def select(stage: str, epoch: int, optimizer) -> None:
        nonlocal best
        if stage == "reranker" and not rerank_cfg.residual:
            weight, sweep = tune_fusion(
                network, dev, int(select_k), float(network.heads.logit_scale)
            )
            run.log(
                event="fusion",
                stage=stage,
                epoch=epoch,
                camp_weight=weight,
                sweep={str(w): m["rsum"] for w, m in sweep.items()},
            )
            console.print(f"fusion tuned on the selection images: CAMP weight {weight}")
            # The sweep already ranked the selection images with the chosen weight.
            pooled_rsum = retrieval_metrics(pooled_scores(network, dev))["rsum"]
            rsum = sweep[weight]["rsum"]
        else:
            result = evaluate_frozen(network, dev, ks=(int(select_k),))
            pooled_rsum = result["pooled"]["rsum"]
            rsum = result["two_stage"][select_k]["rsum"]
        run.log(
            event="dev",
            stage=stage,
            epoch=epoch,
            pooled_rsum=pooled_rsum,
            two_stage_rsum=rsum,
            k=int(select_k),
        )
        console.print(
            f"{stage} epoch {epoch}: selection images, pooled rsum "
            f"{pooled_rsum:.1f}, two-stage K={select_k} rsum {rsum:.1f}"
        )
        if rsum > best:
            best = rsum
            run.save_best(network, metadata)
        run.save_epoch(network, metadata, stage, epoch, optimizer, best)

    if not done_pooled:
        assert network.heads is not None

        def on_epoch(epoch: int, loss: float, seconds: float) -> None:
            run.log(
                event="epoch",
                stage="pooled",
                epoch=epoch,
                loss=loss,
                seconds=seconds,
                captions_per_s=len(train_split.captions) / seconds,
            )
            console.print(
                f"pooled epoch {epoch}: loss {loss:.4f} "
                f"({len(train_split.captions) / seconds:.0f} captions/s)"
            )

        if own_vocabulary:
            word_vectors = config.data.get("word_vectors")
            if word_vectors == GLOVE_NAME:
                coverage = init_embedding_from_glove(
                    network.camp.text_encoder.embed, network.vocabulary
                )
                console.print(f"GloVe covers {coverage.found}/{coverage.total} words")
                run.log(event="glove", found=coverage.found, total=coverage.total)
            elif word_vectors is not None:
                raise TrainConfigError(f"data.word_vectors must be {GLOVE_NAME!r} or absent")
            train_gru_pooled(
                network,
                train_split,
                train_means,
                caption_ids(network, train_split.captions),
                pooled_cfg,
                on_epoch=on_epoch,
            )
        else:
            train_pooled_heads(
                network.heads,
                train.region_means,
                train.text_means,
                train.caption_image,
                pooled_cfg,
                on_epoch=on_epoch,
            )
    if own_vocabulary:  # the frozen GRU's word states stand where MiniLM's token cache stands
        for parameter in network.camp.text_encoder.parameters():
            parameter.requires_grad_(False)
        train = gru_frozen_split(network, train_split, train_means)
        dev = frozen_subset(gru_frozen_split(network, dev_split), dev_images)
    if not done_pooled:
        if rerank_cfg.warm_start:
            warm_start_from_heads(network)
        if rerank_cfg.residual:
            init_residual(network)
        select("pooled", pooled_cfg.epochs - 1, torch.optim.SGD([torch.zeros(1)], lr=0))
    for parameter in network.heads.parameters():
        parameter.requires_grad_(False)
    with torch.no_grad():
        mined = mine_shortlists(
            network.heads.image.embed_mean(train.region_means),
            network.heads.text.embed_mean(train.text_means),
            MINE_K,
        )
    optimizer = reranker_optimizer(network, rerank_cfg)
    if state is not None and state["stage"] == "reranker":
        optimizer.load_state_dict(state["optimizer"])
    for epoch in range(done_rerank, rerank_epochs):
        cfg = dataclasses.replace(
            rerank_cfg,
            seed=config.seed + epoch,
            negatives_from=negatives[min(epoch, len(negatives) - 1)],
        )
        started = time.perf_counter()

        def on_step(step, loss, pairs_per_s, epoch=epoch, cfg=cfg, started=started) -> None:
            if step % 10 == 0:
                run.log(
                    event="step",
                    stage="reranker",
                    epoch=epoch,
                    step=step,
                    loss=loss,
                    pairs_per_s=pairs_per_s,
                    negatives_from=cfg.negatives_from,
                    fusion=[
                        float(network.fusion.shortlist_weight.detach()),
                        float(network.fusion.camp_weight.detach()),
                    ],
                )
            if step % 50 == 0:
                console.print(
                    f"reranker epoch {epoch} step {step}/{cfg.steps}: loss {loss:.4f}, "
                    f"{pairs_per_s:.0f} pairs/s, {time.perf_counter() - started:.0f} s"
                )

        train_reranker(network, train, mined, cfg, on_step=on_step, optimizer=optimizer)
        select("reranker", epoch, optimizer)
    return run.path / "best.pt"

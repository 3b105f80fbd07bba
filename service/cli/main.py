"""The `camp-search` command line: every command declared in one typer app; each body lives in
its own module of `service/cli/`, imported only when that command runs."""

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
    variant: str = typer.Option("lite0", help="grid only: EfficientNet-Lite0 or lite2"),
    input_size: int = typer.Option(
        224, min=32, help="grid only: input side in pixels, a multiple of 32 (grid = size/32)"
    ),
    shard_size: int = typer.Option(512, min=1, help="images per resumable shard"),
    weights: Path | None = typer.Option(
        None,
        envvar="CAMPSEARCH_DETECTRON2_WEIGHTS",
        help="detectron2 only: the bottom-up-attention weights",
    ),
    config_file: Path | None = typer.Option(
        None,
        envvar="CAMPSEARCH_DETECTRON2_CONFIG",
        help="detectron2 only: its config yaml (upstream detectron2 keys)",
    ),
    min_boxes: int | None = typer.Option(
        None, min=1, help="detectron2 only: fewest boxes an image gets (default 36; adaptive: 10)"
    ),
    max_boxes: int | None = typer.Option(
        None, min=1, help="detectron2 only: most boxes an image gets (default 36; adaptive: 100)"
    ),
    confidence_threshold: float | None = typer.Option(
        None,
        min=0.0,
        max=1.0,
        help="detectron2 only: boxes at least this confident are kept, between the two counts "
        "(default 0.2)",
    ),
) -> None:
    """Extract region features into {split}_ims.npy, _boxes.npy, _region_counts.npy, _ids.txt
    and _caps.txt.

    With adaptive box counts (--min-boxes 10 --max-boxes 100) images get different numbers of
    regions: each split is padded to its most, and _region_counts.npy says how many are real.
    Resumable: rerun the same command after an interrupt and finished shards are kept.
    """
    from service.cli.extract import run_extract

    run_extract(
        source,
        out,
        extractor,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        fit=fit,
        variant=variant,
        input_size=input_size,
        shard_size=shard_size,
        weights=weights,
        config_file=config_file,
        box_settings={
            "min_boxes": min_boxes,
            "max_boxes": max_boxes,
            "confidence_threshold": confidence_threshold,
        },
    )


@app.command()
def serve(
    host: str | None = typer.Option(None, help="bind address (default CAMPSEARCH_HOST)"),
    port: int | None = typer.Option(None, help="port (default CAMPSEARCH_PORT, 8000)"),
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
) -> None:
    """Run the HTTP API and the web UI; data lives in CAMPSEARCH_DATA_DIR (default ./data)."""
    from service.cli.serve import run_serve

    run_serve(host, port, log_level)


@app.command()
def migrate(
    to: str = typer.Option(..., "--to", help="postgresql://user:password@host/db to copy into"),
    data_dir: Path | None = typer.Option(
        None, help="the embedded data directory (default CAMPSEARCH_DATA_DIR)"
    ),
    batch: int = typer.Option(500, min=1, help="rows per transaction"),
) -> None:
    """Copy an embedded data directory (catalog and features) into PostgreSQL, ids kept, so
    several replicas can serve it without re-ingesting. Idempotent: rerun it to resume."""
    from service.cli.migrate import run_migrate

    run_migrate(to, data_dir, batch)


@app.command()
def ingest(
    source: Path = typer.Argument(..., help="manifest.jsonl, or a folder of photos"),
    server: str | None = typer.Option(
        None, help="URL of a running server (key from CAMPSEARCH_API_KEY); default: local data dir"
    ),
    jobs: int = typer.Option(2, min=1, help="photos in flight at once"),
    max_captions: int | None = typer.Option(None, min=0, help="keep the first N captions each"),
    refused: Path | None = typer.Option(None, help="write refused files here (JSON lines)"),
) -> None:
    """Bulk-ingest photos with their captions. Resumable: rerun it and stored photos are skipped."""
    from service.cli.ingest import run_ingest

    run_ingest(
        source, None, server=server, jobs=jobs, max_captions=max_captions, refused_out=refused
    )


@app.command()
def demo(
    server: str | None = typer.Option(None, help="URL of a running server; default: local"),
) -> None:
    """Ingest the offline demo corpus (photos bundled with scikit-image, captions by us)."""
    from service.cli.ingest import run_demo

    run_demo(server)


@app.command()
def evaluate(
    data: Path = typer.Option(..., "--data", help="precomputed folder or manifest.jsonl"),
    split: str = typer.Option(..., "--split", help="split name, e.g. dev, test, testall (COCO)"),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="our checkpoint (default: the shipped model)"
    ),
    json_out: Path | None = typer.Option(None, "--json", help="write the metrics JSON here"),
    modes: str = typer.Option(
        "pooled,two_stage,exhaustive", help="comma-separated: pooled, two_stage, exhaustive"
    ),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N"),
    ks: str = typer.Option("10,50,100,200", "--ks", help="two-stage shortlist sizes"),
    scores: Path | None = typer.Option(
        None, "--scores", help="write the exhaustive score matrices here (.npz)"
    ),
    without_zero_shot: bool = typer.Option(
        False, "--without-zero-shot", help="also rank with the zero-shot channel off (same run)"
    ),
) -> None:
    """Recall@K of pooled, exhaustive and two-stage ranking (K=10/50/100/200) on a split.

    A model without shortlist heads (an imported official one) is ranked by its reranker's
    score alone (CAMP's or IMRAM's): `--modes exhaustive` then gives the official evaluation's
    figures.
    """
    from service.cli.evaluate import run_evaluate

    run_evaluate(
        data,
        split,
        checkpoint,
        json_out,
        modes.split(","),
        device,
        ks=ks,
        scores_out=scores,
        without_zero_shot=without_zero_shot,
    )


@app.command()
def calibrate(
    data: Path = typer.Option(..., "--data", help="precomputed folder or manifest.jsonl"),
    split: str = typer.Option("dev", "--split", help="split to fit on (dev; never a test split)"),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="our checkpoint (default: the shipped model)"
    ),
    out: Path | None = typer.Option(
        None, "--out", help="write the calibrated checkpoint here (default: in place)"
    ),
    candidates: int = typer.Option(100, min=2, help="shortlist size per query (the service's)"),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N"),
    json_out: Path | None = typer.Option(None, "--json", help="write the reliability report here"),
    check: bool = typer.Option(
        False, "--check", help="only measure the stored maps on this split (e.g. coco-mini)"
    ),
) -> None:
    """Fit match probabilities (Platt maps per direction and mode) on a dev split and store them
    in the checkpoint, so a search's `score` and `min_score` mean P(match) reranked or not.

    With --check nothing is fitted or stored: the reliability of the checkpoint's own maps on
    the split is printed (how they transfer to another domain)."""
    from service.cli.calibrate import run_calibrate

    run_calibrate(data, split, checkpoint, out, candidates, device, json_out, check=check)


@app.command("zero-shot")
def zero_shot(
    weight: float = typer.Option(..., "--weight", min=0.0, help="w: fused = trained + w zs"),
    temperature: float = typer.Option(..., "--temperature", min=1e-6, help="T of the softmax"),
    version: str = typer.Option(..., "--version", help="the new model version"),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="our checkpoint (default: the shipped model)"
    ),
    out: Path | None = typer.Option(None, "--out", help="write here (default: in place)"),
    prompt: str = typer.Option("a photo of a {}.", "--prompt", help="class-name prompt"),
    chosen_by: str = typer.Option("", "--chosen-by", help="how w and T were chosen (recorded)"),
) -> None:
    """Add the zero-shot channel (the ImageNet classifier's predictions named in MiniLM's
    sentence space, fused into both stages) to a checkpoint as a new model version.

    Choose w and T on dev with bench/zero_shot_channel.py; then run `camp-search calibrate`
    on the result (the old maps were fitted on other scores and are removed)."""
    from service.cli.zero_shot import run_zero_shot

    run_zero_shot(
        checkpoint,
        out,
        weight=weight,
        temperature=temperature,
        prompt=prompt,
        version=version,
        chosen_by=chosen_by,
    )


@app.command("import-checkpoint")
def import_checkpoint(
    official: Path = typer.Argument(..., help="the official CAMP or IMRAM checkpoint (*.pth.tar)"),
    vocab: Path = typer.Option(
        ..., "--vocab", help="its vocabulary: the official .pkl or SCAN's JSON (word2idx)"
    ),
    out: Path = typer.Option(..., "--out", help="where to write our checkpoint (MODEL.pt)"),
    extractor: str | None = typer.Option(
        None,
        help="detectron2, grid or precomputed (evaluation only); default: the one whose "
        "features fit the weights (2048-d: detectron2)",
    ),
    version: str | None = typer.Option(None, help="model version (default: official-<file>)"),
    min_boxes: int = typer.Option(36, min=1, help="detectron2: fewest boxes per image"),
    max_boxes: int = typer.Option(36, min=1, help="detectron2: most boxes per image"),
    detectron2_config: Path | None = typer.Option(
        None, help="detectron2: its config yaml, recorded (the serving settings may override)"
    ),
    detectron2_weights: Path | None = typer.Option(
        None, help="detectron2: the Visual Genome weights, recorded (settings may override)"
    ),
) -> None:
    """Convert an official CAMP or IMRAM checkpoint and vocabulary into a checkpoint the
    service loads.

    The layout tells which model the file holds; the result records its scorer ("camp",
    "imram" with the run's IMRAM options) and the extractor its weights expect. It has no
    shortlist heads (train them with model/configs/train_heads_imported.json) and ranks by
    its scorer alone.
    """
    from service.cli.import_checkpoint import run_import_checkpoint

    run_import_checkpoint(
        official,
        vocab,
        out,
        extractor=extractor,
        version=version,
        min_boxes=min_boxes,
        max_boxes=max_boxes,
        detectron2_files={"config_file": detectron2_config, "weights": detectron2_weights},
    )


@app.command()
def train(
    config: Path = typer.Option(
        ..., "--config", help="training preset (model/configs/train_*.json)"
    ),
    out: Path | None = typer.Option(None, "--out", help="run folder (default: from the config)"),
    resume: bool = typer.Option(True, help="continue from the run folder's last checkpoint"),
    seed: int | None = typer.Option(
        None, "--seed", help="override the preset's seed (repeat runs to measure seed noise)"
    ),
) -> None:
    """Train a retrieval model from a JSON preset; checkpoints, metrics log and best model."""
    from service.cli.train import run_train

    run_train(config, out, resume, seed=seed)

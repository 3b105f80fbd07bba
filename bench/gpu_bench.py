"""The reranker under concurrent queries, fp32 against bf16, on a GPU and/or the CPU.

Each query is one caption against K shortlisted photos (the text -> images reranker): the
shipped model, real coco-mini photos and captions, the service's `PairReranker` behind its
`MicroBatcher` with the service's default batch settings. For each device, precision and
concurrency level, `concurrency` clients submit queries back to back for `--seconds`; the
bench reports scored pairs/s and per-query latency p50/p99, then the ratios bf16/fp32 and
cuda/cpu (where both ran). `--train-batches` adds one camp_official training step per batch
size at the preset's real sizes (random features) on the first device: its time and, on CUDA,
its peak memory.

    python bench/gpu_bench.py --devices cuda cpu --json bench/results/gpu_bench.json
    python bench/gpu_bench.py --devices cpu --concurrency 1 8 --k 20 --photos 8 --seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# bench/service.py is named like the `service` package: run as a script, this folder is first
# on sys.path and would shadow the package.
BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]

from model.architecture.precompute import CaptionPrecompute, ImagePrecompute  # noqa: E402
from model.retrieval import RetrievalModel  # noqa: E402
from model.vision.extractors.grid import GridExtractor  # noqa: E402
from service.runtime.settings import Settings  # noqa: E402
from service.search.batching import MicroBatcher  # noqa: E402
from service.search.rerank import PairReranker, RerankJob  # noqa: E402

SHARED_DIR = Path(os.environ.get("SHARED_DIR", BENCH_DIR.parents[1] / "shared"))
PRECISIONS = ("fp32", "bf16")
WARMUP_ROUNDS = 2


def coco_rows(count: int) -> list[dict]:
    manifest = SHARED_DIR / "data" / "coco-mini" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return [{**row, "image": manifest.parent / row["image"]} for row in rows[:count]]


def region_features(rows: list[dict], device: str) -> np.ndarray:
    extractor = GridExtractor(device=device)
    photos = [Image.open(row["image"]).convert("RGB") for row in rows]
    return np.stack([f.features for f in extractor.extract(photos)]).astype(np.float16)


class Workload:
    """Per-item tensors on the model's device, as the service's LRUs hold them."""

    def __init__(self, model: RetrievalModel, regions: np.ndarray, captions: list[str]) -> None:
        images = model.precompute_images(regions)
        self.images: list[ImagePrecompute] = [images.select([i]) for i in range(len(images))]
        encoded = model.encode_texts(captions)
        self.captions: list[CaptionPrecompute] = [
            encoded.precompute.select([i]) for i in range(len(captions))
        ]
        self.rng = np.random.default_rng(0)

    def job(self, k: int) -> RerankJob:
        picked = self.rng.choice(len(self.images), size=k, replace=k > len(self.images))
        return RerankJob(
            images=tuple(self.images[i] for i in picked),
            captions=(self.captions[self.rng.integers(len(self.captions))],),
            shortlist_scores=np.sort(self.rng.uniform(0.1, 0.6, k)).astype(np.float32)[::-1],
        )


async def run_level(
    batcher: MicroBatcher, workload: Workload, concurrency: int, k: int, seconds: float
) -> dict:
    """`concurrency` clients, back to back, for `seconds` (each sends at least one query)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while True:
            job = workload.job(k)
            started = time.perf_counter()
            await batcher.submit(job)
            latencies.append(time.perf_counter() - started)
            if time.perf_counter() >= deadline:
                return

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    latency_ms = np.asarray(latencies) * 1000.0
    return {
        "concurrency": concurrency,
        "k": k,
        "queries": len(latencies),
        "seconds": wall,
        "pairs_per_s": len(latencies) * k / wall,
        "p50_ms": float(np.percentile(latency_ms, 50)),
        "p99_ms": float(np.percentile(latency_ms, 99)),
        "model_calls": batcher.batches_run,
    }


async def bench_precision(
    model: RetrievalModel,
    workload: Workload,
    args: argparse.Namespace,
    levels: list[dict],
    save: Callable[[], None],
) -> None:
    """Every concurrency level for one model, appended to `levels` (saved after each)."""
    defaults = Settings.model_fields
    for concurrency in args.concurrency:
        batcher = MicroBatcher(
            PairReranker(model),
            max_batch_size=defaults["batch_max_size"].default,
            max_wait_s=defaults["batch_max_wait_ms"].default / 1000.0,
            max_queue_size=max(defaults["queue_max_size"].default, concurrency),
            name="bench",
        )
        await batcher.start()
        try:
            for _ in range(WARMUP_ROUNDS):
                warmup = [batcher.submit(workload.job(args.k)) for _ in range(concurrency)]
                await asyncio.gather(*warmup)
            batcher.batches_run = 0
            level = await run_level(batcher, workload, concurrency, args.k, args.seconds)
        finally:
            await batcher.stop()
        levels.append(level)
        save()
        print(
            f"  {model.device.type:4s} {model.precision:4s} c={concurrency:3d} K={args.k}: "
            f"{level['pairs_per_s']:10.0f} pairs/s  p50 {level['p50_ms']:8.1f} ms  "
            f"p99 {level['p99_ms']:8.1f} ms  ({level['queries']} queries, "
            f"{level['model_calls']} calls)",
            flush=True,
        )


def train_step(device: torch.device, batch: int, chunk_pairs: int) -> dict:
    """One camp_official step (bf16 autocast on CUDA, as the recipe) at the preset's sizes."""
    from model.training.losses import bce_hardest_negative_loss
    from model.training.official import batch_logits
    from model.training.recipes import TrainConfig

    memory = _load_bench_module("train_memory")
    network = memory.preset_network(TrainConfig.load(memory.PRESET)).to(device)
    optimizer = torch.optim.Adam(network.camp.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    regions = torch.randn(batch, memory.REGIONS, network.spec.region_dim, generator=generator)
    lengths = torch.randint(8, 33, (batch,), generator=generator)
    ids = torch.randint(4, memory.VOCABULARY, (batch, 32), generator=generator)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with autocast:
        regions, ids = regions.to(device), ids.to(device)
        logits = batch_logits(network.camp, regions, ids, lengths, chunk_pairs)
    loss = bce_hardest_negative_loss(torch.sigmoid(logits.float()))
    loss.backward()
    optimizer.step()
    value = loss.item()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del network, optimizer, logits, loss
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result = {
        "device": device.type,
        "batch": batch,
        "pairs": batch * batch,
        "chunk_pairs": chunk_pairs,
        "seconds": seconds,
        "loss": value,
        "peak_gib": peak,
    }
    print(
        f"  train step {device.type} B={batch} chunk={chunk_pairs}: {seconds:.2f} s"
        + (f", peak {peak:.2f} GiB allocated" if peak is not None else ""),
        flush=True,
    )
    return result


def _load_bench_module(name: str):
    """A sibling bench script as a module (this folder is off sys.path, see above)."""
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ratios(levels: dict[str, dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """bf16/fp32 per device and cuda/cpu per precision, for the levels both sides finished."""

    def compare(top: list[dict], bottom: list[dict], **label: str) -> list[dict]:
        base = {level["concurrency"]: level for level in bottom}
        return [
            {
                **label,
                "concurrency": level["concurrency"],
                "pairs_per_s": level["pairs_per_s"] / base[level["concurrency"]]["pairs_per_s"],
                "p50": level["p50_ms"] / base[level["concurrency"]]["p50_ms"],
            }
            for level in top
            if level["concurrency"] in base
        ]

    out: dict[str, list[dict]] = {"bf16_over_fp32": [], "cuda_over_cpu": []}
    for device, runs in levels.items():
        if "fp32" in runs and "bf16" in runs:
            out["bf16_over_fp32"] += compare(runs["bf16"], runs["fp32"], device=device)
    if "cuda" in levels and "cpu" in levels:
        for precision in PRECISIONS:
            if precision in levels["cuda"] and precision in levels["cpu"]:
                out["cuda_over_cpu"] += compare(
                    levels["cuda"][precision], levels["cpu"][precision], precision=precision
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=["cuda"], choices=["cuda", "cpu"])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--k", type=int, default=100, help="candidates per query")
    parser.add_argument("--photos", type=int, default=100, help="coco-mini photos to draw from")
    parser.add_argument("--seconds", type=float, default=3.0, help="per level")
    parser.add_argument(
        "--train-batches", type=int, nargs="*", default=[], help="on the first of --devices"
    )
    parser.add_argument("--chunk-pairs", type=int, default=2048)
    parser.add_argument("--json", type=Path, help="rewritten after every level (a cut run keeps)")
    args = parser.parse_args()
    if "cuda" in args.devices and not torch.cuda.is_available():
        sys.exit("--devices cuda: torch sees no CUDA device")
    rows = coco_rows(args.photos)
    captions = [caption for row in rows for caption in row["captions"]]
    regions = region_features(rows, "cuda" if "cuda" in args.devices else "cpu")
    result = {
        "host": platform.node(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "photos": args.photos,
        "seconds_per_level": args.seconds,
        "levels": {},
        "ratios": {},
        "train": [],
    }

    def save() -> None:
        result["ratios"] = ratios(result["levels"])
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")

    for device in args.devices:
        for precision in args.precisions:
            model = RetrievalModel.load(device=device, precision=precision)
            workload = Workload(model, regions, captions)
            done = result["levels"].setdefault(device, {}).setdefault(precision, [])
            asyncio.run(bench_precision(model, workload, args, done, save))
        if device == args.devices[0]:
            for batch in args.train_batches:
                result["train"].append(train_step(torch.device(device), batch, args.chunk_pairs))
                save()
    save()
    for name, found in result["ratios"].items():
        for row in found:
            label = row.get("device") or row.get("precision")
            print(
                f"{name} ({label}) c={row['concurrency']:3d}: pairs/s x{row['pairs_per_s']:.2f}, "
                f"p50 x{row['p50']:.2f}"
            )


if __name__ == "__main__":
    main()

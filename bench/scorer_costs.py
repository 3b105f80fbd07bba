"""Cost of every registered second-stage scorer on the same pairs: FLOPs per pair (counted),
time per pair (measured), and the bytes one stored image / caption takes.

    python bench/scorer_costs.py [--device cuda] [--embed-size 1024] [--regions 36]
        [--images 5] [--captions 40] [--json results.json]

Each scorer is built from the registry (model/architecture/rerankers.py) at one size, with
random weights (neither cost depends on them), and scores the same Ni x Nc block of random
regions and captions (lengths 8..14 tokens, padded and masked) through its pair scorer over
per-item tensors (`score_grid`, what the reranker and evaluation run). FLOPs are counted by
torch.utils.flop_counter (matrix products only: mm/bmm/addmm/baddbmm/einsum's products, two
FLOPs per multiply-add; softmax, norms and gates are left out, so the count is a floor). Time
is the best of REPEATS after a warm-up; the ratios to the first scorer are printed.
Stored bytes come from each scorer's per-item tensor type (`bytes_of_one`), in float16 and
float32, for an image of `--regions` regions and a caption of 12 words.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.architecture.rerankers import registered_rerankers, reranker_kind
from model.checkpoints.config import CampConfig

VOCAB = 8481
CAPTION_TOKENS = 14  # at most <start> + 12 words + <end>
STORED_CAPTION_WORDS = 12
REPEATS = 3


def _timed(function: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Best of REPEATS wall times after one warm-up."""
    function()
    best = float("inf")
    for _ in range(REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def _inputs(images: int, captions: int, regions: int, img_dim: int):
    generator = torch.Generator().manual_seed(1)
    features = torch.relu(torch.randn(images, regions, img_dim, generator=generator))
    token_ids = torch.randint(4, VOCAB, (captions, CAPTION_TOKENS), generator=generator)
    lengths = torch.randint(
        CAPTION_TOKENS - 6, CAPTION_TOKENS + 1, (captions,), generator=generator
    )
    return features, token_ids, lengths


def run(device: torch.device, embed_size: int, regions: int, images: int, captions: int) -> dict:
    config = CampConfig(vocab_size=VOCAB, word_dim=300, embed_size=embed_size, img_dim=2048)
    features, token_ids, lengths = _inputs(images, captions, regions, config.img_dim)
    results: dict = {}
    for name in registered_rerankers():
        kind = reranker_kind(name)
        torch.manual_seed(0)
        model = kind.build_model(config).to(device).eval()
        scorer = kind.precomputed(model.scorer)
        with torch.inference_mode():
            image_items = scorer.precompute_images(model.image_encoder(features.to(device)))
            caption_items = scorer.precompute_captions(
                model.text_encoder(token_ids.to(device), lengths)
            )
            counter = FlopCounterMode(display=False)
            with counter:
                scores = scorer.score_grid(image_items, caption_items)
            seconds = _timed(
                lambda s=scorer, i=image_items, c=caption_items: s.score_grid(i, c), device
            )
        pairs = scores.numel()
        results[name] = {
            "pairs": pairs,
            "matmul_mflops_per_pair": counter.get_total_flops() / pairs / 1e6,
            "ms_per_pair": 1e3 * seconds / pairs,
            "stored_image_bytes_fp16": kind.image_precompute.bytes_of_one(regions, embed_size, 2),
            "stored_image_bytes_fp32": kind.image_precompute.bytes_of_one(regions, embed_size, 4),
            "stored_caption_bytes_fp16": kind.caption_precompute.bytes_of_one(
                STORED_CAPTION_WORDS, embed_size, 2
            ),
            "stored_caption_bytes_fp32": kind.caption_precompute.bytes_of_one(
                STORED_CAPTION_WORDS, embed_size, 4
            ),
            "parameters": sum(p.numel() for p in model.scorer.parameters()),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--embed-size", type=int, default=1024)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--captions", type=int, default=40)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    results = run(device, args.embed_size, args.regions, args.images, args.captions)
    first = next(iter(results.values()))
    for name, row in results.items():
        print(
            f"{name}: {row['matmul_mflops_per_pair']:.1f} MFLOP/pair "
            f"(x{row['matmul_mflops_per_pair'] / first['matmul_mflops_per_pair']:.2f}), "
            f"{row['ms_per_pair']:.3f} ms/pair (x{row['ms_per_pair'] / first['ms_per_pair']:.2f}), "
            f"stored image {row['stored_image_bytes_fp16'] / 1024:.0f} KiB fp16, "
            f"caption {row['stored_caption_bytes_fp16'] / 1024:.0f} KiB fp16, "
            f"scorer parameters {row['parameters']:,}"
        )
    report = {
        "device": str(device),
        "embed_size": args.embed_size,
        "regions": args.regions,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "results": results,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

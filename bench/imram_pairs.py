"""Per-pair cost of IMRAM scoring: the official layout (a Python loop over captions, each
caption against its images, as `xattn_score_*_IMRAM` does) against ours (every pair of a call in
one batch per step, model/architecture/imram.py), at the default size (d=1024, 36 regions,
captions of 6-12 words, K=3, full IMRAM). Both must give the same scores.

    python bench/imram_pairs.py [--device cuda] [--json results.json]

Shapes: the image->caption reranker's 1 image x K captions (the official loop runs K times),
and an evaluation block of N images x M captions (M iterations). Weights are random (timing
does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model.architecture.imram import ImramModel, ImramOptions
from model.architecture.imram_precompute import ImramPrecomputedScorer
from model.checkpoints.config import CampConfig

REGIONS = 36
CAPTION_TOKENS = 14  # at most <start> + 12 words + <end>
AGREEMENT_TOLERANCE = 1e-5
REPEATS = 3


def _timed(
    function: Callable[[], torch.Tensor], device: torch.device
) -> tuple[float, torch.Tensor]:
    """Best of REPEATS wall times (after one warm-up) and the last result."""
    result = function()
    best = float("inf")
    for _ in range(REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best, result


def _official_layout(model: ImramModel, regions, words, word_mask) -> torch.Tensor:
    """[Ni, Nc]: one caption at a time, trimmed to its length, against every image."""
    columns = []
    for caption in range(words.shape[0]):
        length = int(word_mask[caption].sum())
        one = words[caption : caption + 1, :length]
        columns.append(model.scorer(regions, one, word_mask[caption : caption + 1, :length])[:, 0])
    return torch.stack(columns, dim=1)


def run(device: torch.device, images: int, captions: int) -> dict:
    torch.manual_seed(0)
    config = CampConfig(vocab_size=8481, word_dim=300, embed_size=1024, img_dim=2048)
    model = ImramModel.from_config(config, ImramOptions(mode="full")).to(device).eval()
    scorer = ImramPrecomputedScorer(model.scorer)
    generator = torch.Generator().manual_seed(1)
    features = torch.relu(torch.randn(images, REGIONS, 2048, generator=generator)).to(device)
    token_ids = torch.randint(4, 8481, (captions, CAPTION_TOKENS), generator=generator)
    # Captions of 8..14 tokens, so that the batched form pads and masks them.
    lengths = torch.randint(
        CAPTION_TOKENS - 6, CAPTION_TOKENS + 1, (captions,), generator=generator
    )
    results: dict = {}
    with torch.inference_mode():
        regions = model.encode_images(features)
        text = model.encode_text(token_ids.to(device), lengths)
        image_items = scorer.precompute_images(regions)
        caption_items = scorer.precompute_captions(text)
        shapes = {
            f"1 image x {captions} captions (i2t rerank)": (slice(0, 1), slice(None)),
            f"{images} images x {captions} captions (eval block)": (slice(None), slice(None)),
        }
        for name, (image_rows, caption_rows) in shapes.items():
            picked_regions = regions[image_rows]
            picked_words, picked_mask = text.words[caption_rows], text.mask[caption_rows]
            official_s, official = _timed(
                lambda r=picked_regions, w=picked_words, m=picked_mask: _official_layout(
                    model, r, w, m
                ),
                device,
            )
            batched_s, batched = _timed(
                lambda i=image_rows, c=caption_rows: scorer.score_grid(
                    image_items.select(i), caption_items.select(c)
                ),
                device,
            )
            pairs = official.numel()
            difference = float((official - batched).abs().max())
            results[name] = {
                "pairs": pairs,
                "official_layout_ms_per_pair": 1e3 * official_s / pairs,
                "batched_ms_per_pair": 1e3 * batched_s / pairs,
                "speedup": official_s / batched_s,
                "max_abs_difference": difference,
                "agree": difference <= AGREEMENT_TOLERANCE,
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--captions", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    results = run(device, args.images, args.captions)
    for name, row in results.items():
        print(
            f"{name}: official layout {row['official_layout_ms_per_pair']:.2f} ms/pair, "
            f"batched {row['batched_ms_per_pair']:.2f} ms/pair, "
            f"x{row['speedup']:.2f}; max |diff| {row['max_abs_difference']:.2e}"
        )
    report = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "results": results,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    if not all(row["agree"] for row in results.values()):
        sys.exit("the two layouts disagree")


if __name__ == "__main__":
    main()

"""Pair scoring against its arithmetic floor: the reranker's per-pair math (the precompute
split's `_score`) at the shipped model's sizes, before and after, in one run.

    python bench/pair_floor.py [--baseline 17d28bd] [--threads 2] [--json pair_floor.json]

The floor of K pairs is (FLOPs of one pair x K) / (this machine's GEMM peak), with the FLOPs
counted analytically from the shapes (every matmul of `_score`: cross attention, the stage-2
kernels, P = self-attention x cross-attention, the Gram norms and gates, the fusion's second
half, the pooling MLP's first layer and heads, the score MLP; element-wise work is listed apart
and not counted in the floor) and the peak measured as the median of large fp32 `torch.matmul`
calls on `--threads` threads. "Before" is `model/architecture/precompute.py` as it was at
`--baseline` (read with `git show`, imported beside the current one, same weights); "after" is
the current tree. Both score the service's layout: 1 caption (repeated as a view) x K images,
`score_pairs(trim=False)` as `RetrievalModel.camp_logits` calls it. The machine may be shared,
so every figure is the median of `--repeats` interleaved runs, and the load average is written.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import gemm_peak, interleaved, module_at

from model.retrieval import RetrievalModel

REGIONS = 49  # 7 x 7 grid of EfficientNet-Lite0 at 224
CAPTION = "a man riding a wave on top of a surfboard in the ocean"  # ~14 tokens
DEFAULT_BASELINE = "17d28bd"


def pair_flops(regions: int, words: int, dim: int, heads: int) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of one pair's matmuls in `_score`, by step."""
    r, w, d, h = regions, words, dim, heads
    return {
        "cross_attention_logits": 2 * (2 * w * r * d),  # t2v and v2t
        "stage2_kernels": 2 * (r * w * w + r * r * w + w * r * r + w * w * r),
        "mix_p": 2 * (r * r * w + w * w * r),
        "region_word_dots": 2 * r * w * d,
        "gram_norms": 2 * (r * w * w + w * r * r),
        "gates_rowdots": 2 * (2 * r * w),
        "fusion_second_half": 2 * (2 * r * w * d),
        "pool_hidden": 2 * (r + w) * d * d,
        "pool_heads": 2 * (r + w) * d * h,
        "pool_weighted_sum": 2 * h * (r + w) * d,
        "score_mlp": 2 * (2 * d * d + d),
    }


def elementwise_ops(regions: int, words: int, dim: int, heads: int) -> int:
    """Rough element-wise operations of one pair (softmaxes, masks, sigmoid, relu, residual),
    reported beside the floor, not in it."""
    r, w, d = regions, words, dim
    softmaxes = 4 * (2 * r * w + r * r + w * w + heads * (r + w))
    fusion = 5 * (r + w) * d
    return softmaxes + fusion


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git ref of 'before'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="100,1000,10000", help="K values")
    parser.add_argument("--repeats", type=int, default=7, help="runs per K (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_before = list(os.getloadavg())
    peak = gemm_peak(args.threads, repeats=9)
    model = RetrievalModel.load(device="cpu")
    scorer = model.scorer
    then = module_at(args.baseline, "model/architecture/precompute.py", "precompute_then")
    baseline = then.PrecomputedScorer(scorer.scorer)
    d = scorer.scorer.embed_size
    heads = scorer.scorer.num_heads
    caption = model.encode_texts([CAPTION]).precompute
    words = int(caption.lengths[0])
    flops = pair_flops(REGIONS, words, d, heads)
    per_pair = sum(flops.values())
    print(
        f"GEMM peak {peak:.1f} GFLOP/s on {args.threads} threads; one pair (R={REGIONS}, "
        f"L={words}, d={d}, H={heads}): {per_pair / 1e6:.2f} MFLOP in matmuls "
        f"(+ ~{elementwise_ops(REGIONS, words, d, heads) / 1e6:.2f} M element-wise ops)"
    )

    sizes = [int(k) for k in args.sizes.split(",")]
    unique = min(max(sizes), 1000)
    rng = np.random.default_rng(args.seed)
    features = rng.random((unique, REGIONS, model.region_dim), dtype=np.float32)
    pool = model.precompute_images(features)
    rows: dict[str, dict] = {}
    for k in sizes:
        tiles = -(-k // unique)  # K over 1,000: the same 1,000 images repeated
        images = (type(pool).cat([pool] * tiles) if tiles > 1 else pool).select(slice(0, k))
        captions = caption.repeat(k)
        ways: dict[str, Callable[[], torch.Tensor]] = {
            "before": lambda s=baseline, i=images, c=captions: s.score_pairs(i, c, trim=False),
            "after": lambda s=scorer, i=images, c=captions: s.score_pairs(i, c, trim=False),
        }
        repeats = args.repeats if k <= 1000 else max(3, args.repeats // 2)
        with torch.inference_mode():
            seconds, scores = interleaved(ways, repeats)
        floor_s = per_pair * k / (peak * 1e9)
        row: dict = {"floor_ms": 1e3 * floor_s}
        for name in ways:
            median = statistics.median(seconds[name])
            row[name] = {
                "median_ms": 1e3 * median,
                "all_ms": [round(1e3 * s, 3) for s in seconds[name]],
                "times_floor": median / floor_s,
                "achieved_fraction_of_floor": floor_s / median,
                "gflops": per_pair * k / median / 1e9,
            }
        row["speedup"] = row["before"]["median_ms"] / row["after"]["median_ms"]
        row["max_abs_diff"] = float((scores["before"] - scores["after"]).abs().max())
        rows[str(k)] = row
        print(
            f"K={k:6d}: floor {row['floor_ms']:8.2f} ms | before {row['before']['median_ms']:8.2f}"
            f" ms ({row['before']['times_floor']:5.1f}x floor) | after "
            f"{row['after']['median_ms']:8.2f} ms ({row['after']['times_floor']:5.1f}x floor) | "
            f"speedup {row['speedup']:5.2f}x | max|before-after| {row['max_abs_diff']:.1e}"
        )

    figures = {
        "baseline": args.baseline,
        "threads": args.threads,
        "gemm_peak_gflops": peak,
        "torch": torch.__version__,
        "sizes": {"regions": REGIONS, "words": words, "embed_size": d, "heads": heads},
        "pair_flops": flops,
        "pair_flops_total": per_pair,
        "pair_elementwise_ops": elementwise_ops(REGIONS, words, d, heads),
        "repeats": args.repeats,
        "statistic": "median of interleaved runs",
        "load_average_before_after": [load_before, list(os.getloadavg())],
        "results": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

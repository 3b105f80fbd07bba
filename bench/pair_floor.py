"""Pair scoring against its arithmetic floor: the reranker's per-pair math at the shipped
model's sizes, before and after, in one run.

    python bench/pair_floor.py [--checkpoint FILE] [--baseline REF] [--threads 2] [--json out.json]

The floor of K pairs is (FLOPs of one pair x K) / (this machine's GEMM peak), with the FLOPs
counted analytically from the shapes and the peak measured as the median of large fp32
`torch.matmul` calls on `--threads` threads; element-wise work is listed apart and not counted
in the floor.

* IMRAM (the shipped default, `default-v4`): every matmul of `ImramScorer`'s inference path
  (the first products shared by both directions, the attention of later steps, the attended
  context or its Gram form, the memory update's context half α (C W_cᵀ) and query projection).
  "Before" is model/architecture/imram.py as it was at `--baseline` (default 072379f, the
  last commit before that path), read with `git show`, imported beside the current one, with
  the same weights.
* CAMP (`--checkpoint model/weights/camp.pt`): every matmul of the precompute split's `_score`
  (cross attention, the stage-2 kernels, P = self-attention x cross-attention, the Gram norms
  and gates, the fusion's second half, the pooling MLP's first layer and heads, the score MLP);
  "before" is model/architecture/precompute.py at `--baseline` (default 17d28bd).

Both score the service's layout: 1 caption (repeated as a view) x K images,
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

# The repository before this folder: bench/service.py would shadow the `service` package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import gemm_peak, interleaved, module_at

from model.architecture.imram import ImramScorer, attends_by_gram
from model.architecture.imram_precompute import ImramPrecomputedScorer
from model.retrieval import RetrievalModel
from service.runtime.heap import fix_mmap_threshold, set_top_pad
from service.runtime.settings import Settings

REGIONS = 49  # 7 x 7 grid of EfficientNet-Lite0 at 224
CAPTION = "a man riding a wave on top of a surfboard in the ocean"  # ~14 tokens
DEFAULT_BASELINES = {"camp": "17d28bd", "imram": "072379f"}


def pair_flops(regions: int, words: int, dim: int, heads: int) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of one pair's matmuls in CAMP's `_score`, by step."""
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
    """Rough element-wise operations of one CAMP pair (softmaxes, masks, sigmoid, relu,
    residual), reported beside the floor, not in it."""
    r, w, d = regions, words, dim
    softmaxes = 4 * (2 * r * w + r * r + w * w + heads * (r + w))
    fusion = 5 * (r + w) * d
    return softmaxes + fusion


def imram_pair_flops(
    regions: int, words: int, dim: int, steps: int, directions: tuple[str, ...]
) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of one IMRAM pair's matmuls in
    `ImramScorer._run_direction_inference`, by kind, summed over the mode's directions."""
    flops = {"first_products": 2 * regions * words * dim}
    sides = {"text": (words, regions), "image": (regions, words)}
    for name in directions:
        queries, contexts = sides[name]
        flops[f"{name}_attention_later_steps"] = (steps - 1) * 2 * queries * contexts * dim
        if attends_by_gram(contexts, queries, dim, steps):
            flops[f"{name}_gram"] = 2 * contexts * contexts * dim
            flops[f"{name}_attended_norms_by_gram"] = steps * 2 * queries * contexts * contexts
        else:
            flops[f"{name}_attended"] = steps * 2 * queries * contexts * dim
        flops[f"{name}_update_context_half"] = (steps - 1) * 2 * queries * contexts * 2 * dim
        flops[f"{name}_update_query_half"] = max(0, steps - 2) * 2 * queries * dim * 2 * dim
    return flops


def imram_elementwise_ops(regions: int, words: int, dim: int, steps: int) -> int:
    """Rough element-wise operations of one full-IMRAM pair (attention norms, masks and
    softmaxes, cosines, the memory update's sigmoids and blend), reported beside the floor."""
    attention = 2 * steps * 8 * regions * words
    update = (steps - 1) * 10 * (regions + words) * dim
    return attention + update


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", type=Path, help="model file (default: the shipped default model)"
    )
    parser.add_argument("--baseline", help="git ref of 'before' (default: per scorer, above)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="100,1000,10000", help="K values")
    parser.add_argument("--repeats", type=int, default=7, help="runs per K (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--glibc-allocator",
        action="store_true",
        help="keep glibc's own malloc settings (default: the service's mmap threshold and top "
        "pad, service/runtime/heap.py, so both ways run on the heap the server gives them)",
    )
    args = parser.parse_args(argv)
    if not args.glibc_allocator:
        defaults = Settings.model_fields
        fix_mmap_threshold(defaults["malloc_mmap_threshold_kib"].default * 1024)
        set_top_pad(defaults["malloc_top_pad_kib"].default * 1024)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_before = list(os.getloadavg())
    peak = gemm_peak(args.threads, repeats=9)
    model = RetrievalModel.load(args.checkpoint, device="cpu")
    scorer = model.scorer
    caption = model.encode_texts([CAPTION]).precompute
    words = int(caption.lengths[0])
    d = scorer.scorer.embed_size
    if isinstance(scorer.scorer, ImramScorer):
        kind, options = "imram", scorer.scorer.options
        baseline_ref = args.baseline or DEFAULT_BASELINES[kind]
        then = module_at(baseline_ref, "model/architecture/imram.py", "imram_then")
        before_scorer = then.ImramScorer(embed_size=d, options=options)
        before_scorer.load_state_dict(scorer.scorer.state_dict())
        baseline = ImramPrecomputedScorer(before_scorer)
        flops = imram_pair_flops(REGIONS, words, d, options.iteration_steps, options.directions)
        elementwise = imram_elementwise_ops(REGIONS, words, d, options.iteration_steps)
        shape = {"steps": options.iteration_steps, "mode": options.mode}
    else:
        kind, heads = "camp", scorer.scorer.num_heads
        baseline_ref = args.baseline or DEFAULT_BASELINES[kind]
        then = module_at(baseline_ref, "model/architecture/precompute.py", "precompute_then")
        baseline = then.PrecomputedScorer(scorer.scorer)
        flops = pair_flops(REGIONS, words, d, heads)
        elementwise = elementwise_ops(REGIONS, words, d, heads)
        shape = {"heads": heads}
    per_pair = sum(flops.values())
    print(
        f"GEMM peak {peak:.1f} GFLOP/s on {args.threads} threads; one {kind} pair (R={REGIONS}, "
        f"L={words}, d={d}, {shape}): {per_pair / 1e6:.2f} MFLOP in matmuls "
        f"(+ ~{elementwise / 1e6:.2f} M element-wise ops)"
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
        "scorer": kind,
        "checkpoint": str(args.checkpoint) if args.checkpoint else "shipped default",
        "baseline": baseline_ref,
        "threads": args.threads,
        "allocator": "glibc" if args.glibc_allocator else "service (mmap threshold, top pad)",
        "gemm_peak_gflops": peak,
        "torch": torch.__version__,
        "sizes": {"regions": REGIONS, "words": words, "embed_size": d, **shape},
        "pair_flops": flops,
        "pair_flops_total": per_pair,
        "pair_elementwise_ops": elementwise,
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

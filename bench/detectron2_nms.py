"""Bottom-up-attention box confidence (class-wise NMS over 1,600 Visual Genome classes): the
per-class Python loop the detectron2 extractor used to run against the batched pass it runs
now (`class_nms_keep`), on 300 proposals x 1,600 classes, in one run.

Both are first checked to give the same confidences (the same boxes kept in every class),
then timed interleaved. Prints the ratio and writes JSON:

    .venv/bin/python bench/detectron2_nms.py --json bench/results/detectron2_nms.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from model.vision.extractors.detectron2 import (  # noqa: E402
    DEFAULT_NMS_THRESHOLD,
    NUM_VG_CLASSES,
    max_class_confidence,
    nms,
)

PROPOSALS = 300  # BUTD's RPN post-NMS top-k at test time


def per_class_loop_confidence(
    boxes: np.ndarray, class_scores: np.ndarray, threshold: float
) -> np.ndarray:
    """The extractor's old rule: one greedy NMS call per class, in Python."""
    confidence = np.zeros(class_scores.shape[0], dtype=np.float32)
    for c in range(class_scores.shape[1]):
        scores = class_scores[:, c]
        keep = nms(boxes, scores, threshold)
        confidence[keep] = np.maximum(confidence[keep], scores[keep])
    return confidence


def detector_like_inputs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Proposals crowded on a 600 x 1000 image and softmax scores over 1,600 classes + bg."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 800, (PROPOSALS, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(16, 300, (PROPOSALS, 2))], axis=1)
    logits = rng.normal(0, 2, (PROPOSALS, NUM_VG_CLASSES + 1))
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return boxes.astype(np.float32), scores[:, :-1].astype(np.float32)  # background last


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    boxes, scores = detector_like_inputs(seed=0)
    threshold = DEFAULT_NMS_THRESHOLD
    batched = max_class_confidence(boxes, scores, threshold)
    loop = per_class_loop_confidence(boxes, scores, threshold)
    np.testing.assert_array_equal(batched, loop)
    print(f"{PROPOSALS} boxes x {NUM_VG_CLASSES} classes: same confidences from both")

    samples: dict[str, list[float]] = {"per_class_loop": [], "batched": []}
    for _ in range(args.rounds):  # interleaved so that machine noise hits both alike
        samples["per_class_loop"].append(
            seconds(lambda: per_class_loop_confidence(boxes, scores, threshold))
        )
        samples["batched"].append(seconds(lambda: max_class_confidence(boxes, scores, threshold)))
    medians = {name: statistics.median(times) for name, times in samples.items()}
    ratio = medians["per_class_loop"] / medians["batched"]
    print(
        f"per-class loop {medians['per_class_loop'] * 1000:.0f} ms, "
        f"batched {medians['batched'] * 1000:.0f} ms per image: {ratio:.1f}x faster"
    )
    results = {
        "boxes": PROPOSALS,
        "classes": NUM_VG_CLASSES,
        "nms_threshold": threshold,
        "rounds": args.rounds,
        **{f"{name}_median_ms": value * 1000 for name, value in medians.items()},
        "ratio": ratio,
        "machine": platform.platform(),
        "numpy": np.__version__,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

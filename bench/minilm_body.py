"""Query-encoding latency of the MiniLM body: transformers' BertModel (model/text/minilm.py today)
against the hand-written BERT body it replaced, read from git history, in one run.

Both load the same package files; the bench first checks they give the same token features,
then times them interleaved (one query as the service encodes it, and a batch of 128 as the
training cache does). Prints ratios and writes JSON:

    .venv/bin/python bench/minilm_body.py --json bench/results/minilm_body.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from timing import module_at  # noqa: E402

from model.text.minilm import WordpieceTokenizer, load_minilm  # noqa: E402

# The last commit with the hand-written body (BertEncoder), then in model/minilm.py.
HAND_WRITTEN_COMMIT = "a142bc7"
QUERY = "a man riding a wave on top of a surfboard ."
BATCH_CAPTIONS = [
    "A dog runs across the green grass .",
    "Two children play football in a park near a lake , while their parents watch .",
    "a red double decker bus drives down a busy city street",
    "a plate with a sandwich , some chips and a pickle",
] * 32


def hand_written_loader(commit: str):
    """`load_minilm` of the old module, imported from `git show commit:model/minilm.py`."""
    return module_at(commit, "model/minilm.py", "hand_written_minilm").load_minilm


def time_calls(encoder, batch, repeats: int) -> list[float]:
    timings = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            encoder(batch.input_ids, batch.attention_mask)
            timings.append(time.perf_counter() - start)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default=HAND_WRITTEN_COMMIT)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    bodies = {"transformers": load_minilm(), "hand_written": hand_written_loader(args.commit)()}
    tokenizer = WordpieceTokenizer()
    cases = {"query_1": tokenizer([QUERY]), "batch_128": tokenizer(BATCH_CAPTIONS)}

    with torch.inference_mode():
        for name, batch in cases.items():
            a, b = (body(batch.input_ids, batch.attention_mask) for body in bodies.values())
            keep = batch.attention_mask.bool()
            gap = float((a[keep] - b[keep]).abs().max())
            print(f"{name}: max |difference| on real tokens {gap:.2e}")
            assert gap < 1e-4, "the two bodies disagree"

    results: dict[str, dict[str, float]] = {}
    for name, batch in cases.items():
        repeats = 20 if name == "query_1" else 2
        samples: dict[str, list[float]] = {body: [] for body in bodies}
        for body in bodies.values():
            time_calls(body, batch, 3)  # warm-up
        for _ in range(args.rounds):  # interleaved so that machine noise hits both alike
            for body_name, body in bodies.items():
                samples[body_name] += time_calls(body, batch, repeats)
        medians = {body: statistics.median(times) * 1000 for body, times in samples.items()}
        ratio = medians["transformers"] / medians["hand_written"]
        results[name] = {**{f"{k}_median_ms": v for k, v in medians.items()}, "ratio": ratio}
        print(
            f"{name}: transformers {medians['transformers']:.2f} ms, "
            f"hand-written {medians['hand_written']:.2f} ms, ratio {ratio:.2f}"
        )
    results["torch_threads"] = {"value": torch.get_num_threads()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

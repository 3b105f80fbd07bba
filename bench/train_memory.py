"""Memory of one camp_official training step: the direct B x B form against the chunked grid.

Counts the bytes autograd keeps for the backward (model/training/activation_memory.py) at the
preset's real sizes (d, region and word widths, vocabulary) but small batches, on any device,
fits bytes = a·B + b·B² for each form, and derives what batches of the preset need:

* direct: a·B + b·B² (every pair's activations at once);
* chunked: a·B + b·B² (per-item tensors, the B x B scores) + 2 x one block of `chunk_pairs`
  pairs (its recomputed activations and their gradients in the backward) + the parameters
  with gradients and Adam's two moments (16 bytes a parameter).

Activations are counted in fp32; under bf16 autocast most matmul inputs are kept at half
size, so the fp32 figures are an upper estimate. The figures are derived, not measured on a
GPU: bench/gpu_bench.py --train measures the peak on one.

    python bench/train_memory.py [--caption-tokens 32] [--json bench/results/train_memory.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from model.architecture.network import NetworkSpec, RetrievalNetwork
from model.architecture.precompute import PrecomputedScorer
from model.text.vocab import Vocabulary
from model.training.activation_memory import SavedTensorBytes
from model.training.official import DEFAULT_CHUNK_PAIRS, batch_logits
from model.training.recipes import TrainConfig

PRESET = Path(__file__).resolve().parents[1] / "model/configs/train_camp_official_f30k.json"
REGIONS = 36  # bottom-up-attention boxes per image
VOCABULARY = 8500  # about Flickr30K's training words seen 4 times or more
GIB = 2**30


def preset_network(config: TrainConfig) -> RetrievalNetwork:
    words = [f"w{i}" for i in range(VOCABULARY)]
    vocabulary = Vocabulary.build([" ".join(words)], min_count=1)
    return RetrievalNetwork(NetworkSpec.from_dict(config.network), vocabulary=vocabulary)


def kept_bytes(network: RetrievalNetwork, batch: int, tokens: int, chunk: int | None) -> int:
    """Bytes kept for the backward by one step's scores; chunk None: the direct form."""
    generator = torch.Generator().manual_seed(batch)
    regions = torch.randn(batch, REGIONS, network.spec.region_dim, generator=generator)
    ids = torch.randint(4, VOCABULARY, (batch, tokens), generator=generator)
    lengths = torch.full((batch,), tokens)
    with SavedTensorBytes(network) as saved:
        if chunk is None:
            network.camp(regions, ids, lengths)
        else:
            batch_logits(network.camp, regions, ids, lengths, chunk)
    return saved.total


def block_bytes(network: RetrievalNetwork, batch: int, tokens: int) -> int:
    """Bytes one un-checkpointed block of batch x batch pairs keeps (its per-item inputs too:
    an upper estimate of the pairs' share)."""
    generator = torch.Generator().manual_seed(batch)
    regions = torch.randn(batch, REGIONS, network.spec.region_dim, generator=generator)
    ids = torch.randint(4, VOCABULARY, (batch, tokens), generator=generator)
    camp = network.camp
    scorer = PrecomputedScorer(camp.scorer)
    images = scorer.precompute_images(camp.encode_images(regions))
    captions = scorer.precompute_captions(camp.encode_text(ids, torch.full((batch,), tokens)))
    with SavedTensorBytes(network) as saved:
        scorer.score_grid(images, captions)
    return saved.total


def fit(small: int, large: int, b_small: int, b_large: int) -> tuple[float, float]:
    """(a, b) of bytes = a·B + b·B² through two measurements."""
    ratio = b_large / b_small
    b = (large - ratio * small) / (b_large * b_large - ratio * b_small * b_small)
    return (small - b * b_small * b_small) / b_small, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caption-tokens", type=int, default=32, help="batch's longest caption")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--chunk-pairs", type=int, default=DEFAULT_CHUNK_PAIRS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = TrainConfig.load(PRESET)
    network = preset_network(config)
    tokens = args.caption_tokens
    direct = fit(kept_bytes(network, 2, tokens, None), kept_bytes(network, 4, tokens, None), 2, 4)
    chunked = fit(kept_bytes(network, 4, tokens, 1), kept_bytes(network, 8, tokens, 1), 4, 8)
    chunked = (chunked[0], max(0.0, chunked[1]))  # the B x B term is a few bytes: noise
    per_pair = block_bytes(network, 4, tokens) / 16
    parameters = sum(p.numel() for p in network.camp.parameters())
    fixed = 16 * parameters
    rows = []
    for batch in args.batches:
        direct_bytes = direct[0] * batch + direct[1] * batch * batch
        chunked_bytes = (
            chunked[0] * batch + chunked[1] * batch * batch + 2 * per_pair * args.chunk_pairs
        )
        rows.append(
            {
                "batch": batch,
                "pairs": batch * batch,
                "direct_gib": (direct_bytes + fixed) / GIB,
                "chunked_gib": (chunked_bytes + fixed) / GIB,
            }
        )
    result = {
        "derived": True,
        "device_measured_on": "cpu",
        "host": platform.node(),
        "caption_tokens": tokens,
        "regions": REGIONS,
        "chunk_pairs": args.chunk_pairs,
        "camp_parameters": parameters,
        "direct_bytes_per_item": direct[0],
        "direct_bytes_per_pair": direct[1],
        "chunked_bytes_per_item": chunked[0],
        "chunked_bytes_per_pair_kept": chunked[1],
        "block_bytes_per_pair": per_pair,
        "batches": rows,
    }
    print(
        f"per pair kept: direct {direct[1] / 2**20:.2f} MiB, chunked {chunked[1]:.0f} B "
        f"(+ one block of {args.chunk_pairs} pairs at {per_pair / 2**20:.2f} MiB a pair)"
    )
    for row in rows:
        print(
            f"B={row['batch']:4d} ({row['pairs']:6d} pairs): direct {row['direct_gib']:8.1f} GiB"
            f"   chunked {row['chunked_gib']:6.2f} GiB   "
            f"ratio {row['direct_gib'] / row['chunked_gib']:.0f}x"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

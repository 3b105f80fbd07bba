"""Query encoding and photo extraction against their arithmetic floors, before and after.

    python bench/encode_floor.py [--threads 2] [--repeats 15] [--json encode_floor.json]

Floors are FLOPs / this machine's GEMM peak (fp32 `torch.matmul` of 2048² matrices, median,
on `--threads` threads), FLOPs counted from the shapes:

* query encoding (`RetrievalModel.encode_texts` of one caption, the shipped model): MiniLM's
  linear layers (2 x weights x tokens) and attention (4 x L² x hidden per layer); the CAMP
  projection and per-caption tensors are counted too. Measured: the whole call (tokenising
  included) and the MiniLM body alone, each in fp32 and with `query_precision="bf16"` (bf16
  linear layers); both against the fp32 floor.
* photo extraction (`GridExtractor.extract` of one decoded coco-mini photo at 224 px): every
  convolution, counted by forward hooks (2 x output elements x in-channels/groups x k²).
  "before" is the network as trained (batch norms apart, NCHW); "after" the extractor's own
  (batch norms folded, channels-last). Fitting (PIL resize) is timed apart.

The machine may be shared: every figure is the median of `--repeats` interleaved runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from timing import gemm_peak, interleaved  # noqa: E402

from model.retrieval import RetrievalModel  # noqa: E402
from model.vision.efficientnet_lite import INPUT_SIZE, efficientnet_lite0  # noqa: E402
from model.vision.extractors.grid import GridExtractor, fit_image  # noqa: E402
from model.vision.images import decode_image  # noqa: E402

SHARED_DIR = Path(os.environ.get("SHARED_DIR", REPO_ROOT.parent / "shared"))
CAPTION = "a man riding a wave on top of a surfboard in the ocean"


def linear_flops(module: nn.Module, tokens: int) -> int:
    """2 x weights x tokens of every nn.Linear in `module`."""
    return sum(2 * m.weight.numel() * tokens for m in module.modules() if isinstance(m, nn.Linear))


def conv_flops(network: nn.Module, batch: torch.Tensor) -> int:
    """FLOPs of every Conv2d in one forward of `network.features(batch)`."""
    total = 0

    def count(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        total += 2 * output.numel() * (module.in_channels // module.groups) * k

    hooks = [m.register_forward_hook(count) for m in network.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            network.features(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def medians(ways: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each way, runs interleaved."""
    seconds, _ = interleaved(ways, repeats)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = list(os.getloadavg())
    peak = gemm_peak(args.threads)

    # Query encoding.
    model = RetrievalModel.load(device="cpu", query_precision="fp32")
    bf16 = RetrievalModel.load(device="cpu", query_precision="bf16")
    token_ids, _ = model.tokenize([CAPTION])
    tokens = len(token_ids[0])
    ids = torch.tensor(token_ids)
    encoder = model.network.camp.text_encoder
    backbone = encoder.backbone
    bf16_body = backbone.with_bf16_linears()  # the copy `query_precision="bf16"` runs
    bert = backbone.bert
    layers, hidden = bert.config.num_hidden_layers, bert.config.hidden_size
    body_flops = linear_flops(bert.encoder, tokens) + layers * 4 * tokens * tokens * hidden
    d = model.scorer.scorer.embed_size
    camp_flops = linear_flops(encoder.projection, tokens) + 2 * tokens * d * d * 6
    text_floor = (body_flops + camp_flops) / (peak * 1e9)
    with torch.inference_mode():
        text = medians(
            {
                "encode_texts": lambda: model.encode_texts([CAPTION], query=True),
                "minilm_body": lambda: backbone(ids, torch.ones_like(ids)),
                "encode_texts_bf16": lambda: bf16.encode_texts([CAPTION], query=True),
                "minilm_body_bf16": lambda: bf16_body(ids, torch.ones_like(ids)),
            },
            args.repeats,
        )
    print(
        f"GEMM peak {peak:.1f} GFLOP/s on {args.threads} threads\n"
        f"query encoding ({tokens} tokens): {(body_flops + camp_flops) / 1e6:.0f} MFLOP, floor "
        f"{1e3 * text_floor:.2f} ms"
    )
    for suffix, label in (("", "fp32"), ("_bf16", "bf16 linears")):
        whole, body = text[f"encode_texts{suffix}"], text[f"minilm_body{suffix}"]
        print(
            f"  {label}: encode_texts {1e3 * whole:.2f} ms ({whole / text_floor:.1f}x floor) | "
            f"MiniLM body {1e3 * body:.2f} ms ({body / text_floor:.1f}x floor)"
        )
    print(f"  bf16 speed-up: {text['encode_texts'] / text['encode_texts_bf16']:.2f}x whole call")

    # Photo extraction.
    manifest = SHARED_DIR / "data" / "coco-mini" / "manifest.jsonl"
    row = json.loads(manifest.read_text().splitlines()[0])
    photo = decode_image((manifest.parent / row["image"]).read_bytes()).image
    extractor = GridExtractor(device="cpu", batch_size=1)
    unfolded = efficientnet_lite0("imagenet")
    batch, _ = extractor._prepare([photo])
    flops = conv_flops(unfolded, batch)
    image_floor = flops / (peak * 1e9)
    with torch.inference_mode():
        image = medians(
            {
                "fit": lambda: fit_image(photo, INPUT_SIZE, extractor.fit),
                "network_before": lambda: unfolded.features(batch.contiguous()),
                "network_after": lambda: extractor.network.features(batch),
                "extract_after": lambda: extractor.extract([photo]),
            },
            args.repeats,
        )
    print(
        f"photo extraction ({photo.size[0]}x{photo.size[1]} -> {INPUT_SIZE}): "
        f"{flops / 1e6:.0f} MFLOP in convolutions, floor {1e3 * image_floor:.2f} ms | network "
        f"before {1e3 * image['network_before']:.2f} ms "
        f"({image['network_before'] / image_floor:.1f}x floor), after "
        f"{1e3 * image['network_after']:.2f} ms ({image['network_after'] / image_floor:.1f}x) "
        f"speed-up {image['network_before'] / image['network_after']:.2f}x | whole extract "
        f"{1e3 * image['extract_after']:.2f} ms (fit {1e3 * image['fit']:.2f} ms)"
    )
    figures = {
        "threads": args.threads,
        "gemm_peak_gflops": peak,
        "statistic": f"median of {args.repeats} interleaved runs",
        "load_average_before_after": [load_before, list(os.getloadavg())],
        "query_encoding": {
            "tokens": tokens,
            "flops": body_flops + camp_flops,
            "floor_ms": 1e3 * text_floor,
            "median_ms": {k: 1e3 * v for k, v in text.items()},
            "times_floor": {k: v / text_floor for k, v in text.items()},
            "bf16_speedup": text["encode_texts"] / text["encode_texts_bf16"],
        },
        "photo_extraction": {
            "photo_size": list(photo.size),
            "flops": flops,
            "floor_ms": 1e3 * image_floor,
            "median_ms": {k: 1e3 * v for k, v in image.items()},
            "network_speedup": image["network_before"] / image["network_after"],
            "times_floor": {k: image[k] / image_floor for k in ("network_before", "network_after")},
        },
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

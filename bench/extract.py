"""Images per second of the grid extractor at batch 1 and batch 32, on CPU (and CUDA when
present), on real flickr8k photos decoded once up front (decoding is not timed).

    .venv/bin/python bench/extract.py [--images 64] [--json results.json]

Each timed pass runs `extract` over the same images (fitting + forward + copy back), after a
warm-up pass; the best of `--repeats` passes is reported, as the least disturbed by other work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from model.vision.extractors.grid import GridExtractor  # noqa: E402
from model.vision.images import decode_image  # noqa: E402

SHARED_DIR = Path(os.environ.get("SHARED_DIR", REPO_ROOT.parent / "shared"))
BATCH_SIZES = (1, 32)


def load_photos(count: int) -> list:
    manifest = SHARED_DIR / "data" / "flickr8k" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()[:count]
    return [
        decode_image((manifest.parent / json.loads(line)["image"]).read_bytes()).image
        for line in lines
    ]


def images_per_second(extractor: GridExtractor, images: list, repeats: int) -> float:
    extractor.extract(images[: extractor.batch_size])  # warm-up (allocator, kernels)
    best = float("inf")
    for _ in range(repeats):
        if extractor.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        extractor.extract(images)
        if extractor.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="photos per timed pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    images = load_photos(args.images)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        rates = {}
        for batch_size in BATCH_SIZES:
            extractor = GridExtractor(device=device, batch_size=batch_size)
            rates[batch_size] = images_per_second(extractor, images, args.repeats)
        ratio = rates[32] / rates[1]
        name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
        print(
            f"{device} ({name}, {torch.get_num_threads()} threads): batch 1 {rates[1]:.1f} img/s, "
            f"batch 32 {rates[32]:.1f} img/s, ratio {ratio:.2f}x"
        )
        results.append(
            {
                "device": device,
                "device_name": name,
                "torch_threads": torch.get_num_threads(),
                "images_per_second": {str(b): round(r, 2) for b, r in rates.items()},
                "batch32_over_batch1": round(ratio, 3),
            }
        )
    report = {
        "benchmark": "grid extractor throughput",
        "extractor_version": GridExtractor(device="cpu").version,
        "images": len(images),
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "results": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

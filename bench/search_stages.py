"""The search stages this machine's cores made slow, one way against the other in one run.

    python bench/search_stages.py [--repeats 30] [--json results/search_stages.json]

Each figure is the median of `--repeats` interleaved runs (bench/timing.py), with the shipped
default model on the CPU and 100 candidates, as a text search has them:

* torch threads: one rerank call of 100 (caption, image) pairs (`PairReranker`) and one query
  encoding (`RetrievalModel.encode_texts`) on 1 torch thread against torch's default (one per
  core), what `CAMPSEARCH_TORCH_THREADS` chooses between;
* FAISS threads: one query against a flat index of `--vectors` shortlist vectors, after an idle
  gap of 20 ms (as between two searches), on one OpenMP thread against every core's, in
  alternating blocks of 10 searches;
* stored tensors: 100 stored float16 image records turned into float32 tensors, one numpy
  conversion per tensor per record (before) against one stack and one torch conversion per
  tensor (`image_tensors_many`), on 1 torch thread (the service's default) and on one per core.

Prints each pair with its ratio and the load average (the machine may be shared), and writes
them as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

# Run as a script, this folder comes first on sys.path, and bench/service.py would shadow the
# `service` package: the folder goes last (for bench/timing.py).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

from timing import interleaved  # noqa: E402

from index.codec import decode_arrays, encode_arrays  # noqa: E402
from model.architecture.precompute import ImagePrecompute  # noqa: E402
from model.retrieval import RetrievalModel  # noqa: E402
from service.search.rerank import PairReranker, RerankJob  # noqa: E402
from service.search.stored_tensors import (  # noqa: E402
    ImageTensors,
    caption_record,
    caption_tensors,
    image_record,
    image_tensors_many,
)

CANDIDATES = 100
REGIONS = 49
QUERIES = (
    "a man riding a wave on top of a surfboard in the ocean",
    "two dogs play with a ball on the grass",
    "a plate of food on a wooden table",
)
IDLE_GAP_S = 0.02
SEARCH_BLOCK = 10


def medians_ms(seconds: dict[str, list[float]]) -> dict[str, float]:
    return {name: round(1e3 * statistics.median(runs), 3) for name, runs in seconds.items()}


def torch_threads(model: RetrievalModel, job: RerankJob, repeats: int) -> dict:
    reranker = PairReranker(model)
    cores = torch.get_num_threads()
    queries = iter(range(10**9))

    def on(threads: int, work):
        def run():
            torch.set_num_threads(threads)
            return work()

        return run

    def encode():
        return model.encode_texts([QUERIES[next(queries) % len(QUERIES)]])

    ways = {
        "rerank, 1 thread": on(1, lambda: reranker([job])),
        f"rerank, {cores} threads": on(cores, lambda: reranker([job])),
        "encode, 1 thread": on(1, encode),
        f"encode, {cores} threads": on(cores, encode),
    }
    seconds, _ = interleaved(ways, repeats)
    torch.set_num_threads(cores)
    return medians_ms(seconds)


def faiss_threads(vectors: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((vectors, 256)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(256)
    index.add(data)
    cores = faiss.omp_get_max_threads()

    def after_a_gap(threads: int):
        def run():
            faiss.omp_set_num_threads(threads)
            time.sleep(IDLE_GAP_S)
            started = time.perf_counter()
            index.search(data[:1], CANDIDATES)
            return time.perf_counter() - started

        return run

    ways = {"search, 1 thread": after_a_gap(1), f"search, {cores} threads": after_a_gap(cores)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(max(1, repeats // SEARCH_BLOCK)):  # ways alternate by blocks of searches,
        for name, way in ways.items():  # as a service keeps its setting between searches
            times[name] += [way() for _ in range(SEARCH_BLOCK)]  # the gap is not timed
    faiss.omp_set_num_threads(cores)
    return medians_ms(times)


def stored_decoding(records: dict[int, dict[str, np.ndarray]], repeats: int) -> dict:
    device = torch.device("cpu")

    def one_by_one():
        """The conversion searches made before: one float32 copy per tensor per record."""
        return {
            item_id: {
                name: torch.from_numpy(np.array(array, dtype=np.float32)[None]).to(device)
                for name, array in record.items()
                if name not in ("boxes", "image_size")
            }
            for item_id, record in records.items()
        }

    cores = torch.get_num_threads()

    def one_pass(threads: int):
        def run():
            torch.set_num_threads(threads)
            return image_tensors_many(records, device)

        return run

    seconds, _ = interleaved(
        {
            "per record and tensor": one_by_one,
            "one pass per tensor, 1 torch thread": one_pass(1),
            f"one pass per tensor, {cores} torch threads": one_pass(cores),
        },
        repeats,
    )
    torch.set_num_threads(cores)
    return medians_ms(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--vectors", type=int, default=1000, help="flat index size")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    load_before = os.getloadavg()
    model = RetrievalModel.load(device="cpu")
    rng = np.random.default_rng(0)
    regions = rng.standard_normal((CANDIDATES, REGIONS, model.region_dim)).astype(np.float16)
    boxes = np.zeros((REGIONS, 4), np.float32)
    precompute = model.precompute_images(regions)
    records = {
        item_id: decode_arrays(
            encode_arrays(image_record(ImageTensors(precompute.select([row]), boxes, (640, 480))))
        )
        for row, item_id in enumerate(range(1, CANDIDATES + 1))
    }
    images = tuple(t.precompute for t in image_tensors_many(records, model.device).values())
    images = tuple(ImagePrecompute.cat([image]) for image in images)  # each owns its memory
    query = caption_tensors(
        caption_record(model.encode_texts([QUERIES[0]]).precompute.select([0])), model.device
    )
    scores = np.linspace(0.5, 0.1, CANDIDATES, dtype=np.float32)
    job = RerankJob(images=images, captions=(query,), shortlist_scores=scores)

    figures = {
        "torch_threads_ms": torch_threads(model, job, args.repeats),
        "faiss_threads_ms": faiss_threads(args.vectors, args.repeats),
        "stored_decoding_ms": stored_decoding(records, args.repeats),
    }
    for section, ways in figures.items():
        (first, reference), *others = ways.items()
        if section == "torch_threads_ms":  # two pairs: rerank, encode
            pairs = [list(ways.items())[:2], list(ways.items())[2:]]
        else:
            pairs = [[(first, reference), other] for other in others]
        for (name_a, a), (name_b, b) in pairs:
            print(f"{section}: {name_a} {a:.2f} ms, {name_b} {b:.2f} ms ({b / a:.2f}x)")
    figures["load_average_before_after"] = [list(load_before), list(os.getloadavg())]
    figures["settings"] = {"repeats": args.repeats, "vectors": args.vectors}
    print("load average before / after:", figures["load_average_before_after"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

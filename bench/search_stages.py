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
* stored tensors: a search's 100 cache misses, stored float16 image records turned into the
  float32 tensors the in-process cache keeps, each item owning its memory: one stack and one
  conversion per tensor, then every item's rows copied out of the batch (the code before),
  against one conversion per record and tensor (`image_tensors_many`), on 1 torch thread.

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
from dataclasses import fields, replace
from pathlib import Path

import faiss
import numpy as np
import torch

# The repository before this folder: bench/service.py would shadow the `service` package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import interleaved

from index.codec import decode_arrays, encode_arrays
from model.retrieval import RetrievalModel
from service.search.pipeline import _compacted
from service.search.rerank import PairReranker, RerankJob
from service.search.stored_tensors import (
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


def stored_decoding(
    records: dict[int, dict[str, np.ndarray]], image_type: type, repeats: int
) -> dict:
    """A search's cache misses, from stored records to the tensors the in-process cache keeps
    (each item owning its memory), on 1 torch thread (the service's default)."""
    device = torch.device("cpu")
    names = tuple(f.name for f in fields(image_type) if f.name != "region_counts")

    def stacked_then_copied():
        """The code before: per tensor one stack of the records and one conversion, each
        item a row of that batch, then each row copied out of it for the cache."""
        batch = {
            name: torch.from_numpy(np.stack([r[name] for r in records.values()])).float()
            for name in names
        }
        counts = torch.full((len(records),), REGIONS, dtype=torch.int64)
        decoded = {}
        for row, (item_id, record) in enumerate(records.items()):
            precompute = image_type(
                region_counts=counts[row : row + 1],
                **{name: batch[name][row : row + 1] for name in names},
            )
            width, height = (int(v) for v in record["image_size"])
            decoded[item_id] = ImageTensors(precompute, np.array(record["boxes"]), (width, height))
        return {
            item_id: replace(item, precompute=_compacted(item.precompute))
            for item_id, item in decoded.items()
        }

    def per_record():
        return image_tensors_many(records, device, image_type)

    cores = torch.get_num_threads()
    torch.set_num_threads(1)
    seconds, _ = interleaved(
        {
            "one stack and conversion per tensor, rows copied for the cache": stacked_then_copied,
            "one conversion per record and tensor (image_tensors_many)": per_record,
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
    image_type, caption_type = model.reranker.image_precompute, model.reranker.caption_precompute
    images = tuple(
        t.precompute for t in image_tensors_many(records, model.device, image_type).values()
    )
    query = caption_tensors(
        caption_record(model.encode_texts([QUERIES[0]]).precompute.select([0])),
        model.device,
        caption_type,
    )
    scores = np.linspace(0.5, 0.1, CANDIDATES, dtype=np.float32)
    job = RerankJob(images=images, captions=(query,), shortlist_scores=scores)

    figures = {
        "torch_threads_ms": torch_threads(model, job, args.repeats),
        "faiss_threads_ms": faiss_threads(args.vectors, args.repeats),
        "stored_decoding_ms": stored_decoding(records, image_type, args.repeats),
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

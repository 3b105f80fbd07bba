"""The rerank stage under the server's allocator settings, one way against the others in one run.

    python bench/rerank_allocator.py [--rounds 4] [--calls 30] [--json results/alloc.json]

In the server one rerank call of 100 pairs takes several times what it takes in a bench's main
thread. The difference is the allocator: with the fixed mmap threshold (service/runtime/heap.py,
`CAMPSEARCH_MALLOC_MMAP_THRESHOLD_KIB`, 64 KiB) every intermediate of the pair scoring above it
that the worker thread's arena cannot already hold is a mapping of its own, faulted in page by
page and unmapped when freed, and a freed arena top above glibc's trim threshold goes back to the
OS as well, so the next call faults it in again. The settings are read once per process (the
arena's state is what matters), so each way runs in a fresh child process, the ways alternating
round by round (the machine may be shared). A child loads the shipped model on the CPU, builds
one text search's job (one caption x 100 images of 49 regions), starts idle threads as the
server has them, and times `PairReranker` calls in a worker thread, 5 ms apart, as a
micro-batcher's worker makes them; it reports the median call, the worker's minor page faults
per call, the allocator's bytes (`heap_usage`) and the RSS after the calls and after
`malloc_trim(0)` (what the service's timed trim gets back).

Ways (`--ways` picks some): the mmap threshold (`CAMPSEARCH_MALLOC_MMAP_THRESHOLD_KIB`) and the
top pad (`CAMPSEARCH_MALLOC_TOP_PAD_KIB`, the free space an arena keeps above its top when it
grows or trims), each set as the service sets it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = 100
REGIONS = 49
IDLE_THREADS = 24
CALL_GAP_S = 0.005
WARMUP_CALLS = 3

WAYS: dict[str, tuple[int, int]] = {  # (mmap threshold KiB, top pad KiB)
    "mmap 64 KiB, no pad (before)": (64, 0),
    "mmap 64 KiB, top pad 32 MiB (default)": (64, 32 * 1024),
    "mmap 64 KiB, top pad 8 MiB": (64, 8 * 1024),
    "mmap 4 MiB, no pad": (4096, 0),
    "glibc's own threshold (0), no pad": (0, 0),
}


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child(mmap_kib: int, top_pad_kib: int, calls: int) -> dict:
    """One way in this process: the numbers described in the module docstring."""
    sys.path.insert(0, str(REPO_ROOT))
    from service.runtime.heap import fix_mmap_threshold, heap_usage, set_top_pad, trim_heap

    if mmap_kib:
        fix_mmap_threshold(mmap_kib * 1024)
    if top_pad_kib:
        set_top_pad(top_pad_kib * 1024)
    import numpy as np
    import torch

    from model.retrieval import RetrievalModel
    from service.search.rerank import PairReranker, RerankJob

    torch.set_num_threads(1)  # the service's default on two cores (CAMPSEARCH_TORCH_THREADS)
    model = RetrievalModel.load(device="cpu")
    rng = np.random.default_rng(0)
    regions = rng.standard_normal((CANDIDATES, REGIONS, model.region_dim)).astype(np.float16)
    precompute = model.precompute_images(regions)
    images = tuple(type(precompute).cat([precompute.select([row])]) for row in range(CANDIDATES))
    query = model.encode_texts(["a man riding a wave on top of a surfboard"]).precompute
    scores = np.linspace(0.5, 0.1, CANDIDATES, dtype=np.float32)
    job = RerankJob(images=images, captions=(query.select([0]),), shortlist_scores=scores)
    reranker = PairReranker(model)

    stop = threading.Event()
    idle = [threading.Thread(target=stop.wait, daemon=True) for _ in range(IDLE_THREADS)]
    for thread in idle:
        thread.start()
    seconds: list[float] = []
    faults: list[int] = []

    def worker() -> None:
        for _ in range(WARMUP_CALLS + calls):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            start = time.perf_counter()
            reranker([job])
            seconds.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
            time.sleep(CALL_GAP_S)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    rss_after = rss_kib()
    heap_after = heap_usage()
    trim_heap()
    stop.set()
    return {
        "rerank_ms": 1e3 * statistics.median(seconds[WARMUP_CALLS:]),
        "minor_faults_per_call": statistics.median(faults[WARMUP_CALLS:]),
        "rss_mib_after_calls": rss_after / 1024,
        "rss_mib_after_trim": rss_kib() / 1024,
        "heap_mib_after_calls": {k: v / 2**20 for k, v in (heap_after or {}).items()},
    }


def run_way(way: tuple[int, int], calls: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, __file__, "--child", *map(str, way), "--calls", str(calls)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=30, help="timed calls per child")
    parser.add_argument("--ways", nargs="*", choices=list(WAYS), default=list(WAYS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(*args.child, args.calls)))
        return

    load_before = os.getloadavg()
    rounds: dict[str, list[dict]] = {name: [] for name in args.ways}
    for number in range(args.rounds):
        for name in args.ways:
            rounds[name].append(run_way(WAYS[name], args.calls))
            print(f"round {number + 1}, {name}: {rounds[name][-1]}", flush=True)
    figures = {
        name: {
            key: round(statistics.median(r[key] for r in runs), 2)
            for key in (
                "rerank_ms",
                "minor_faults_per_call",
                "rss_mib_after_calls",
                "rss_mib_after_trim",
            )
        }
        for name, runs in rounds.items()
    }
    reference = args.ways[0]
    base = figures[reference]
    print(f"medians over {args.rounds} rounds (each a fresh process, ways alternating):")
    for name in args.ways:
        f = figures[name]
        print(
            f"  {name}: rerank {f['rerank_ms']:.1f} ms ({f['rerank_ms'] / base['rerank_ms']:.2f}x),"
            f" {f['minor_faults_per_call']:.0f} faults a call, RSS {f['rss_mib_after_calls']:.0f}"
            f" MiB after the calls ({f['rss_mib_after_calls'] / base['rss_mib_after_calls']:.2f}x),"
            f" {f['rss_mib_after_trim']:.0f} MiB after a trim"
        )
    load = [list(load_before), list(os.getloadavg())]
    print("load average before / after:", load)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "medians": figures,
            "rounds": rounds,
            "load_average_before_after": load,
            "settings": {"rounds": args.rounds, "calls": args.calls, "ways": WAYS},
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

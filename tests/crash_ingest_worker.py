"""Ingest in a loop until killed; print an ACK line after each acknowledged write.

Run by tests/test_crash.py as a subprocess, then SIGKILLed at a random moment:
    python tests/crash_ingest_worker.py DATA_DIR SEED
Lines: "ADD <image_id> <caption_id>..." after `add_image` returned; "DELETING <image_id>"
before and "DEL <image_id>" after `delete_image` returned. Every line is flushed before the
next write starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from index.corpus import Corpus, NewCaption

DIM = 16
OPTIONS = {"dim": DIM, "extractor": "grid", "extractor_version": "v1", "model_version": "m1"}
SAVE_EVERY = 7
DELETE_EVERY = 5


def _tensors(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    """A stand-in rerank record (float16, as the service stores them)."""
    return {"regions": rng.standard_normal((rows, 32)).astype(np.float16)}


def main() -> None:
    data_dir, seed = Path(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(seed)
    corpus = Corpus.open(data_dir, **OPTIONS)
    added: list[int] = []
    for n in range(1_000_000):
        record = corpus.add_image(
            rng.bytes(2000),
            width=32,
            height=32,
            region_features=rng.standard_normal((49, 64)),
            region_boxes=rng.random((49, 4)),
            pooled=rng.standard_normal(DIM),
            captions=[
                NewCaption(f"c{n}", [1, 5, 2], rng.standard_normal(DIM), _tensors(rng, 3))
                for _ in range(2)
            ],
            rerank=_tensors(rng, 49),
        )
        ids = [record.image.id, *(c.id for c in record.captions)]
        print("ADD", *ids, flush=True)
        added.append(record.image.id)
        if n % DELETE_EVERY == DELETE_EVERY - 1:
            victim = added.pop(int(rng.integers(len(added))))
            print("DELETING", victim, flush=True)  # from here on it may be gone
            corpus.delete_image(victim)
            print("DEL", victim, flush=True)
        if n % SAVE_EVERY == SAVE_EVERY - 1:
            corpus.save()


if __name__ == "__main__":
    main()

"""SIGKILL an ingesting process at a random moment; after restart every acknowledged write is
there (catalog, store, index) and nothing half-written is visible."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from index.corpus import Corpus, pooled_namespace, regions_namespace, rerank_namespace

WORKER = Path(__file__).with_name("crash_ingest_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(WORKER.parent))
from crash_ingest_worker import OPTIONS  # noqa: E402

MIN_ACKS = 5


def _run_and_kill(data_dir: Path, seed: int, kill_after_s: float) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    worker = subprocess.Popen(
        [sys.executable, str(WORKER), str(data_dir), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    lines: list[str] = []
    assert worker.stdout is not None
    while len(lines) < MIN_ACKS:  # started and acknowledging
        line = worker.stdout.readline()
        if not line:
            worker.wait(timeout=30)
            pytest.fail(f"worker exited early with {worker.returncode}")
        lines.append(line)
    time.sleep(kill_after_s)
    worker.send_signal(signal.SIGKILL)
    # Read the rest through the same buffered reader (communicate() would skip what
    # readline() already buffered).
    rest = worker.stdout.read()
    worker.wait(timeout=30)
    assert worker.returncode == -signal.SIGKILL
    # Only complete lines were acknowledged; a torn last line was not.
    return [line for line in (*lines, *rest.splitlines(keepends=True)) if line.endswith("\n")]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_acknowledged_writes_survive_sigkill(tmp_path, seed):
    data_dir = tmp_path / "data"
    kill_after_s = random.Random(seed).uniform(0.05, 1.0)
    acked_images: set[int] = set()
    acked_captions: set[int] = set()
    deleted: set[int] = set()
    deleting: set[int] = set()  # delete started, maybe committed, not acknowledged
    for rounds in range(2):  # crash, restart, crash again on the recovered corpus
        for line in _run_and_kill(data_dir, seed * 10 + rounds, kill_after_s):
            kind, *ids = line.split()
            if kind == "ADD":
                acked_images.add(int(ids[0]))
                acked_captions.update(int(i) for i in ids[1:])
            elif kind == "DELETING":
                deleting.add(int(ids[0]))
            else:
                deleted.add(int(ids[0]))

    corpus = Corpus.open(data_dir, **OPTIONS)
    try:
        image_ids = set(corpus.catalog.image_ids().tolist())
        caption_ids = set(corpus.catalog.caption_ids().tolist())
        live = acked_images - deleting
        assert live <= image_ids, "an acknowledged image was lost"
        assert not deleted & image_ids, "an acknowledged delete came back"
        live_captions = {c.id for i in live for c in corpus.catalog.captions_of(i)}
        assert live_captions <= caption_ids
        assert len(live_captions) == 2 * len(live)
        assert acked_captions - caption_ids <= {
            c for c in acked_captions if c not in live_captions
        }  # captions only vanish with their deleted image

        # Catalog, store, index and files agree exactly: nothing half-written is visible.
        store = corpus.store
        assert set(store.ids(regions_namespace("grid", "v1")).tolist()) == image_ids
        assert set(store.ids(pooled_namespace("images", "m1")).tolist()) == image_ids
        assert set(store.ids(pooled_namespace("captions", "m1")).tolist()) == caption_ids
        assert set(store.ids(rerank_namespace("images", "m1")).tolist()) == image_ids
        assert set(store.ids(rerank_namespace("captions", "m1")).tolist()) == caption_ids
        assert set(corpus.indexes["images"].ids().tolist()) == image_ids
        assert set(corpus.indexes["captions"].ids().tolist()) == caption_ids
        files = {p.relative_to(data_dir).as_posix() for p in (data_dir / "images").rglob("*")
                 if p.is_file()}  # fmt: skip
        assert files == {r.stored_path for r in corpus.get_images(sorted(image_ids)).values()}
        features = corpus.get_region_features(sorted(live))
        assert set(features) == live
        vectors = store.get_many(pooled_namespace("images", "m1"), sorted(live)[:5])
        for image_id, arrays in vectors.items():
            _, found = corpus.search_images(arrays["vector"], 1)
            assert found[0, 0] == image_id
        assert np.all(corpus.search_images(np.ones(16), 1000)[1][0][: len(image_ids)] >= 0)
    finally:
        corpus.close()

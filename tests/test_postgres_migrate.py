"""`camp-search migrate`: an embedded data directory copied into PostgreSQL, killed in the middle
and resumed; every row and every stored record compared; ids kept and never reused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest

from index.catalog import Catalog
from index.corpus import Corpus, NewCaption
from index.feature_store import FeatureStore
from index.migrate import migrate_data_dir

DIM = 16
OPTIONS = {"dim": DIM, "extractor": "grid", "extractor_version": "v1", "model_version": "m1"}
CAMP_SEARCH = Path(sys.executable).parent / "camp-search"
REPO_ROOT = Path(__file__).resolve().parents[1]


class Killed(Exception):
    """Raised from the batch hook: the copy dies between two batches."""


@pytest.fixture
def embedded(tmp_path) -> Path:
    """A real embedded data dir: 30 images (some with rerank tensors), captions, a free-standing
    caption, and deletes (so ids have gaps and the counter is past the largest id)."""
    data_dir = tmp_path / "embedded"
    rng = np.random.default_rng(0)
    with Corpus.open(data_dir, **OPTIONS) as corpus:
        for n in range(30):
            corpus.add_image(
                f"photo-{n}".encode() * 20,
                width=80,
                height=60,
                region_features=rng.standard_normal((49, 24)),
                region_boxes=rng.random((49, 4)),
                pooled=rng.standard_normal(DIM),
                captions=[
                    NewCaption(f"caption {n}.{c}", [1, 5 + c, 2], rng.standard_normal(DIM))
                    for c in range(2)
                ],
                extension=".png",
                rerank=(
                    {"regions": rng.standard_normal((49, 8)).astype(np.float16)} if n % 2 else None
                ),
            )
        corpus.add_caption("free-standing", [1, 9, 2], rng.standard_normal(DIM))
        corpus.delete_image(3)
        corpus.delete_image(30)  # the last one: the counter stays past the largest id
        corpus.delete_caption(10)
    return data_dir


def _embedded_contents(data_dir: Path) -> tuple[dict, dict, dict]:
    catalog = Catalog(data_dir / "catalog.sqlite3")
    store = FeatureStore(data_dir / "features")
    try:
        images = catalog.get_images(catalog.image_ids().tolist())
        captions = catalog.get_captions(catalog.caption_ids().tolist())
        features = {
            ns: store.get_many_encoded(ns, store.ids(ns).tolist()) for ns in store.namespaces()
        }
    finally:
        store.close()
        catalog.close()
    return images, captions, features


def _database_contents(url: str) -> tuple[dict, dict, dict]:
    from index.postgres import PostgresCatalog, PostgresDatabase, PostgresFeatureStore

    database = PostgresDatabase(url)
    try:
        catalog = PostgresCatalog(database)
        store = PostgresFeatureStore(database)
        images = catalog.get_images(catalog.image_ids().tolist())
        captions = catalog.get_captions(catalog.caption_ids().tolist())
        features = {
            ns: store.get_many_encoded(ns, store.ids(ns).tolist()) for ns in store.namespaces()
        }
    finally:
        database.close()
    return images, captions, features


def test_killed_copy_resumes_and_matches_every_row(tmp_path, embedded, postgres_url):
    batches = []

    def die_after_three(kind: str, rows: int) -> None:
        batches.append((kind, rows))
        if len(batches) == 3:
            raise Killed

    with pytest.raises(Killed):
        migrate_data_dir(embedded, postgres_url, batch=7, on_batch=die_after_three)
    with psycopg.connect(postgres_url) as conn:
        partial = conn.execute("SELECT count(*) FROM images").fetchone()[0]
    assert partial == 21  # three committed batches of 7, nothing of the fourth

    resumed = migrate_data_dir(embedded, postgres_url, batch=7)
    assert resumed.skipped == 21 and resumed.images == 28 - 21
    images, captions, features = _embedded_contents(embedded)
    assert _database_contents(postgres_url) == (images, captions, features)
    assert len(features) == 4  # regions, pooled images/captions, rerank images

    again = migrate_data_dir(embedded, postgres_url, batch=7)  # idempotent
    assert again.images == again.captions == 0 and again.skipped == again.total
    with psycopg.connect(postgres_url) as conn:
        changes = conn.execute("SELECT count(*) FROM changes").fetchone()[0]
    assert changes == len(images) + len(captions)  # each row recorded once, as an add

    # A replica on the database serves the copy; new ids go past the embedded counter.
    rng = np.random.default_rng(9)
    with Corpus.open(tmp_path / "embedded", database_url=postgres_url, **OPTIONS) as replica:
        assert set(replica.indexes["images"].ids().tolist()) == set(images)
        assert set(replica.indexes["captions"].ids().tolist()) == set(captions)
        some = next(iter(images))
        vector = replica.get_pooled("images", [some])[some]
        assert int(replica.search_images(vector[None], 1)[1][0, 0]) == some
        added = replica.add_image(
            b"new photo" * 20,
            width=10,
            height=10,
            region_features=rng.standard_normal((49, 24)),
            region_boxes=rng.random((49, 4)),
            pooled=rng.standard_normal(DIM),
            captions=[NewCaption("new", [1, 2], rng.standard_normal(DIM))],
        )
        assert added.image.id == 31  # 30 was handed out (then deleted): never reused
        assert added.captions[0].id > max(captions)


def test_cli_copies_with_a_progress_bar_after_a_sigkill(embedded, postgres_url):
    """The command itself: SIGKILLed in the middle (a slow batch hook from a wrapper), run
    again, finishes with the same contents."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CAMPSEARCH_")},
        "PYTHONPATH": str(REPO_ROOT),
    }
    killer = (
        "import os, signal, sys\n"
        "from index import migrate\n"
        "from service.cli.migrate import run_migrate\n"
        "original = migrate._copy_batch\n"
        "count = [0]\n"
        "def copy_then_die(*args):\n"
        "    original(*args)\n"
        "    count[0] += 1\n"
        "    if count[0] == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "migrate._copy_batch = copy_then_die\n"
        "run_migrate(sys.argv[1], migrate.Path(sys.argv[2]), 5)\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", killer, postgres_url, str(embedded)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == 10

    finished = subprocess.run(
        [str(CAMP_SEARCH), "migrate", "--to", postgres_url, "--data-dir", str(embedded)],
        env={**env, "COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stderr
    assert "copied 18 images" in finished.stderr and "(10 rows were already there)" in (
        finished.stderr
    )
    assert _database_contents(postgres_url) == _embedded_contents(embedded)

    refused = subprocess.run(
        [str(CAMP_SEARCH), "migrate", "--to", "mysql://nope", "--data-dir", str(embedded)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "postgresql://" in refused.stderr


def test_a_database_holding_another_corpus_is_refused(tmp_path, embedded, postgres_url):
    """Ids of the data dir already used by other items: the copy stops with a clear error
    instead of skipping them as done (which would attach captions to the wrong photos)."""
    from index.migrate import ForeignRowsError

    rng = np.random.default_rng(3)
    with Corpus.open(tmp_path / "other", database_url=postgres_url, **OPTIONS) as other:
        other.add_image(
            b"another corpus" * 10,
            width=8,
            height=8,
            region_features=rng.standard_normal((4, 24)),
            region_boxes=rng.random((4, 4)),
            pooled=rng.standard_normal(DIM),
        )
    with pytest.raises(ForeignRowsError, match="migrate into an empty database"):
        migrate_data_dir(embedded, postgres_url, batch=7)
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == 1

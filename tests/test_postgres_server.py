"""The test harness's other path: where no PostgreSQL answers, the tests start their own
(`postgres_cluster.PostgresServer`: initdb as the `postgres` user, a free port) and the corpus
works on it."""

from __future__ import annotations

import numpy as np
import psycopg
from postgres_cluster import PostgresServer
from postgres_support import fresh_database, reachable

from index.corpus import Corpus
from index.postgres import MIGRATIONS

OPTIONS = {"dim": 8, "extractor": "grid", "extractor_version": "v1", "model_version": "m1"}


def test_a_server_started_in_a_tmp_dir_serves_a_corpus(tmp_path):
    server = PostgresServer.create()
    assert not reachable(server.url)  # nothing on that free port before
    server.start()
    try:
        assert reachable(server.url)
        with fresh_database(server.url) as url:
            rng = np.random.default_rng(0)
            with Corpus.open(tmp_path / "images", database_url=url, **OPTIONS) as corpus:
                added = corpus.add_image(
                    b"bytes" * 10,
                    width=4,
                    height=4,
                    region_features=rng.standard_normal((4, 6)),
                    region_boxes=rng.random((4, 4)),
                    pooled=rng.standard_normal(8),
                )
                assert corpus.get_image(added.image.id) == added.image
            with psycopg.connect(url) as conn:
                assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == len(
                    MIGRATIONS
                )
    finally:
        server.kill()
    assert not reachable(server.url)
    server.remove()

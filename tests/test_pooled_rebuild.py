"""Issue 17, upgrading keeps users' data: a data dir filled by one model version and served by
another re-embeds the pooled (shortlist) vectors it lacks in the background, from the stored
region features and the catalog texts, so every photo and caption becomes searchable again
with the new model's scores; /readyz and /metrics report the progress. Region features that
were dropped, or of another extractor, are re-extracted from the stored photos first
(tests/test_region_rebuild.py).

The real stack (app, pipeline, corpus on disk, grid extractor) around the small random-weight
model, with real coco-mini photos.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from service_support import (
    coco_photos,
    make_settings,
    readyz_component,
    retrained,
    running_client,
    upload_coco_photos,
)

from index.corpus import Corpus
from index.namespaces import pooled_namespace
from service.api.app import create_app
from service.search.tensor_rebuild import PooledRebuild

PHOTOS = 4
CAPTIONS = 2
REBUILD_WAIT_S = 60.0


def _wait_for(rebuild) -> None:
    deadline = time.monotonic() + REBUILD_WAIT_S
    while rebuild.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not rebuild.running, "the rebuild did not finish in time"


def test_a_new_model_version_re_embeds_every_item_and_serves_its_own_scores(
    tmp_path, tiny_retrieval_model, small_grid_extractor, shared_dir, monkeypatch, caplog
) -> None:
    settings = make_settings(tmp_path / "data")
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        ids = upload_coco_photos(client, shared_dir, PHOTOS, CAPTIONS)
        caption_ids = sorted(
            c["id"] for i in ids for c in client.get(f"/v1/images/{i}").json()["captions"]
        )
    assert len(caption_ids) == PHOTOS * CAPTIONS

    new_model = retrained(tiny_retrieval_model, version=f"{tiny_retrieval_model.version}-next")
    real_start = PooledRebuild.start
    monkeypatch.setattr(PooledRebuild, "start", lambda self: None)  # hold it: see the "before"
    caplog.set_level(logging.WARNING)
    app = create_app(settings, model=new_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        runtime = app.state.service.runtime
        assert "re-embedding in the background" in caplog.text
        total = PHOTOS * CAPTIONS
        assert readyz_component(client, "pooled_vectors") == {
            "name": "pooled_vectors",
            "ok": True,
            "detail": f"rebuilding (images 0/{PHOTOS}, captions 0/{total})",
        }
        gauges = client.get("/metrics").text
        assert (
            f'campsearch_pooled_vector_rebuild_items{{kind="captions",state="total"}} {total}.0'
            in gauges
        )
        # Versions never mix: the old model's vectors stay out of the new model's index.
        texts = {
            i: captions[0]
            for i, (_, captions) in zip(ids, coco_photos(shared_dir, PHOTOS), strict=True)
        }
        before = client.post("/v1/search/images", json={"text": texts[ids[0]]})
        assert before.status_code == 200 and before.json()["results"] == []

        real_start(runtime.pooled_rebuild)
        _wait_for(runtime.pooled_rebuild)
        assert readyz_component(client, "pooled_vectors")["detail"] == (
            f"complete (images {PHOTOS}/{PHOTOS}, captions {total}/{total})"
        )
        gauges = client.get("/metrics").text
        assert (
            f'campsearch_pooled_vector_rebuild_items{{kind="images",state="done"}} {PHOTOS}.0'
            in gauges
        )
        corpus = runtime.corpus
        assert corpus.ids_without_pooled("images").size == 0
        assert corpus.ids_without_pooled("captions").size == 0

        # Stored vectors are what the new model computes from the stored regions and texts.
        regions = corpus.get_region_features(ids)
        for image_id in ids:
            expected = new_model.pooled_images(regions[image_id].features[None])[0]
            stored = corpus.get_pooled("images", [image_id])[image_id]
            np.testing.assert_allclose(stored, expected, atol=1e-5)
        caption_texts = {i: r.text for i, r in corpus.get_captions(caption_ids).items()}
        encoded = new_model.encode_texts(list(caption_texts.values()))
        stored_captions = corpus.get_pooled("captions", caption_ids)
        for row, caption_id in enumerate(caption_texts):
            np.testing.assert_allclose(stored_captions[caption_id], encoded.pooled[row], atol=1e-5)

        # Every photo is found by text again, with the new model's shortlist scores.
        for image_id, text in texts.items():
            found = client.post("/v1/search/images", json={"text": text, "limit": PHOTOS})
            assert found.status_code == 200
            hits = found.json()["results"]
            assert sorted(hit["id"] for hit in hits) == sorted(ids)
            query = new_model.encode_texts([text]).pooled[0]
            for hit in hits:
                direct = float(query @ corpus.get_pooled("images", [hit["id"]])[hit["id"]])
                assert hit["shortlist_score"] == pytest.approx(direct, abs=1e-4)
            assert image_id in {hit["id"] for hit in hits}
        # And every caption by its photo.
        found = client.post("/v1/search/captions", json={"image_id": ids[0], "limit": total})
        assert found.status_code == 200
        assert sorted(hit["id"] for hit in found.json()["results"]) == caption_ids

    # The re-embedded vectors are durable: the next start has nothing to rebuild.
    monkeypatch.undo()
    app = create_app(settings, model=new_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        runtime = app.state.service.runtime
        assert runtime.pooled_rebuild.finished and runtime.pooled_rebuild.built == {
            "images": 0,
            "captions": 0,
        }
        assert corpus_counts(runtime.corpus) == (PHOTOS, total)
        assert readyz_component(client, "pooled_vectors")["detail"] == (
            "complete (images 0/0, captions 0/0)"
        )
        # The old version's vectors are kept apart (a rollback to it serves at once).
        store = runtime.corpus.store
        for kind, count in (("images", PHOTOS), ("captions", total)):
            assert store.count(pooled_namespace(kind, tiny_retrieval_model.version)) == count
            assert store.count(pooled_namespace(kind, new_model.version)) == count


def corpus_counts(corpus) -> tuple[int, int]:
    summaries = corpus.index_summaries()
    return summaries["images"].count, summaries["captions"].count


def test_postgres_one_replica_re_embeds_and_the_others_follow(
    tmp_path, tiny_retrieval_model, small_grid_extractor, shared_dir, postgres_url, monkeypatch
) -> None:
    """PostgreSQL mode: one replica re-embeds for the database under the rebuild lock; the
    change rows it writes with the vectors bring them into the other replica's index (that
    replica computes nothing), which then finds nothing left to do."""
    settings = make_settings(tmp_path / "shared", database_url=postgres_url)
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        ids = upload_coco_photos(client, shared_dir, PHOTOS, CAPTIONS)
    total = PHOTOS * CAPTIONS
    new_model = retrained(tiny_retrieval_model, version=f"{tiny_retrieval_model.version}-next")
    text = coco_photos(shared_dir, 1)[0][1][0]

    real_start = PooledRebuild.start
    monkeypatch.setattr(PooledRebuild, "start", lambda self: None)
    follower_app = create_app(settings, model=new_model, extractor=small_grid_extractor)
    with running_client(follower_app) as follower:
        waiting = follower_app.state.service.runtime
        assert corpus_counts(waiting.corpus) == (0, 0)  # nothing of the old version
        assert readyz_component(follower, "pooled_vectors")["detail"] == (
            f"rebuilding on this replica (images 0/{PHOTOS}, captions 0/{total})"
        )
        monkeypatch.setattr(PooledRebuild, "start", real_start)
        builder_app = create_app(settings, model=new_model, extractor=small_grid_extractor)
        with running_client(builder_app) as builder:
            building = builder_app.state.service.runtime
            _wait_for(building.pooled_rebuild)
            assert building.pooled_rebuild.built == {"images": PHOTOS, "captions": total}
            assert readyz_component(builder, "pooled_vectors")["detail"] == (
                f"complete (images {PHOTOS}/{PHOTOS}, captions {total}/{total})"
            )
            deadline = time.monotonic() + REBUILD_WAIT_S
            while corpus_counts(waiting.corpus) != (PHOTOS, total):
                assert time.monotonic() < deadline, corpus_counts(waiting.corpus)
                time.sleep(0.05)
            found = follower.post("/v1/search/images", json={"text": text, "limit": PHOTOS})
            assert found.status_code == 200
            assert sorted(hit["id"] for hit in found.json()["results"]) == sorted(ids)
            query = new_model.encode_texts([text]).pooled[0]
            for hit in found.json()["results"]:
                direct = float(query @ waiting.corpus.get_pooled("images", [hit["id"]])[hit["id"]])
                assert hit["shortlist_score"] == pytest.approx(direct, abs=1e-4)

            real_start(waiting.pooled_rebuild)  # takes the lock, finds nothing left
            _wait_for(waiting.pooled_rebuild)
            assert waiting.pooled_rebuild.built == {"images": 0, "captions": 0}
            assert readyz_component(follower, "pooled_vectors")["detail"] == (
                f"complete (images {PHOTOS}/{PHOTOS}, captions {total}/{total})"
            )


def test_pooled_vectors_are_re_embedded_before_the_rerank_tensors(
    tmp_path, tiny_retrieval_model, small_grid_extractor, shared_dir, monkeypatch
) -> None:
    """Items are unsearchable without a pooled vector, while missing tensors are computed on
    the fly: the tensor rebuild waits for the pooled one."""
    settings = make_settings(tmp_path / "data")
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        upload_coco_photos(client, shared_dir, PHOTOS, CAPTIONS)

    stored: list[str] = []
    for method, what in (("put_pooled", "pooled"), ("put_rerank_tensors", "tensors")):
        real = getattr(Corpus, method)

        def recording(self, kind, records, _real=real, _what=what):
            stored.append(_what)
            return _real(self, kind, records)

        monkeypatch.setattr(Corpus, method, recording)
    new_model = retrained(tiny_retrieval_model, version=f"{tiny_retrieval_model.version}-next")
    app = create_app(settings, model=new_model, extractor=small_grid_extractor)
    with running_client(app):
        runtime = app.state.service.runtime
        _wait_for(runtime.pooled_rebuild)
        _wait_for(runtime.rebuild)
        assert runtime.pooled_rebuild.finished and runtime.rebuild.finished
    assert stored == ["pooled"] * 2 + ["tensors"] * 2  # one batch per kind each

"""Issue 17, upgrading keeps users' data: a model trained on another extractor (another backbone,
input size or grid) finds no region features of its extractor's version. The service
re-extracts them from the stored photos in the background, then re-embeds and rebuilds as for
any model change, so every photo becomes searchable with the new model's own features; /readyz
and /metrics report the progress. Regions of the two extractor versions never mix, and a photo
that is gone or no longer decodes is skipped and said.

The real stack (app, pipeline, corpus on disk, the grid extractor at two input sizes) around
the small random-weight model, with real coco-mini photos.
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

from index.namespaces import regions_namespace
from model.vision.extractors.grid import GridExtractor
from model.vision.images import decode_image
from service.api.app import create_app
from service.search import tensor_rebuild
from service.search.tensor_rebuild import RegionRebuild

PHOTOS = 4
CAPTIONS = 2
NEW_INPUT_SIZE = 96  # 3 x 3 regions, where the stored ones are 2 x 2
REBUILD_WAIT_S = 120.0


@pytest.fixture(scope="module")
def other_extractor() -> GridExtractor:
    return GridExtractor(input_size=NEW_INPUT_SIZE, device="cpu")


def _wait_for_all(runtime) -> None:
    deadline = time.monotonic() + REBUILD_WAIT_S
    for rebuild in (runtime.region_rebuild, runtime.pooled_rebuild, runtime.rebuild):
        while not rebuild.ended and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rebuild.finished, f"the {rebuild.what} rebuild did not finish: {rebuild.error}"


def test_a_model_on_another_extractor_re_extracts_every_photo_and_serves_it(
    tmp_path,
    tiny_retrieval_model,
    small_grid_extractor,
    other_extractor,
    shared_dir,
    monkeypatch,
    caplog,
) -> None:
    settings = make_settings(tmp_path / "data")
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        ids = upload_coco_photos(client, shared_dir, PHOTOS, CAPTIONS)
    texts = {
        i: captions[0]
        for i, (_, captions) in zip(ids, coco_photos(shared_dir, PHOTOS), strict=True)
    }
    old_namespace = regions_namespace("grid", small_grid_extractor.version)
    new_namespace = regions_namespace("grid", other_extractor.version)
    assert old_namespace != new_namespace

    new_model = retrained(tiny_retrieval_model, version=f"{tiny_retrieval_model.version}-96px")
    real_start = RegionRebuild.start
    monkeypatch.setattr(RegionRebuild, "start", lambda self: None)  # hold it: see the "before"
    caplog.set_level(logging.WARNING)
    app = create_app(settings, model=new_model, extractor=other_extractor)
    with running_client(app) as client:
        runtime = app.state.service.runtime
        assert "re-extracting them from the stored photos" in caplog.text
        assert readyz_component(client, "region_features")["detail"] == (
            f"rebuilding (images 0/{PHOTOS})"
        )
        gauges = client.get("/metrics").text
        assert (
            f'campsearch_region_feature_rebuild_items{{kind="images",state="total"}} {PHOTOS}.0'
            in gauges
        )
        # The re-embedding waits for the regions it reads: nothing is searchable yet, and
        # the old extractor's regions never reach the new model.
        time.sleep(0.3)
        assert runtime.pooled_rebuild.built == {"images": 0, "captions": 0}
        found = client.post("/v1/search/images", json={"text": texts[ids[0]]})
        assert found.status_code == 200 and found.json()["results"] == []

        real_start(runtime.region_rebuild)
        _wait_for_all(runtime)
        assert readyz_component(client, "region_features")["detail"] == (
            f"complete (images {PHOTOS}/{PHOTOS})"
        )
        assert runtime.region_rebuild.built == {"images": PHOTOS}

        # The stored regions are what the new extractor makes of the stored photo.
        corpus = runtime.corpus
        regions = corpus.get_region_features(ids)
        for image_id in ids:
            record, path = corpus.stored_file(image_id)
            photo = decode_image(path.read_bytes()).image
            expected = other_extractor.extract([photo])[0]
            assert regions[image_id].num_regions == other_extractor.num_regions == 9
            assert regions[image_id].extractor_version == other_extractor.version
            assert regions[image_id].image_size == (record.width, record.height)
            np.testing.assert_allclose(
                regions[image_id].features.astype(np.float32),
                expected.features.astype(np.float32),
                rtol=2e-3,
                atol=2e-3,
            )
            pooled = new_model.pooled_images(regions[image_id].features[None])[0]
            stored = corpus.get_pooled("images", [image_id])[image_id]
            np.testing.assert_allclose(stored, pooled, atol=1e-5)

        # Every photo is found by its caption again, reranked from the new regions.
        for text in texts.values():
            found = client.post("/v1/search/images", json={"text": text, "limit": PHOTOS})
            assert found.status_code == 200
            hits = found.json()["results"]
            assert sorted(hit["id"] for hit in hits) == sorted(ids)
            query = new_model.encode_texts([text]).pooled[0]
            for hit in hits:
                direct = float(query @ corpus.get_pooled("images", [hit["id"]])[hit["id"]])
                assert hit["shortlist_score"] == pytest.approx(direct, abs=1e-4)

        # Both versions' regions are kept apart: serving the old model again needs nothing.
        store = corpus.store
        assert store.count(old_namespace) == PHOTOS
        assert store.count(new_namespace) == PHOTOS

    # Durable: the next start re-extracts nothing.
    monkeypatch.undo()
    app = create_app(settings, model=new_model, extractor=other_extractor)
    with running_client(app) as client:
        runtime = app.state.service.runtime
        assert runtime.region_rebuild.finished
        assert runtime.region_rebuild.built == {"images": 0}
        assert readyz_component(client, "region_features")["detail"] == "complete (images 0/0)"


def test_a_photo_that_is_gone_or_broken_is_skipped_and_said(
    tmp_path,
    tiny_retrieval_model,
    small_grid_extractor,
    other_extractor,
    shared_dir,
    caplog,
) -> None:
    """A photo whose file no longer decodes is skipped (logged, counted, tried again at the
    next start); the others are served. Once its file is gone too it cannot be rebuilt at
    all: the start is refused, naming it and what to re-run."""
    settings = make_settings(tmp_path / "data")
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        ids = upload_coco_photos(client, shared_dir, PHOTOS, CAPTIONS)
        runtime = app.state.service.runtime
        paths = [runtime.corpus.stored_file(i)[1] for i in ids]
    paths[0].write_bytes(b"\xff\xd8\xff\xe0 not a jpeg any more")

    new_model = retrained(tiny_retrieval_model, version=f"{tiny_retrieval_model.version}-96px")
    caplog.set_level(logging.ERROR)
    app = create_app(settings, model=new_model, extractor=other_extractor)
    with running_client(app) as client:
        runtime = app.state.service.runtime
        _wait_for_all(runtime)
        assert readyz_component(client, "region_features")["detail"] == (
            f"complete (images {PHOTOS}/{PHOTOS} (1 skipped))"
        )
        assert f"image {ids[0]} not re-extracted" in caplog.text
        assert runtime.region_rebuild.built == {"images": PHOTOS - 1}
        found = client.post("/v1/search/images", json={"text": "a photo", "limit": PHOTOS}).json()[
            "results"
        ]
        assert sorted(hit["id"] for hit in found) == sorted(ids[1:])

    paths[0].unlink()  # now neither its regions nor its photo exist
    app = create_app(settings, model=new_model, extractor=other_extractor)
    with running_client(app) as client:
        assert app.state.service.phase == "failed"
        detail = client.get("/readyz").json()["components"][0]["detail"]
        assert "1 images have no rerank tensors" in detail
        assert "no stored photo to extract them from" in detail
        assert f"first ids: {[ids[0]]}" in detail
        assert "camp-search ingest" in detail


def test_without_kept_region_features_a_model_change_re_extracts_from_the_photos(
    tmp_path, tiny_retrieval_model, small_grid_extractor, shared_dir, monkeypatch
) -> None:
    """CAMPSEARCH_KEEP_REGION_FEATURES=false drops the regions once the tensors are stored; a
    new model re-extracts them from the stored photos (same extractor), rebuilds, and drops
    them again. Decoded photos are extracted as soon as their pixels reach the rebuild's
    byte bound (here 1 byte: one photo a call)."""
    settings = make_settings(tmp_path / "data", keep_region_features=False)
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        ids = upload_coco_photos(client, shared_dir, PHOTOS, CAPTIONS)
        namespace = app.state.service.runtime.corpus.regions_namespace
        assert app.state.service.runtime.corpus.store.count(namespace) == 0

    new_model = retrained(tiny_retrieval_model, version=f"{tiny_retrieval_model.version}-next")
    monkeypatch.setattr(tensor_rebuild, "REGION_DECODE_BYTES", 1)
    batches: list[int] = []
    real_extract = small_grid_extractor.extract

    def counting(images):
        batches.append(len(images))
        return real_extract(images)

    monkeypatch.setattr(small_grid_extractor, "extract", counting)
    app = create_app(settings, model=new_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        runtime = app.state.service.runtime
        assert app.state.service.phase == "ready"
        _wait_for_all(runtime)
        assert runtime.region_rebuild.built == {"images": PHOTOS}
        assert batches == [1] * PHOTOS
        assert runtime.pooled_rebuild.built["images"] == PHOTOS
        assert runtime.corpus.ids_without_rerank_tensors("images").size == 0
        assert runtime.corpus.store.count(namespace) == 0  # dropped again
        found = client.post("/v1/search/images", json={"text": "a photo", "limit": PHOTOS})
        assert sorted(hit["id"] for hit in found.json()["results"]) == sorted(ids)


def test_postgres_one_replica_re_extracts_for_the_database(
    tmp_path,
    tiny_retrieval_model,
    small_grid_extractor,
    other_extractor,
    shared_dir,
    postgres_url,
    monkeypatch,
) -> None:
    """PostgreSQL mode: one replica re-extracts the photos (the shared images folder) under the
    region rebuild lock; another replica waits, reports the database's progress, then takes
    the lock, finds nothing left and serves the re-embedded photos."""
    settings = make_settings(tmp_path / "shared", database_url=postgres_url)
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        ids = upload_coco_photos(client, shared_dir, PHOTOS, CAPTIONS)
    new_model = retrained(tiny_retrieval_model, version=f"{tiny_retrieval_model.version}-96px")

    real_start = RegionRebuild.start
    monkeypatch.setattr(RegionRebuild, "start", lambda self: None)
    waiting_app = create_app(settings, model=new_model, extractor=other_extractor)
    with running_client(waiting_app) as waiting_client:
        waiting = waiting_app.state.service.runtime
        assert readyz_component(waiting_client, "region_features")["detail"] == (
            f"rebuilding on this replica (images 0/{PHOTOS})"
        )
        monkeypatch.setattr(RegionRebuild, "start", real_start)
        builder_app = create_app(settings, model=new_model, extractor=other_extractor)
        with running_client(builder_app) as builder_client:
            building = builder_app.state.service.runtime
            _wait_for_all(building)
            assert building.region_rebuild.built == {"images": PHOTOS}
            assert readyz_component(builder_client, "region_features")["detail"] == (
                f"complete (images {PHOTOS}/{PHOTOS})"
            )
            regions = building.corpus.get_region_features(ids)
            assert {r.num_regions for r in regions.values()} == {9}

            real_start(waiting.region_rebuild)  # takes the lock, finds nothing left
            _wait_for_all(waiting)
            assert waiting.region_rebuild.built == {"images": 0}
            assert readyz_component(waiting_client, "region_features")["detail"] == (
                f"complete (images {PHOTOS}/{PHOTOS})"
            )
            found = waiting_client.post(
                "/v1/search/images", json={"text": "a photo", "limit": PHOTOS}
            )
            assert sorted(hit["id"] for hit in found.json()["results"]) == sorted(ids)

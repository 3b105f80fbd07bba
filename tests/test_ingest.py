"""Bulk ingest: sources, local target, refusals, resume, the data-dir lock, the CLI and demo."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil

import httpx
import pytest
from service_support import TEST_API_KEY, coco_photos, make_settings, running_client
from typer.testing import CliRunner

from service.api.app import create_app
from service.cli.bulk_ingest import (
    IngestSourceError,
    LocalTarget,
    ingest,
    read_source,
    write_refusals,
)
from service.cli.demo import DEMO_CAPTIONS, demo_items
from service.cli.main import app as cli
from service.runtime.lifecycle import DataDirBusyError, ServiceRuntime
from service.runtime.metrics import ServiceMetrics


@pytest.fixture
def photo_folder(tmp_path, shared_dir):
    """Three real photos (one with sidecar captions), a truncated JPEG and a text file."""
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    photos = coco_photos(shared_dir, 3)
    for index, (path, _) in enumerate(photos):
        target = folder / ("nested" if index == 2 else "") / f"photo{index}.jpg"
        shutil.copy(path, target)
    (folder / "photo0.txt").write_text("first caption\n\n  second caption  \n")
    (folder / "broken.jpg").write_bytes(photos[0][0].read_bytes()[:300])
    (folder / "notes.png").write_bytes(b"shopping list: milk, eggs")
    (folder / "readme.md").write_text("not an image: skipped")
    return folder


def test_sources_from_a_folder_and_a_manifest(photo_folder, tmp_path) -> None:
    items = read_source(photo_folder)
    names = [item.path.relative_to(photo_folder).as_posix() for item in items]
    assert names == ["broken.jpg", "nested/photo2.jpg", "notes.png", "photo0.jpg", "photo1.jpg"]
    assert items[3].captions == ("first caption", "second caption")
    assert items[4].captions == ()

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        json.dumps({"image": "photos/photo1.jpg", "captions": ["a", "b", "c"]}) + "\n\n"
    )
    (entry,) = read_source(manifest, max_captions=2)
    assert entry.path == tmp_path / "photos" / "photo1.jpg" and entry.captions == ("a", "b")

    manifest.write_text('{"captions": ["no image"]}\n')
    with pytest.raises(IngestSourceError, match=r"manifest\.jsonl:1"):
        read_source(manifest)
    with pytest.raises(IngestSourceError, match="neither"):
        read_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestSourceError, match="holds no image"):
        read_source(tmp_path / "empty")


def test_local_ingest_refuses_bad_files_and_resumes(
    photo_folder, tmp_path, tiny_retrieval_model, small_grid_extractor
) -> None:
    settings = make_settings(tmp_path / "data")
    items = read_source(photo_folder)

    def run_once():
        runtime = ServiceRuntime.build(
            settings, ServiceMetrics(), model=tiny_retrieval_model, extractor=small_grid_extractor
        )

        async def go():
            try:
                return await ingest(items, LocalTarget(runtime), jobs=2)
            finally:
                await runtime.batcher.stop()

        try:
            return asyncio.run(go()), runtime.corpus.catalog.count_captions()
        finally:
            runtime.close()

    first, captions = run_once()
    assert (first.added, first.existing) == (3, 0)
    assert captions == 2
    refused = {r.image.rsplit("/", 1)[-1]: r for r in first.refused}
    assert refused["broken.jpg"].status == 400 and "truncated" in refused["broken.jpg"].reason
    assert refused["notes.png"].status == 415

    second, captions = run_once()  # a rerun skips what is stored, by content
    assert (second.added, second.existing, len(second.refused)) == (0, 3, 2)
    assert captions == 2

    write_refusals(second, tmp_path / "refused.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "refused.jsonl").read_text().splitlines()]
    assert {line["status"] for line in lines} == {400, 415}


def test_one_process_owns_a_data_dir(tmp_path, tiny_retrieval_model, small_grid_extractor) -> None:
    settings = make_settings(tmp_path / "data")
    first = ServiceRuntime.build(
        settings, ServiceMetrics(), model=tiny_retrieval_model, extractor=small_grid_extractor
    )
    try:
        with pytest.raises(DataDirBusyError, match="--server"):
            ServiceRuntime.build(
                settings,
                ServiceMetrics(),
                model=tiny_retrieval_model,
                extractor=small_grid_extractor,
            )
    finally:
        asyncio.run(first.batcher.stop())
        first.close()
    again = ServiceRuntime.build(
        settings, ServiceMetrics(), model=tiny_retrieval_model, extractor=small_grid_extractor
    )
    asyncio.run(again.batcher.stop())
    again.close()


def test_cli_ingest_and_the_offline_demo_with_the_default_model(
    photo_folder, tmp_path, monkeypatch
) -> None:
    data_dir = tmp_path / "data"
    monkeypatch.setenv("CAMPSEARCH_DATA_DIR", str(data_dir))
    runner = CliRunner()
    result = runner.invoke(cli, ["ingest", str(photo_folder), "--refused", str(tmp_path / "r.jl")])
    assert result.exit_code == 1, result.output  # two files were refused
    assert "3 added" in result.output and "2 refused" in result.output
    assert (tmp_path / "r.jl").read_text().count("\n") == 2

    result = runner.invoke(cli, ["demo"])
    assert result.exit_code == 0, result.output
    assert f"{len(DEMO_CAPTIONS)} added" in result.output

    chelsea = next(item for item in demo_items() if item.path.name == "chelsea.png")
    chelsea_sha = hashlib.sha256(chelsea.path.read_bytes()).hexdigest()
    app = create_app(make_settings(data_dir))
    with running_client(app) as client:
        assert client.get("/v1/info").json()["corpus"]["images"] == 3 + len(DEMO_CAPTIONS)
        hits = client.post(
            "/v1/search/images", json={"text": "a cat with green eyes", "limit": 3}
        ).json()["results"]
        top = client.get(f"/v1/images/{hits[0]['id']}").json()
        assert top["sha256"] == chelsea_sha
        assert top["captions"][0]["text"] == DEMO_CAPTIONS["chelsea.png"][0]
        photo = client.post(
            "/v1/search/captions",
            files={"file": ("c.png", chelsea.path.read_bytes())},
            data={"limit": "5"},
        ).json()["results"]
        assert any("cat" in hit["text"] for hit in photo)


def test_local_ingest_refuses_a_data_dir_in_use(photo_folder, tmp_path, monkeypatch) -> None:
    data_dir = tmp_path / "data"
    monkeypatch.setenv("CAMPSEARCH_DATA_DIR", str(data_dir))
    from service.runtime.lifecycle import DataDirLock

    lock = DataDirLock(data_dir).acquire()
    try:
        result = CliRunner().invoke(cli, ["ingest", str(photo_folder)])
    finally:
        lock.release()
    assert result.exit_code == 2
    message = " ".join(result.output.split())  # rich wraps it at the terminal's width
    assert "in use" in message and "--server" in message


@pytest.fixture
def coco_copy(tmp_path, shared_dir):
    """Three coco-mini photos laid out as coco-mini is: images/ and a manifest.jsonl beside it
    (the folder has no caption sidecars; the captions are only in the manifest)."""
    folder = tmp_path / "coco"
    (folder / "images").mkdir(parents=True)
    source = shared_dir / "data" / "coco-mini" / "manifest.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()][:3]
    for row in rows:
        shutil.copy(source.parent / row["image"], folder / row["image"])
    (folder / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder, rows


def test_cli_ingests_a_folder_then_its_manifest_captions(
    coco_copy, tmp_path, monkeypatch, tiny_retrieval_model, small_grid_extractor
) -> None:
    """The newcomer's path: the folder first (photos, no captions), then its manifest: the
    manifest's captions are added to the stored photos and the summary says so; a rerun adds
    nothing. Through the real CLI against a real server."""
    from security_support import served

    folder, rows = coco_copy
    settings = make_settings(tmp_path / "data", api_keys=TEST_API_KEY)
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    monkeypatch.setenv("CAMPSEARCH_API_KEY", TEST_API_KEY)
    runner = CliRunner()
    with served(app) as server:

        def run(source) -> str:
            result = runner.invoke(cli, ["ingest", str(source), "--server", server.url])
            assert result.exit_code == 0, result.output
            return " ".join(result.output.split())

        assert "3 added, 0 already stored, 0 refused" in run(folder)
        captions = sum(len(row["captions"]) for row in rows)
        assert (
            f"0 added, 3 already stored ({captions} captions added to 3 stored photos), 0 refused"
            in run(folder / "manifest.jsonl")
        )
        for row in rows:
            sha = hashlib.sha256((folder / row["image"]).read_bytes()).hexdigest()
            (stored,) = httpx.get(f"{server.url}/v1/images", params={"sha256": sha}).json()["data"]
            assert [c["text"] for c in stored["captions"]] == row["captions"]
        assert "0 added, 3 already stored, 0 refused" in run(folder / "manifest.jsonl")
        info = httpx.get(f"{server.url}/v1/info").json()["corpus"]
        assert info == {"images": 3, "captions": captions}

        # One new caption in an edited manifest: exactly that one is added.
        rows[0]["captions"].append("a newly written caption")
        (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert "(1 caption added to 1 stored photo)" in run(folder / "manifest.jsonl")


def test_local_ingest_adds_a_manifest_captions_to_stored_photos(
    coco_copy, tmp_path, tiny_retrieval_model, small_grid_extractor
) -> None:
    folder, rows = coco_copy
    settings = make_settings(tmp_path / "data")
    runtime = ServiceRuntime.build(
        settings, ServiceMetrics(), model=tiny_retrieval_model, extractor=small_grid_extractor
    )

    async def go(source):
        return await ingest(read_source(source), LocalTarget(runtime), jobs=2)

    async def both():
        try:
            return await go(folder), await go(folder / "manifest.jsonl")
        finally:
            await runtime.batcher.stop()

    try:
        first, second = asyncio.run(both())
        stored = {
            image.sha256: [c.text for c in runtime.corpus.catalog.captions_of(image.id)]
            for image in (
                runtime.corpus.find_image_by_sha256(
                    hashlib.sha256((folder / row["image"]).read_bytes()).hexdigest()
                )
                for row in rows
            )
        }
    finally:
        runtime.close()
    assert (first.added, first.captions_added) == (3, 0)
    assert (second.added, second.existing) == (0, 3)
    assert second.captions_added == sum(len(row["captions"]) for row in rows)
    assert second.photos_captioned == 3
    assert sorted(stored.values()) == sorted(row["captions"] for row in rows)

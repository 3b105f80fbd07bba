"""Images and captions over HTTP: add, dedupe, read, fetch bytes, delete, API keys."""

from __future__ import annotations

import hashlib

import pytest
from service_support import TEST_API_KEY, coco_photos, make_settings, png_bytes, running_client

from service.api.app import create_app


@pytest.fixture
def client(tmp_path, tiny_retrieval_model, small_grid_extractor):
    app = create_app(
        make_settings(tmp_path / "data"), model=tiny_retrieval_model, extractor=small_grid_extractor
    )
    with running_client(app) as client:
        yield client


def test_add_image_stores_it_with_captions_and_serves_the_bytes(client, shared_dir) -> None:
    path, captions = coco_photos(shared_dir, 1)[0]
    data = path.read_bytes()
    response = client.post(
        "/v1/images",
        files={"file": ("whatever.bin", data, "application/octet-stream")},
        data={"captions": captions[:2]},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert (body["width"], body["height"]) == (640, 399)
    assert body["regions"] == 4
    assert [c["text"] for c in body["captions"]] == captions[:2]
    assert all(c["image_id"] == body["id"] for c in body["captions"])

    fetched = client.get(body["url"])
    assert fetched.status_code == 200
    assert fetched.content == data
    assert fetched.headers["content-type"] == "image/jpeg"  # from the decoded format
    assert (body.pop("captions_added"), body.pop("captions_skipped")) == (2, 0)
    assert client.get(f"/v1/images/{body['id']}").json() == body


def test_same_bytes_again_answer_200_with_the_existing_record(client) -> None:
    data = png_bytes("orange")
    first = client.post("/v1/images", files={"file": ("a.png", data)}, data={"captions": ["x y"]})
    again = client.post("/v1/images", files={"file": ("b.png", data)})
    assert (first.status_code, again.status_code) == (201, 200)
    assert {**again.json(), "captions_added": 1} == first.json()  # same record, nothing added
    assert again.json()["captions_added"] == 0
    found = client.get("/v1/images", params={"sha256": first.json()["sha256"]}).json()
    assert found["count"] == 1 and found["data"][0]["id"] == first.json()["id"]
    assert client.get("/v1/images", params={"sha256": "0" * 64}).json() == {"data": [], "count": 0}


def test_new_captions_on_a_stored_photo_are_added_and_counted(client, shared_dir) -> None:
    """Re-uploading a stored photo with captions adds those it lacks (one commit), skips exact
    duplicates, and says so; the added captions are searchable and survive as stored rows."""
    path, captions = coco_photos(shared_dir, 2)[1]
    data = path.read_bytes()
    first = client.post(
        "/v1/images", files={"file": ("p.jpg", data)}, data={"captions": captions[:1]}
    )
    assert first.status_code == 201, first.text
    image_id = first.json()["id"]

    sent = [captions[0], captions[1], captions[2], captions[1]]  # one stored, one sent twice
    again = client.post("/v1/images", files={"file": ("p.jpg", data)}, data={"captions": sent})
    assert again.status_code == 200, again.text
    body = again.json()
    assert body["id"] == image_id
    assert (body["captions_added"], body["captions_skipped"]) == (2, 2)
    assert [c["text"] for c in body["captions"]] == captions[:3]
    stored = client.get(f"/v1/images/{image_id}").json()
    assert [c["text"] for c in stored["captions"]] == captions[:3]
    for caption in stored["captions"]:
        assert client.get(f"/v1/captions/{caption['id']}").json()["image_id"] == image_id

    # The photo's new caption is found when searching captions by the photo.
    hits = client.post(
        "/v1/search/captions", json={"image_id": image_id, "limit": 100, "candidates": 100}
    ).json()
    assert {hit["id"] for hit in hits["results"]} >= {c["id"] for c in stored["captions"]}

    # Everything already there: 200, nothing added, all counted as skipped.
    same = client.post("/v1/images", files={"file": ("p.jpg", data)}, data={"captions": sent[:3]})
    assert same.status_code == 200
    assert (same.json()["captions_added"], same.json()["captions_skipped"]) == (0, 3)
    assert len(client.get(f"/v1/images/{image_id}").json()["captions"]) == 3

    # A refused caption refuses the whole request: nothing of it is stored.
    bad = client.post(
        "/v1/images", files={"file": ("p.jpg", data)}, data={"captions": [captions[3], "  "]}
    )
    assert bad.status_code == 422
    assert len(client.get(f"/v1/images/{image_id}").json()["captions"]) == 3


def test_deleted_image_is_gone_everywhere(client) -> None:
    kept = client.post("/v1/images", files={"file": ("k.png", png_bytes("blue"))}).json()
    gone = client.post(
        "/v1/images", files={"file": ("g.png", png_bytes("red"))}, data={"captions": ["a red"]}
    ).json()
    assert client.delete(f"/v1/images/{gone['id']}").status_code == 204
    assert client.get(f"/v1/images/{gone['id']}").status_code == 404
    assert client.get(f"/v1/images/{gone['id']}/file").status_code == 404
    assert client.get(f"/v1/captions/{gone['captions'][0]['id']}").status_code == 404
    hits = client.post("/v1/search/images", json={"text": "a red", "limit": 10}).json()["results"]
    assert [h["id"] for h in hits] == [kept["id"]]
    captions = client.post("/v1/search/captions", json={"image_id": kept["id"]}).json()
    assert captions["results"] == []
    assert client.delete(f"/v1/images/{gone['id']}").status_code == 404


def test_caption_lifecycle(client) -> None:
    image = client.post("/v1/images", files={"file": ("p.png", png_bytes("purple"))}).json()
    created = client.post("/v1/captions", json={"text": "a purple square", "image_id": image["id"]})
    assert created.status_code == 201
    caption = created.json()
    assert caption["image_id"] == image["id"]
    assert client.get(f"/v1/captions/{caption['id']}").json() == caption
    free = client.post("/v1/captions", json={"text": "a caption of nothing"}).json()
    assert free["image_id"] is None
    texts = {h["text"] for h in client.post("/v1/search/captions", json={"image_id": image["id"]})
             .json()["results"]}  # fmt: skip
    assert texts == {"a purple square", "a caption of nothing"}
    assert client.delete(f"/v1/captions/{caption['id']}").status_code == 204
    assert client.get(f"/v1/captions/{caption['id']}").status_code == 404
    assert client.get(f"/v1/images/{image['id']}").json()["captions"] == []


def test_writes_need_a_valid_key_when_keys_are_set(
    tmp_path, tiny_retrieval_model, small_grid_extractor
) -> None:
    settings = make_settings(tmp_path / "data", api_keys=TEST_API_KEY)
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)
    with running_client(app) as client:
        upload = {"file": ("k.png", png_bytes("green"))}
        missing = client.post("/v1/images", files=upload)
        wrong = client.post("/v1/images", files=upload, headers={"X-API-Key": "x" * 24})
        for response in (missing, wrong):
            assert response.status_code == 401
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["errors"][0]["field"] == "header.X-API-Key"
            assert TEST_API_KEY not in response.text
        assert "valid" in wrong.json()["detail"]
        assert client.post("/v1/captions", json={"text": "no key"}).status_code == 401
        assert client.delete("/v1/images/1").status_code == 401

        good = client.post("/v1/images", files=upload, headers={"X-API-Key": TEST_API_KEY})
        assert good.status_code == 201
        # Reads stay open.
        assert client.get(f"/v1/images/{good.json()['id']}").status_code == 200
        search = client.post("/v1/search/images", json={"text": "green"})
        assert search.status_code == 200

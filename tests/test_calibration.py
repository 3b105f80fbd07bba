"""Calibrated match probabilities: the Platt maps, their storage in a checkpoint, and one
`min_score` scale over the real API (uvicorn) whether a search is reranked or not."""

from __future__ import annotations

import warnings

import httpx
import numpy as np
import pytest
from service_support import (
    ServerThread,
    coco_photos,
    make_settings,
    running_client,
    tiny_model,
)
from ui_stack import free_port

from model.calibration import (
    CALIBRATION_MODES,
    DIRECTIONS,
    METADATA_KEY,
    CalibrationError,
    PlattMap,
    ScoreCalibration,
    reliability,
)
from model.checkpoints.checkpoint import load_checkpoint
from model.retrieval import DEFAULT_CHECKPOINT, RetrievalModel
from service.api.app import create_app

PHOTOS = 6
# Deliberately different maps per mode: the pooled cosine and the fused score live on
# different scales, and each must get its own map for one min_score to mean one thing.
TEST_MAPS = {"pooled": (12.0, -4.0), "two_stage": (3.0, 0.5)}


def test_platt_fit_recovers_a_known_map_and_is_calibrated() -> None:
    rng = np.random.default_rng(0)
    raw = rng.normal(0.2, 0.3, 200_000)
    truth = PlattMap(slope=6.0, intercept=-2.5)
    labels = (rng.random(raw.size) < truth(raw)).astype(np.float32)
    fitted = PlattMap.fit(raw, labels)
    assert fitted.slope == pytest.approx(6.0, rel=0.05)
    assert fitted.intercept == pytest.approx(-2.5, abs=0.1)
    curve = reliability(fitted(raw), labels)
    assert curve["ece"] < 0.01
    assert sum(row["count"] for row in curve["bins"]) == raw.size
    # An over-confident map (twice the slope) ranks the same but is measurably miscalibrated.
    assert reliability(PlattMap(12.0, -5.0)(raw), labels)["ece"] > 5 * curve["ece"]


def test_maps_are_monotone_and_within_zero_and_one() -> None:
    raw = np.concatenate([np.linspace(-50, 50, 10_001), [-1e300, 1e300, 0.0]])
    raw.sort()
    for slope, intercept in [(0.01, 0.0), (6.0, -2.5), (1e4, 30.0)]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no overflow on extreme scores
            probability = PlattMap(slope, intercept)(raw)
        assert probability.dtype == np.float32
        assert np.all((probability >= 0.0) & (probability <= 1.0))
        assert np.all(np.diff(probability) >= 0)


def test_a_map_that_would_reverse_the_ranking_is_refused() -> None:
    with pytest.raises(CalibrationError, match="positive slope"):
        PlattMap(slope=-1.0, intercept=0.0)
    with pytest.raises(CalibrationError, match="both matching and non-matching"):
        PlattMap.fit(np.arange(5.0), np.ones(5))


def _test_calibration() -> ScoreCalibration:
    maps = {(d, m): PlattMap(*TEST_MAPS[m]) for d in DIRECTIONS for m in CALIBRATION_MODES}
    return ScoreCalibration(maps=maps, fitted_on="test maps", candidates=100)


def test_calibration_round_trips_through_metadata_and_refuses_a_broken_record() -> None:
    calibration = _test_calibration()
    record = calibration.to_metadata({"ece": {"t2i": 0.01}})
    assert ScoreCalibration.from_metadata({METADATA_KEY: record}) == calibration
    assert ScoreCalibration.from_metadata({}) is None  # an older checkpoint: uncalibrated
    broken = dict(record, maps={"t2i": record["maps"]["t2i"]})
    with pytest.raises(CalibrationError, match="malformed"):
        ScoreCalibration.from_metadata({METADATA_KEY: broken})


def test_the_shipped_model_is_calibrated_with_monotone_maps() -> None:
    model = RetrievalModel.load(device="cpu")
    assert model.calibration is not None, "model/weights/default.pt lacks its calibration"
    assert "dev" in model.calibration.fitted_on
    raw = np.linspace(-2.0, 2.0, 401)
    for direction in DIRECTIONS:
        for reranked in (False, True):
            probability = model.calibration.probability(direction, reranked, raw)
            assert np.all((probability >= 0) & (probability <= 1))
            assert np.all(np.diff(probability) >= 0)


def test_a_checkpoint_without_calibration_still_loads(tmp_path) -> None:
    stored = load_checkpoint(DEFAULT_CHECKPOINT)
    stored.metadata.pop(METADATA_KEY, None)
    path = stored.save(tmp_path / "uncalibrated.pt")
    assert RetrievalModel.load(path, device="cpu").calibration is None


@pytest.fixture(scope="module")
def servers(tmp_path_factory, shared_dir, small_grid_extractor):
    """Two real uvicorn servers over the same photos: a calibrated tiny model, and the same
    model without calibration (the documented fallback)."""
    photos = coco_photos(shared_dir, PHOTOS)
    words = [c for _, captions in coco_photos(shared_dir, 239) for c in captions]
    running, image_ids = {}, []
    for name, calibrated in (("calibrated", True), ("raw", False)):
        model = tiny_model(words)
        model.calibration = _test_calibration() if calibrated else None
        settings = make_settings(tmp_path_factory.mktemp(name) / "data", batch_max_wait_ms=20)
        app = create_app(settings, model=model, extractor=small_grid_extractor)
        with running_client(app) as client:
            for path, captions in photos:
                response = client.post(
                    "/v1/images",
                    files={"file": (path.name, path.read_bytes())},
                    data={"captions": captions[:2]},
                )
                assert response.status_code == 201
                image_ids.append(response.json()["id"])
        server = ServerThread(app, free_port()).start()
        running[name] = server
    yield running, photos, image_ids[:PHOTOS]
    for server in running.values():
        server.stop()


def _search(url: str, path: str, body: dict) -> dict:
    response = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_one_min_score_scale_reranked_or_not(servers) -> None:
    running, photos, _ = servers
    url = running["calibrated"].url
    info = httpx.get(f"{url}/v1/info").json()["scores"]
    assert info["kind"] == "match_probability" and info["calibrated_on"] == "test maps"
    query = photos[1][1][0]
    per_mode = {}
    for rerank in (True, False):
        body = _search(url, "/v1/search/images", {"text": query, "limit": 20, "rerank": rerank})
        assert body["score_kind"] == "match_probability" and body["no_match"] is False
        hits = body["results"]
        assert len(hits) == PHOTOS
        mode = "two_stage" if rerank else "pooled"
        expected = PlattMap(*TEST_MAPS[mode])(np.array([h["raw_score"] for h in hits]))
        assert [h["score"] for h in hits] == pytest.approx(expected.tolist(), abs=1e-6)
        assert all(0.0 <= h["score"] <= 1.0 for h in hits)
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        if not rerank:
            assert all(h["raw_score"] == h["shortlist_score"] for h in hits)
        per_mode[rerank] = hits
    # One threshold, on the probability, in both modes: it keeps exactly the hits whose
    # probability reaches it (the raw scores of the two modes are on different scales).
    threshold = float(np.median([h["score"] for hits in per_mode.values() for h in hits]))
    for rerank, hits in per_mode.items():
        kept = _search(
            url,
            "/v1/search/images",
            {"text": query, "limit": 20, "rerank": rerank, "min_score": threshold},
        )["results"]
        assert [h["id"] for h in kept] == [h["id"] for h in hits if h["score"] >= threshold]
        assert all(h["score"] >= threshold for h in kept)


def test_no_good_match_is_an_empty_answer_that_says_so(servers) -> None:
    running, photos, image_ids = servers
    url = running["calibrated"].url
    for rerank in (True, False):
        body = _search(
            url,
            "/v1/search/images",
            {"text": photos[0][1][0], "rerank": rerank, "min_score": 0.999999},
        )
        assert body["results"] == [] and body["no_match"] is True
        assert "no good match" in body["message"] and "0.999999" in body["message"]
    # image -> captions, on the same scale
    image_id = image_ids[0]
    body = _search(url, "/v1/search/captions", {"image_id": image_id, "min_score": 0.999999})
    assert body["results"] == [] and body["no_match"] is True
    everything = _search(url, "/v1/search/captions", {"image_id": image_id, "limit": 5})
    assert everything["no_match"] is False and everything["message"] is None
    assert all(0.0 <= h["score"] <= 1.0 for h in everything["results"])


def test_an_uncalibrated_model_serves_raw_scores_and_says_so(servers) -> None:
    running, photos, _ = servers
    url = running["raw"].url
    info = httpx.get(f"{url}/v1/info").json()["scores"]
    assert info["kind"] == "raw" and "no calibration" in info["detail"]
    body = _search(url, "/v1/search/images", {"text": photos[2][1][0], "rerank": False})
    assert body["score_kind"] == "raw"
    assert all(h["score"] == h["raw_score"] == h["shortlist_score"] for h in body["results"])

"""A checkpoint records which extractor made its features (name, config, version); training
presets must give one the service can rebuild; the service builds it from the checkpoint,
with the detectron2 files and the device from settings."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from service_support import make_settings, small_extractor

from model.architecture.network import NetworkSpec, RetrievalNetwork
from model.checkpoints.config import CONFIG_DIR
from model.checkpoints.extractor import ExtractorRecord, ExtractorRecordError
from model.retrieval import RetrievalModel
from model.text.vocab import Vocabulary
from model.training.recipes import TrainConfig, TrainConfigError
from model.vision.extractors import check_extractor_config
from model.vision.extractors.detectron2 import Detectron2Unavailable, butd_version
from service.runtime.lifecycle import build_extractor, extractor_settings
from service.runtime.settings import Settings

OFFICIAL_PRESET = CONFIG_DIR / "train_camp_official_f30k.json"
BUTD_RECORD = {
    "name": "detectron2",
    "config": {
        "config_file": "/models/butd_r101_c4_vg.yaml",
        "weights": "/models/faster_rcnn_from_caffe.pkl",
        "min_boxes": 10,
        "max_boxes": 100,
    },
    "version": "butd-r101-vg-10-100-c0.2-n0.3-faster_rcnn_from_caffe-v2",
}


def saved_model(tmp_path: Path, metadata: dict) -> RetrievalModel:
    """A tiny real network saved as a checkpoint with `metadata` and loaded back as the
    service loads it (weights only)."""
    torch.manual_seed(0)
    vocabulary = Vocabulary.build(["a dog on a beach"], min_count=1)
    spec = NetworkSpec(text_encoder="gru", embed_size=16, pooled_dim=8, word_dim=8)
    network = RetrievalNetwork(spec, vocabulary=vocabulary)
    path = network.to_checkpoint(metadata).save(tmp_path / "model.pt")
    return RetrievalModel.load(path, device="cpu")


def test_a_checkpoint_carries_its_extractor_record(tmp_path: Path) -> None:
    record = ExtractorRecord.from_dict(
        {**BUTD_RECORD, "config": {**BUTD_RECORD["config"], "weights": Path("/models/w.pkl")}}
    )
    assert record.config["weights"] == "/models/w.pkl"  # paths are stored as strings
    model = saved_model(tmp_path, {"version": "m1", "extractor": record.to_dict()})
    assert model.extractor_name == "detectron2"
    assert model.extractor_config == record.config
    assert model.extractor_version == BUTD_RECORD["version"]


def test_a_checkpoint_without_a_record_is_the_grid_model(tmp_path: Path) -> None:
    model = saved_model(tmp_path, {"version": "m1"})
    assert (model.extractor_name, model.extractor_config) == ("grid", {"fit": "squash"})
    assert model.extractor_version == ""


@pytest.mark.parametrize(
    ("record", "complaint"),
    [
        ({"name": "", "config": {}}, "'name' must name an extractor"),
        ({"name": "grid", "config": ["fit"]}, "'config' must be a mapping"),
        ({"name": "grid", "version": 2}, "'version' must be a string"),
        ({"name": "grid", "weights": "w"}, "unknown keys \\['weights'\\]"),
    ],
)
def test_malformed_records_are_refused(record: dict, complaint: str) -> None:
    with pytest.raises(ExtractorRecordError, match=complaint):
        ExtractorRecord.from_dict(record)
    with pytest.raises(ExtractorRecordError, match="checkpoint metadata"):
        ExtractorRecord.from_metadata({"extractor": record})


def test_the_official_preset_writes_a_full_extractor_record() -> None:
    config = TrainConfig.load(OFFICIAL_PRESET)
    record = ExtractorRecord.from_dict(config.metadata()["extractor"])
    assert record.name == "detectron2"
    check_extractor_config(record.name, record.config)  # what from_config will accept
    version_settings = {k: v for k, v in record.config.items() if k != "config_file"}
    assert record.version == butd_version(**version_settings)
    assert (record.config["min_boxes"], record.config["max_boxes"]) == (36, 36)


def test_a_preset_whose_extractor_cannot_be_built_is_refused(tmp_path: Path) -> None:
    preset = json.loads(OFFICIAL_PRESET.read_text())
    for extractor, complaint in (
        ({"name": "detectron2", "config": {}}, "needs weights, config_file"),
        ({"name": "detectron2", "config": {**BUTD_RECORD["config"], "boxes": 3}}, "boxes"),
        ({"name": "clip", "config": {}}, "no extractor named 'clip'"),
    ):
        path = tmp_path / "preset.json"
        path.write_text(json.dumps({**preset, "extractor": extractor}))
        with pytest.raises(TrainConfigError, match=f"extractor: .*{complaint}"):
            TrainConfig.load(path)


def test_the_service_takes_the_checkpoints_extractor_and_the_settings_files(
    tmp_path: Path,
) -> None:
    model = saved_model(tmp_path, {"version": "m1", "extractor": BUTD_RECORD})
    name, config = extractor_settings(make_settings(tmp_path, device="cpu"), model)
    assert name == "detectron2"
    assert config == {**BUTD_RECORD["config"], "device": "cpu"}

    yaml, weights = tmp_path / "butd.yaml", tmp_path / "random.pth"
    settings = make_settings(tmp_path, detectron2_config=yaml, detectron2_weights=weights)
    _, config = extractor_settings(settings, model)
    assert (config["config_file"], config["weights"]) == (yaml, weights)
    assert config["max_boxes"] == 100  # the rest stays the checkpoint's
    # the service really builds from there: the file it misses is the setting's
    with pytest.raises(Detectron2Unavailable, match=str(yaml)):
        build_extractor(settings, model)

    with pytest.raises(ValueError, match="trained on 'detectron2' regions"):
        extractor_settings(make_settings(tmp_path, extractor="grid"), model)


def test_a_model_of_precomputed_regions_is_refused_by_the_service(tmp_path: Path) -> None:
    model = saved_model(tmp_path, {"extractor": {"name": "precomputed", "config": {}}})
    with pytest.raises(ValueError, match="imported with --extractor precomputed"):
        extractor_settings(make_settings(tmp_path, device="cpu"), model)


def test_a_different_extractor_version_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    grid = small_extractor()
    record = {"name": "grid", "config": {"fit": "squash", "input_size": 64}}
    same = saved_model(tmp_path, {"extractor": {**record, "version": grid.version}})
    with caplog.at_level(logging.WARNING, logger="service.runtime.lifecycle"):
        assert build_extractor(make_settings(tmp_path, device="cpu"), same).version == grid.version
    assert not caplog.records
    other = saved_model(tmp_path, {"extractor": {**record, "version": "effnet-other"}})
    with caplog.at_level(logging.WARNING, logger="service.runtime.lifecycle"):
        build_extractor(make_settings(tmp_path, device="cpu"), other)
    assert "came from extractor version effnet-other" in caplog.text


def test_the_detectron2_files_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMPSEARCH_DETECTRON2_CONFIG", "/models/butd.yaml")
    monkeypatch.setenv("CAMPSEARCH_DETECTRON2_WEIGHTS", "/models/vg.pth")
    settings = Settings(_env_file=None)
    assert settings.detectron2_config == Path("/models/butd.yaml")
    assert settings.detectron2_weights == Path("/models/vg.pth")
    assert settings.extractor is None  # unset: the checkpoint's

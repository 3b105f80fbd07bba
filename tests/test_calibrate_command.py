"""`camp-search calibrate` end to end: fit on a precomputed split, store the maps in the
checkpoint (weights untouched), and `--check` measures stored maps without writing anything."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from model.architecture.network import NetworkSpec, RetrievalNetwork
from model.calibration import CALIBRATION_MODES, DIRECTIONS, METADATA_KEY
from model.checkpoints.checkpoint import load_checkpoint
from model.retrieval import DEFAULT_CHECKPOINT, RetrievalModel
from model.text.vocab import Vocabulary
from service.cli.main import app

DEV_IMAGES = 24


@pytest.fixture
def split_and_checkpoint(shared_dir, tmp_path):
    """The official fake split (the parity files) in the precomputed layout, and a small
    seeded model for it, saved as our checkpoint without calibration."""
    payload = torch.load(
        shared_dir / "parity" / "camp_tiny_eval_fake_5N_rows.pt", weights_only=False
    )
    folder = tmp_path / "precomp"
    folder.mkdir()
    np.save(folder / "dev_ims.npy", payload["image_feats"].numpy())
    (folder / "dev_caps.txt").write_text("\n".join(payload["captions_txt"]) + "\n")
    torch.manual_seed(0)
    spec = NetworkSpec(
        text_encoder="gru", embed_size=16, region_dim=64, pooled_dim=8, pooled_hidden=16, word_dim=8
    )
    network = RetrievalNetwork(spec, vocabulary=Vocabulary(payload["vocab_words"]))
    checkpoint = network.to_checkpoint({"version": "calibrate-test"}).save(tmp_path / "m.pt")
    return folder, checkpoint


def _calibrate(*args: str) -> str:
    result = CliRunner().invoke(app, ["calibrate", "--device", "cpu", "--candidates", "10", *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def real_dev_subset(shared_dir, tmp_path):
    """The first DEV_IMAGES Flickr8K dev photos as a manifest (features extracted by the
    command with the shipped model's own extractor), and a copy of the shipped checkpoint
    without its calibration."""
    rows = []
    for line in (shared_dir / "data" / "flickr8k" / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] == "dev":
            row["image"] = str(shared_dir / "data" / "flickr8k" / row["image"])
            rows.append(row)
        if len(rows) == DEV_IMAGES:
            break
    manifest = tmp_path / "dev" / "manifest.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    stored = load_checkpoint(DEFAULT_CHECKPOINT)
    stored.metadata.pop(METADATA_KEY, None)
    return manifest, stored.save(tmp_path / "uncalibrated.pt")


def test_calibrate_stores_maps_and_check_writes_nothing(real_dev_subset, tmp_path):
    folder, checkpoint = real_dev_subset
    assert RetrievalModel.load(checkpoint, device="cpu").calibration is None
    out, report_path = tmp_path / "calibrated.pt", tmp_path / "report.json"
    output = _calibrate(
        "--data", str(folder), "--checkpoint", str(checkpoint), "--out", str(out),
        "--json", str(report_path),
    )  # fmt: skip
    assert "ECE" in output and f"calibration stored in {out}" in output.replace("\n", "")
    before, after = load_checkpoint(checkpoint), load_checkpoint(out)
    assert all(torch.equal(before.state_dict[k], after.state_dict[k]) for k in before.state_dict)
    record = after.metadata[METADATA_KEY]
    assert record["candidates"] == 10 and "dev" in record["fitted_on"]
    model = RetrievalModel.load(out, device="cpu")
    report = json.loads(report_path.read_text())
    for direction in DIRECTIONS:
        for mode in CALIBRATION_MODES:
            fitted = model.calibration.maps[(direction, mode)]
            assert fitted.slope > 0
            assert report[direction][mode]["slope"] == pytest.approx(fitted.slope)
            curve = report[direction][mode]["in_sample"]
            assert sum(row["count"] for row in curve["bins"]) == curve["pairs"]
            assert 0.0 <= curve["ece"] <= 1.0
    # t2i: 5N caption queries x 10 candidates; i2t: N image queries x 10 candidates
    images = DEV_IMAGES
    assert report["t2i"]["pooled"]["in_sample"]["pairs"] == images * 5 * 10
    assert report["i2t"]["pooled"]["in_sample"]["pairs"] == images * 10

    stored = out.read_bytes()
    checked = tmp_path / "check.json"
    _calibrate("--data", str(folder), "--checkpoint", str(out), "--check", "--json", str(checked))
    assert out.read_bytes() == stored  # --check fits and stores nothing
    held_out = json.loads(checked.read_text())
    assert held_out["t2i"]["two_stage"]["slope"] == pytest.approx(
        model.calibration.maps[("t2i", "two_stage")].slope
    )


def test_check_refuses_a_model_without_calibration(split_and_checkpoint):
    folder, checkpoint = split_and_checkpoint
    result = CliRunner().invoke(
        app,
        ["calibrate", "--data", str(folder), "--checkpoint", str(checkpoint), "--check",
         "--device", "cpu", "--candidates", "10"],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "no calibration to check" in result.output


def test_a_fit_that_would_reverse_the_ranking_is_refused(split_and_checkpoint):
    """A random-weight model whose scores rank matches below non-matches gets no map (it
    would flip the ranking the probabilities are shown in): the command says why."""
    folder, checkpoint = split_and_checkpoint
    result = CliRunner().invoke(
        app,
        ["calibrate", "--data", str(folder), "--checkpoint", str(checkpoint), "--device", "cpu",
         "--candidates", "10"],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "positive slope" in result.output
    assert METADATA_KEY not in load_checkpoint(checkpoint).metadata

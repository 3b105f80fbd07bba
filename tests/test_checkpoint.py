"""Our checkpoint format, the official-checkpoint importer, and the config files."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch
from shared_paths import PARITY_DIR

from model.architecture.camp import CampModel
from model.checkpoints.checkpoint import (
    CheckpointError,
    checkpoint_from_model,
    import_official_checkpoint,
    load_checkpoint,
)
from model.checkpoints.config import CampConfig, ConfigError, available_configs, load_config
from model.text.vocab import SPECIAL_TOKENS, Vocabulary

OFFICIAL = PARITY_DIR / "camp_tiny_checkpoint.pth.tar"


@pytest.fixture(scope="module")
def official_payload() -> dict:
    return torch.load(OFFICIAL)


def _scores(model: CampModel) -> torch.Tensor:
    inputs = torch.load(PARITY_DIR / "camp_tiny_inputs.pt")
    with torch.no_grad():
        return model(inputs["B_images"], inputs["B_captions"], inputs["B_lengths"])


def test_shipped_configs_load_and_build():
    assert {"camp_f30k", "camp_coco", "camp_tiny"} <= set(available_configs())
    f30k = load_config("camp_f30k")
    assert (f30k.vocab_size, f30k.word_dim, f30k.embed_size, f30k.img_dim) == (
        8590,
        300,
        1024,
        2048,
    )
    assert (f30k.num_heads, f30k.max_words, f30k.pad_width) == (4, 47, 50)
    tiny = CampModel.from_config(load_config("camp_tiny"))
    assert tiny.scorer.embed_size == 32


def test_config_refuses_unknown_keys_and_bad_sizes(tmp_path):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"vocab_size": 100, "embed_sise": 64}))
    with pytest.raises(ConfigError, match="embed_sise"):
        load_config(path)
    with pytest.raises(ConfigError, match="embed_size"):
        CampConfig(vocab_size=100, embed_size=0)
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config")


def test_our_format_round_trip_loads_weights_only(tmp_path):
    model = import_official_checkpoint(OFFICIAL).build_model()
    vocab = Vocabulary([*SPECIAL_TOKENS, *(f"w{i}" for i in range(36))])
    extras = {"shortlist_heads": {"image.weight": torch.randn(8, 32)}, "fusion": torch.tensor(0.5)}
    path = checkpoint_from_model(model, vocab, extras=extras, metadata={"epoch": 3}).save(
        tmp_path / "camp.pt"
    )
    raw = torch.load(path, weights_only=True)  # no pickled code needed
    assert raw["format_version"] == 1 and raw["config"]["embed_size"] == 32
    loaded = load_checkpoint(path)
    assert loaded.vocabulary == vocab and loaded.metadata == {"epoch": 3}
    torch.testing.assert_close(loaded.extras["shortlist_heads"]["image.weight"],
                               extras["shortlist_heads"]["image.weight"])  # fmt: skip
    torch.testing.assert_close(_scores(loaded.build_model()), _scores(model), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*.tmp")), "the atomic write left a temp file behind"


def test_import_reads_sizes_from_the_weights(official_payload):
    checkpoint = import_official_checkpoint(OFFICIAL)
    shapes = json.loads((PARITY_DIR / "camp_tiny_config.json").read_text())["state_dict_shapes"]
    vocab_size, word_dim = shapes["txt_enc"]["module.embed.weight"]
    assert (checkpoint.config.vocab_size, checkpoint.config.word_dim) == (vocab_size, word_dim)
    assert checkpoint.metadata["source"] == "official"
    with pytest.raises(CheckpointError, match="vocabulary has 5 words"):
        import_official_checkpoint(OFFICIAL, vocabulary=Vocabulary([*SPECIAL_TOKENS, "x"]))


def test_doctored_checkpoint_names_missing_unexpected_and_mismatched_keys(
    official_payload, tmp_path
):
    img, txt, sim = (dict(part) for part in official_payload["model"])
    del sim["module.fc_out.3.bias"]
    sim["module.fc_2.0.weight"] = torch.zeros(32, 32)
    path = tmp_path / "doctored.pth.tar"
    torch.save({**official_payload, "model": [img, txt, sim]}, path)
    with pytest.raises(CheckpointError) as error:
        import_official_checkpoint(path)
    message = str(error.value)
    assert "missing keys ['scorer.score_out.bias']" in message
    assert "scorer.text_fusion.weight: file (32, 32) vs model (32, 64)" in message

    sim_renamed = dict(official_payload["model"][2])
    sim_renamed["module.fc_3.0.weight"] = sim_renamed.pop("module.fc_2.0.weight")
    torch.save({**official_payload, "model": [img, txt, sim_renamed]}, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['sim/module.fc_3.0.weight'\]"):
        import_official_checkpoint(path)


def test_files_that_are_not_camp_checkpoints_are_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="not a CAMP checkpoint"):
        import_official_checkpoint(path)
    with pytest.raises(CheckpointError, match="import_official_checkpoint"):
        load_checkpoint(OFFICIAL)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    with pytest.raises(CheckpointError):
        import_official_checkpoint(text_file)


def test_unsupported_official_options_are_refused(official_payload, tmp_path):
    path = tmp_path / "sum_fusion.pth.tar"
    torch.save({**official_payload, "opt": {**official_payload["opt"], "fusion_func": "sum"}}, path)
    with pytest.raises(CheckpointError, match="fusion_func"):
        import_official_checkpoint(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("true",))


def test_checkpoint_with_code_in_its_pickle_is_refused(official_payload, tmp_path):
    path = tmp_path / "evil.pth.tar"
    torch.save({**official_payload, "opt": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="system"):
        import_official_checkpoint(path)


@pytest.fixture
def easydict_module(monkeypatch):
    """A stand-in for the `easydict` package the released checkpoints pickled `opt` with."""
    module = types.ModuleType("easydict")

    class EasyDict(dict):  # like easydict: keys are also attributes
        def __init__(self, data=None):
            super().__init__()
            for key, value in (data or {}).items():
                setattr(self, key, value)

        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            super().__setitem__(name, value)

    EasyDict.__module__, EasyDict.__qualname__ = "easydict", "EasyDict"
    module.EasyDict = EasyDict
    monkeypatch.setitem(sys.modules, "easydict", module)
    return module


def test_release_with_easydict_opt_imports_without_easydict(
    official_payload, easydict_module, monkeypatch, tmp_path
):
    opt = easydict_module.EasyDict(official_payload["opt"])
    assert opt.embed_size == 32
    path = tmp_path / "model_best.pth.tar"
    torch.save({**official_payload, "opt": opt}, path)
    monkeypatch.delitem(sys.modules, "easydict")
    checkpoint = import_official_checkpoint(path)
    assert checkpoint.metadata["opt"]["measure"] == "gate_fusion_new"
    reference = import_official_checkpoint(OFFICIAL).build_model()
    torch.testing.assert_close(
        _scores(checkpoint.build_model()), _scores(reference), rtol=0, atol=0
    )

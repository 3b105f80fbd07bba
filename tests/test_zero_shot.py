"""The zero-shot channel (model/zeroshot.py): its math on real photos and the real model, and
how it travels in a checkpoint (`camp-search zero-shot`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.checkpoints.checkpoint import load_checkpoint
from model.retrieval import DEFAULT_CHECKPOINT, RetrievalModel
from model.vision.efficientnet_lite import efficientnet_lite0, pretrained_weights_path
from model.vision.extractors.grid import GridExtractor
from model.vision.images import decode_image
from model.zeroshot import (
    METADATA_KEY,
    ZeroShotError,
    ZeroShotSettings,
    load_class_names,
)

TEXTS = ["a cat", "a cup of coffee", "two dogs run on the grass", "the moon"]


@pytest.fixture(scope="module")
def model() -> RetrievalModel:
    model = RetrievalModel.load(device="cpu")
    model.set_zero_shot(None)
    return model


@pytest.fixture(scope="module")
def photos(shared_dir) -> list:
    folder = shared_dir / "data" / "coco-mini" / "images"
    paths = sorted(folder.glob("*.jpg"))[:3]
    return [decode_image(path.read_bytes()).image for path in paths]


@pytest.fixture(scope="module")
def regions(photos) -> np.ndarray:
    return np.stack([r.features for r in GridExtractor(device="cpu").extract(photos)])


def test_class_names_are_the_thousand_imagenet_classes_in_logit_order():
    names = load_class_names()
    assert len(names) == 1000
    assert names[0] == "tench" and names[281] == "tabby cat" and names[504] == "coffee mug"


def test_class_probabilities_from_stored_regions_equal_the_backbones_own_classifier(
    model, photos, regions
):
    """The stored grid regions are the head features: softmax(_fc(mean)) of them equals the
    unfolded ImageNet network's forward() on the same input."""
    model.set_zero_shot(ZeroShotSettings(weight=1.0, temperature=1.0))
    try:
        probabilities = model.zero_shot.class_probabilities(torch.from_numpy(regions))
    finally:
        model.set_zero_shot(None)
    extractor = GridExtractor(device="cpu")
    batch, _ = extractor._prepare(photos)
    with torch.inference_mode():
        expected = torch.softmax(efficientnet_lite0("imagenet")(batch.contiguous()), dim=-1)
    assert torch.allclose(probabilities, expected, atol=2e-3)
    assert (probabilities.argmax(1) == expected.argmax(1)).all()


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_the_channel_reads_the_classifier_of_the_models_own_backbone(model, variant):
    """A model whose grid extractor is Lite2 gets Lite2's ImageNet head, not Lite0's."""
    original = model.extractor_config
    model.extractor_config = {**original, "variant": variant}
    try:
        model.set_zero_shot(ZeroShotSettings(weight=1.0, temperature=1.0))
        weight, bias = model.zero_shot.classifier_weight, model.zero_shot.classifier_bias
    finally:
        model.extractor_config = original
        model.set_zero_shot(None)
    shipped = torch.load(pretrained_weights_path(variant), map_location="cpu", weights_only=True)
    assert torch.equal(weight, shipped["_fc.weight"]) and torch.equal(bias, shipped["_fc.bias"])


def test_shortlist_inner_product_is_exactly_pooled_plus_w_times_zero_shot(model, regions):
    weight, temperature = 0.7, 2.0
    base_images = model.pooled_images(regions)
    base_texts = model.encode_texts(TEXTS).pooled
    model.set_zero_shot(ZeroShotSettings(weight=weight, temperature=temperature))
    try:
        channel = model.zero_shot
        images = model.pooled_images(regions)
        texts = model.encode_texts(TEXTS).pooled
        # the channel's parts, computed here from their definitions
        mean = torch.from_numpy(regions).mean(1)
        logits = F.linear(mean, channel.classifier_weight, channel.classifier_bias)
        z = F.normalize(torch.softmax(logits / temperature, -1) @ channel.class_embeddings)
        token_ids, _ = model.tokenize(TEXTS)
        features, lengths = model.text_features(token_ids)
        mask = (torch.arange(features.shape[1])[None] < lengths[:, None]).float()[..., None]
        u = F.normalize((features * mask).sum(1) / mask.sum(1))
    finally:
        model.set_zero_shot(None)
    assert images.shape[1] == texts.shape[1] == model.pooled_dim + 384
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    fused = base_images @ base_texts.T + weight * (z @ u.T).numpy()
    np.testing.assert_allclose((images @ texts.T) * (1 + weight), fused, atol=1e-5)


def test_rerank_fusion_undoes_the_shortlist_scale(model):
    shortlist, logits = torch.tensor([0.2, -0.1, 0.5]), torch.tensor([1.0, 2.0, -3.0])
    a = float(model.network.fusion.shortlist_weight.detach())
    b = float(model.network.fusion.camp_weight.detach())
    np.testing.assert_allclose(model.fuse(shortlist, logits), a * shortlist + b * logits, 1e-5)
    model.set_zero_shot(ZeroShotSettings(weight=0.5, temperature=1.0))
    try:
        fused = model.fuse(shortlist, logits)
    finally:
        model.set_zero_shot(None)
    np.testing.assert_allclose(fused, a * 1.5 * shortlist + b * logits, rtol=1e-5)


def test_other_settings_change_the_version_so_vectors_never_mix(model):
    base = model.version
    model.set_zero_shot(ZeroShotSettings(weight=0.5, temperature=2.0))
    with_channel = model.version
    model.set_zero_shot(None)
    assert with_channel != base and model.version == base
    assert model.pooled_dim == model.network.pooled_dim


def test_the_channel_is_refused_for_features_it_cannot_read(model):
    name = model.extractor_name
    model.extractor_name = "detectron2"
    try:
        with pytest.raises(ZeroShotError, match="grid features"):
            model.set_zero_shot(ZeroShotSettings(weight=0.5, temperature=1.0))
    finally:
        model.extractor_name = name
    with pytest.raises(ZeroShotError):
        ZeroShotSettings(weight=-1.0, temperature=1.0)
    with pytest.raises(ZeroShotError):
        ZeroShotSettings(weight=1.0, temperature=0.0)


def test_zero_shot_command_writes_a_new_version_with_its_class_embeddings(tmp_path, regions):
    from service.cli.zero_shot import run_zero_shot

    out = tmp_path / "model.pt"
    run_zero_shot(
        DEFAULT_CHECKPOINT,
        out,
        weight=0.3,
        temperature=2.0,
        prompt="a photo of a {}.",
        version="test-zs",
        chosen_by="a test",
    )
    stored = load_checkpoint(out)
    assert stored.metadata["version"] == "test-zs"
    assert stored.metadata[METADATA_KEY]["weight"] == 0.3
    assert "calibration" not in stored.metadata
    loaded = RetrievalModel.load(out, device="cpu")
    assert loaded.version == "test-zs"
    assert loaded.zero_shot is not None and loaded.pooled_dim == loaded.network.pooled_dim + 384
    # E came from the checkpoint and equals what the class names give
    stored_e = loaded.zero_shot.class_embeddings.clone()
    assert torch.allclose(stored_e, loaded._embed_class_names("a photo of a {}."), atol=1e-5)
    assert loaded.pooled_images(regions).shape == (len(regions), loaded.pooled_dim)


def test_evaluate_ranks_with_and_without_the_channel_in_one_run(tmp_path, shared_dir, capsys):
    """`camp-search evaluate --without-zero-shot` on 20 coco-mini photos, the shipped model;
    both tables name the shipped scorer in the rows ranked by it alone."""
    from model.eval.data import read_lines
    from service.cli.evaluate import run_evaluate

    model = RetrievalModel.load(device="cpu")
    assert model.zero_shot is not None, "the shipped model carries the zero-shot channel"
    manifest = shared_dir / "data" / "coco-mini" / "manifest.jsonl"
    rows = [json.loads(line) for line in read_lines(manifest)[:20]]
    photos = [decode_image((manifest.parent / r["image"]).read_bytes()).image for r in rows]
    features = [r.features for r in GridExtractor(device="cpu").extract(photos)]
    np.save(tmp_path / "dev_ims.npy", np.stack(features).astype(np.float16))
    captions = [c for r in rows for c in r["captions"][:5]]
    (tmp_path / "dev_caps.txt").write_text("\n".join(captions) + "\n")
    result = run_evaluate(
        tmp_path,
        "dev",
        None,
        None,
        ["pooled", "two_stage"],
        "cpu",
        ks="10",
        without_zero_shot=True,
    )
    with_channel, without = result["pooled"]["rsum"], result["without_zero_shot"]["pooled"]["rsum"]
    assert with_channel != without
    assert 0 < without <= 600 and 0 < with_channel <= 600
    assert "10" in result["without_zero_shot"]["two_stage"]
    printed = capsys.readouterr().err  # the commands' console is stderr
    assert printed.count("IMRAM alone, top 10") == 2 and "CAMP alone" not in printed

"""RetrievalModel: the contract the service codes against (model/retrieval.py)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from model.architecture.network import NetworkSpec, RetrievalNetwork
from model.checkpoints.checkpoint import CheckpointError, load_checkpoint
from model.checkpoints.config import ConfigError
from model.devices import DeviceUnavailable, resolve_device
from model.retrieval import DEFAULT_CHECKPOINT, RetrievalModel
from model.text.minilm import load_minilm
from model.text.registry import UnknownTextEncoder, registered_text_encoders
from model.text.vocab import Vocabulary

REGION_DIM = 24
REGIONS = 6
TEXTS = [
    "A dog runs across the green grass .",
    "two children",
    "A man in a red jacket climbs a steep rock wall near the sea .",
]
METADATA = {"version": "test-v1", "extractor": {"name": "grid", "config": {"fit": "squash"}}}


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def _network(kind: str, backbone=None) -> RetrievalNetwork:
    torch.manual_seed(0)
    spec = NetworkSpec(
        text_encoder=kind,
        embed_size=16,
        region_dim=REGION_DIM,
        pooled_dim=8,
        pooled_hidden=12,
        word_dim=10,
    )
    vocabulary = Vocabulary.build(TEXTS, min_count=1) if kind == "gru" else None
    network = RetrievalNetwork(spec, vocabulary=vocabulary, backbone=backbone)
    with torch.no_grad():  # a fusion that uses both scores, so the tests see both
        network.fusion.shortlist_weight.fill_(3.0)
        network.fusion.camp_weight.fill_(0.7)
    return network


def _model(network: RetrievalNetwork) -> RetrievalModel:
    return RetrievalModel(
        network,
        version="test-v1",
        extractor_name="grid",
        extractor_config={"fit": "squash"},
        device=torch.device("cpu"),
    )


def _regions(count: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, REGIONS, REGION_DIM)).astype(np.float16)


@pytest.fixture(scope="module", params=["minilm", "gru"])
def model(request, minilm) -> RetrievalModel:
    return _model(_network(request.param, minilm if request.param == "minilm" else None))


def test_save_load_round_trip_is_exact(model, tmp_path, minilm):
    path = model.network.to_checkpoint(METADATA).save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)  # our format needs no pickled code
    assert payload["extras"]["retrieval"]["spec"]["text_encoder"] == model.network.spec.text_encoder
    loaded = RetrievalModel.load(path, device="cpu")
    assert (loaded.version, loaded.extractor_name, loaded.extractor_config) == (
        "test-v1",
        "grid",
        {"fit": "squash"},
    )
    assert (loaded.region_dim, loaded.pooled_dim) == (REGION_DIM, 8)
    before, after = model.encode_texts(TEXTS), loaded.encode_texts(TEXTS)
    np.testing.assert_array_equal(before.pooled, after.pooled)
    assert before.token_ids == after.token_ids
    regions = _regions(3)
    np.testing.assert_array_equal(model.pooled_images(regions), loaded.pooled_images(regions))
    shortlist = np.array([0.2, -0.1, 0.5], dtype=np.float32)
    np.testing.assert_array_equal(
        model.rerank_pairs(model.precompute_images(regions), before.precompute, shortlist),
        loaded.rerank_pairs(loaded.precompute_images(regions), after.precompute, shortlist),
    )


def test_encode_texts_shapes_and_alignment(model):
    encoded = model.encode_texts(TEXTS)
    assert encoded.pooled.shape == (3, model.pooled_dim) and encoded.pooled.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(encoded.pooled, axis=1), 1.0, rtol=1e-5)
    assert [len(t) for t in encoded.tokens] == [len(i) for i in encoded.token_ids]
    assert encoded.precompute.lengths.tolist() == [len(i) for i in encoded.token_ids]
    assert encoded.tokens[1][1:-1] == ["two", "children"]
    one = encoded.precompute.select([1])
    assert len(one) == 1 and one.words.shape[1] == len(encoded.tokens[1])


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_is_refused(model, text):
    with pytest.raises(ValueError, match="empty"):
        model.encode_texts(["fine", text])


def test_rerank_pairs_equals_direct_scorer_plus_fusion(model):
    """The precompute path + fusion equals CAMP's direct form (sigmoid -> logit) + fusion."""
    regions = _regions(3)
    encoded = model.encode_texts(TEXTS)
    shortlist = np.array([0.3, 0.1, -0.2], dtype=np.float32)
    got = model.rerank_pairs(model.precompute_images(regions), encoded.precompute, shortlist)

    network = model.network
    with torch.no_grad():
        features, lengths = model.text_features(encoded.token_ids)
        words = network.words_from_features(features, lengths)
        images = network.camp.image_encoder(torch.from_numpy(regions.astype(np.float32)))
        direct = network.camp.scorer(images, words.words, words.mask).double()  # sigmoid [3, 3]
        logits = torch.logit(direct.diagonal())
        w_s, w_c = network.fusion.shortlist_weight.double(), network.fusion.camp_weight.double()
        expected = (w_s * torch.from_numpy(shortlist).double() + w_c * logits).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_rerank_is_independent_of_batching_and_padding(model):
    """One query's K candidates scored together equal each pair scored alone."""
    regions = _regions(4, seed=3)
    images = model.precompute_images(regions)
    encoded = model.encode_texts(TEXTS)
    shortlist = np.linspace(-0.5, 0.5, 4).astype(np.float32)
    for caption in range(len(TEXTS)):
        repeated = encoded.precompute.select([caption] * 4)  # one query against K=4 images
        batched = model.rerank_pairs(images, repeated, shortlist)
        alone = [
            model.rerank_pairs(
                images.select([k]), encoded.precompute.select([caption]), shortlist[k : k + 1]
            )[0]
            for k in range(4)
        ]
        np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-5)
    # Several queries in one call (the micro-batcher's concatenation), padded to the longest.
    mixed = encoded.precompute.select([1, 2, 0, 1])
    together = model.rerank_pairs(images, mixed, shortlist)
    single = [
        model.rerank_pairs(images.select([k]), mixed.select([k]), shortlist[k : k + 1])[0]
        for k in range(4)
    ]
    np.testing.assert_allclose(together, single, rtol=1e-5, atol=1e-5)


def test_rerank_refuses_mismatched_scores(model):
    images = model.precompute_images(_regions(2))
    captions = model.encode_texts(TEXTS[:2]).precompute
    with pytest.raises(ValueError, match="one shortlist score per pair"):
        model.rerank_pairs(images, captions, np.zeros(3, dtype=np.float32))


def test_region_features_of_the_wrong_width_are_refused(model):
    with pytest.raises(ValueError, match=str(REGION_DIM)):
        model.pooled_images(np.zeros((1, REGIONS, REGION_DIM + 1), dtype=np.float32))


def test_explain_pair_shapes_and_json(model):
    encoded = model.encode_texts(TEXTS)
    image = model.precompute_images(_regions(1))
    explanation = model.explain_pair(image, encoded.precompute.select([2]))
    length = len(encoded.tokens[2])
    assert np.array(explanation.word_region).shape == (length, REGIONS)
    np.testing.assert_allclose(np.array(explanation.word_region).sum(1), 1.0, rtol=1e-5)
    assert len(explanation.region_pooling) == REGIONS
    assert len(explanation.word_pooling) == length
    np.testing.assert_allclose(sum(explanation.word_pooling), 1.0, rtol=1e-5)
    assert 0.0 < explanation.camp_score < 1.0
    json.dumps(dataclasses.asdict(explanation))


def test_explain_pair_refuses_batches(model):
    encoded = model.encode_texts(TEXTS)
    with pytest.raises(ValueError, match="one pair"):
        model.explain_pair(model.precompute_images(_regions(2)), encoded.precompute.select([0]))


def test_shipped_default_loads_weights_only():
    checkpoint = load_checkpoint(DEFAULT_CHECKPOINT)  # torch.load(weights_only=True)
    assert DEFAULT_CHECKPOINT.stat().st_size <= 40 * 2**20
    assert checkpoint.metadata["extractor"]["name"] == "grid"
    assert "pooled_heads" in checkpoint.extras and "fusion" in checkpoint.extras
    model = RetrievalModel.load(None, device="cpu")
    assert model.version == checkpoint.metadata["version"]
    assert (model.extractor_name, model.region_dim) == ("grid", 1280)
    encoded = model.encode_texts(["a dog plays in the snow"])
    assert encoded.pooled.shape == (1, model.pooled_dim)


def test_tensor_byte_counts_are_what_the_tensors_hold(model):
    """The search memory budget reckons candidates with these counts: exact for images, an
    upper bound for captions that the longest caption the model reads reaches."""
    from service.search.pipeline import _compacted, _held_bytes

    for regions in (1, REGIONS):
        precompute = model.precompute_images(_regions(1)[:, :regions])
        assert _held_bytes(precompute) == model.image_tensor_bytes(regions)
    longest = " ".join(["dog"] * 500)
    encoded = model.encode_texts([*TEXTS, longest])
    held = [_held_bytes(_compacted(encoded.precompute.select([row]))) for row in range(4)]
    assert max(held[:3]) < model.caption_tensor_bytes() == held[3]


def test_text_encoders_come_from_the_registry_with_their_tokenizers(model):
    assert [name for name, _ in registered_text_encoders()] == ["gru", "minilm"]
    spec = model.network.spec
    tokenizer = spec.text_kind.tokenizer(spec, model.network.vocabulary, max_words=47)
    assert tokenizer(TEXTS) == model.tokenize(TEXTS)
    assert tokenizer.max_tokens == model.max_caption_tokens
    with pytest.raises(UnknownTextEncoder, match="choose one of"):
        NetworkSpec(text_encoder="bert")


def test_network_spec_refuses_unknown_keys():
    with pytest.raises(ConfigError, match="embed_sise"):
        NetworkSpec.from_dict({"text_encoder": "gru", "embed_sise": 16})
    checkpoint = _network("gru").to_checkpoint(METADATA)
    checkpoint.extras["retrieval"]["spec"]["embed_sise"] = 16
    with pytest.raises(CheckpointError, match="embed_sise"):
        RetrievalNetwork.from_checkpoint(checkpoint)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_is_refused_where_there_is_none():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceUnavailable, match="CUDA is not available"):
        RetrievalModel.load(device="cuda")

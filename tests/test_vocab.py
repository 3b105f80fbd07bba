"""Tokenizer rules (nltk Treebank-style, no downloads) and vocabulary loading, safe pickles."""

from __future__ import annotations

import json
import pickle
import sys
import types

import pytest

from model.text.tokenizer import tokenize
from model.text.vocab import (
    END_ID,
    START_ID,
    UNK_ID,
    UnsafePickleError,
    Vocabulary,
    VocabularyError,
    load_vocabulary,
)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("A man riding a horse.", ["a", "man", "riding", "a", "horse", "."]),
        ("Don't go!", ["do", "n't", "go", "!"]),
        ("He can't swim", ["he", "ca", "n't", "swim"]),
        ("I cannot", ["i", "can", "not"]),
        ("It's John's car", ["it", "'s", "john", "'s", "car"]),
        ("they're we've I'll I'm", ["they", "'re", "we", "'ve", "i", "'ll", "i", "'m"]),
        ('She said "hello" twice', ["she", "said", "``", "hello", "''", "twice"]),
        ('"Quoted start', ["``", "quoted", "start"]),
        ("A well-known 20-year-old man", ["a", "well-known", "20-year-old", "man"]),
        ("Two dogs, a cat: and more", ["two", "dogs", ",", "a", "cat", ":", "and", "more"]),
        ("3,500 people at 3:30", ["3,500", "people", "at", "3:30"]),
        ("It costs $5.50 today", ["it", "costs", "$", "5.50", "today"]),
        ("A (red) car [left]", ["a", "(", "red", ")", "car", "[", "left", "]"]),
        ("wait -- what?", ["wait", "--", "what", "?"]),
        ("and so on...", ["and", "so", "on", "..."]),
        ("gonna wanna go", ["gon", "na", "wan", "na", "go"]),
        ("A dog. A cat sits.", ["a", "dog", ".", "a", "cat", "sits", "."]),
        ("Dr. Smith waves", ["dr.", "smith", "waves"]),
        ("cats & dogs; birds", ["cats", "&", "dogs", ";", "birds"]),
        ("  Spaces   everywhere  ", ["spaces", "everywhere"]),
        ("", []),
    ],
)
def test_tokenize_follows_treebank_rules(text, tokens):
    assert tokenize(text) == tokens


@pytest.fixture
def vocab() -> Vocabulary:
    captions = ["A dog runs.", "a dog sits", "The dog runs!", "a cat"]
    return Vocabulary.build(captions, min_count=2)


def test_build_keeps_frequent_words_after_reserved_ids(vocab):
    assert vocab.idx2word[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert set(vocab.idx2word[4:]) == {"a", "dog", "runs"}
    assert "cat" not in vocab and vocab("cat") == UNK_ID


def test_encode_adds_start_end_and_truncates_to_47_tokens(vocab):
    assert vocab.encode("A dog flies") == [START_ID, vocab("a"), vocab("dog"), UNK_ID, END_ID]
    long_caption = " ".join(["dog"] * 60)
    ids = vocab.encode(long_caption)
    assert len(ids) == 47 + 2 and ids[0] == START_ID and ids[-1] == END_ID
    assert len(vocab.encode(long_caption, max_words=5)) == 7


def test_json_round_trip(vocab, tmp_path):
    path = tmp_path / "vocab.json"
    vocab.save_json(path)
    assert Vocabulary.load_json(path) == vocab
    assert load_vocabulary(path) == vocab


def test_scan_json_form(tmp_path):
    words = ["<pad>", "<start>", "<end>", "<unk>", "dog", "café"]
    scan = {
        "word2idx": {w: i for i, w in enumerate(words)},
        "idx2word": {str(i): w for i, w in enumerate(words)},
        "idx": len(words),
    }
    path = tmp_path / "f30k_precomp_vocab.json"
    path.write_text(json.dumps(scan))
    loaded = load_vocabulary(path)
    assert loaded.idx2word == words and loaded("café") == 5


def test_vocabulary_refuses_gaps_and_wrong_reserved_ids(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 4}}))
    with pytest.raises(VocabularyError, match=r"0\.\.n-1"):
        Vocabulary.load_json(path)
    with pytest.raises(VocabularyError, match="ids 0-3"):
        Vocabulary(["<start>", "<pad>", "<end>", "<unk>"])


@pytest.fixture
def official_vocab_module(monkeypatch):
    """A stand-in for the authors' `vocab.py`, so a real `vocab.Vocabulary` pickle can be made."""
    module = types.ModuleType("vocab")

    class Vocabulary:  # the official class layout: word2idx, idx2word, idx
        def __init__(self):
            self.word2idx, self.idx2word, self.idx = {}, {}, 0

        def add_word(self, word):
            if word not in self.word2idx:
                self.word2idx[word] = self.idx
                self.idx2word[self.idx] = word
                self.idx += 1

    Vocabulary.__module__ = "vocab"
    Vocabulary.__qualname__ = "Vocabulary"
    module.Vocabulary = Vocabulary
    monkeypatch.setitem(sys.modules, "vocab", module)
    return module


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_official_pickle_loads_without_the_official_class(
    official_vocab_module, tmp_path, monkeypatch, protocol
):
    official = official_vocab_module.Vocabulary()
    for word in ["<pad>", "<start>", "<end>", "<unk>", "raining", "writings"]:
        official.add_word(word)
    path = tmp_path / "f30k_precomp_vocab.pkl"
    path.write_bytes(pickle.dumps(official, protocol=protocol))
    monkeypatch.delitem(sys.modules, "vocab")  # the loader must not need the authors' code
    loaded = load_vocabulary(path)
    assert loaded.idx2word == ["<pad>", "<start>", "<end>", "<unk>", "raining", "writings"]
    assert loaded("writings") == 5


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    path = tmp_path / "evil_vocab.pkl"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=r"os\.system"):
        Vocabulary.load_official_pickle(path)
    assert not marker.exists()


def test_pickle_of_another_object_is_refused(tmp_path):
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps(["<pad>", "<start>"]))
    with pytest.raises(VocabularyError, match=r"vocab\.Vocabulary"):
        Vocabulary.load_official_pickle(path)

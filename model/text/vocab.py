"""Word vocabulary: ids 0 <pad>, 1 <start>, 2 <end>, 3 <unk>, then words.

Loads our JSON form, SCAN's JSON form (`{"word2idx", "idx2word", "idx"}`) and the official
pickled `vocab.Vocabulary` object. The pickle is read by a restricted unpickler that resolves
only that class (and the helpers protocol 0-2 pickles use to rebuild a plain object): a file
that names any other global, e.g. `os.system`, is refused before anything runs.
"""

from __future__ import annotations

import io
import json
import pickle
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from model.text.tokenizer import tokenize

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
DEFAULT_MAX_WORDS = 47
# The official vocabularies keep words seen at least 4 times in train + dev captions.
DEFAULT_MIN_COUNT = 4


class VocabularyError(ValueError):
    """A vocabulary file is malformed, unsafe, or breaks the reserved-id layout."""


class UnsafePickleError(VocabularyError):
    """A pickle names a global outside the allow-list; nothing from it was executed."""


class Vocabulary:
    """Bidirectional word <-> id map with the four reserved ids first."""

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        if tuple(words[:4]) != SPECIAL_TOKENS:
            raise VocabularyError(f"ids 0-3 must be {list(SPECIAL_TOKENS)}, got {words[:4]}")
        if len(set(words)) != len(words):
            duplicates = sorted({w for w in words if words.count(w) > 1})[:10]
            raise VocabularyError(f"duplicate words in vocabulary: {duplicates}")
        self.idx2word: list[str] = words
        self.word2idx: dict[str, int] = {w: i for i, w in enumerate(words)}

    def __len__(self) -> int:
        return len(self.idx2word)

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, UNK_ID)

    def __contains__(self, word: object) -> bool:
        return word in self.word2idx

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.idx2word == other.idx2word

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def encode(self, text: str, max_words: int = DEFAULT_MAX_WORDS) -> list[int]:
        """<start> + ids of the first `max_words` tokens + <end> (unknown words -> <unk>)."""
        tokens = tokenize(text)[:max_words]
        return [START_ID, *(self(token) for token in tokens), END_ID]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.idx2word[i] for i in ids]

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = DEFAULT_MIN_COUNT) -> Vocabulary:
        """Words seen at least `min_count` times, in first-seen order (as the official code)."""
        counts: Counter[str] = Counter()
        for caption in captions:
            counts.update(tokenize(caption))
        kept = [w for w, n in counts.items() if n >= min_count and w not in SPECIAL_TOKENS]
        return cls([*SPECIAL_TOKENS, *kept])

    # -- our JSON form ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"words": list(self.idx2word)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocabulary:
        if "words" in data:
            return cls(list(data["words"]))
        if "word2idx" in data:
            vocabulary = cls.from_word2idx(data["word2idx"])
            _check_scan_fields(vocabulary, data)
            return vocabulary
        raise VocabularyError(
            f"unknown vocabulary layout with keys {sorted(data)[:10]}; expected "
            "{'words': [...]} or SCAN's {'word2idx', 'idx2word', 'idx'}"
        )

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False))

    @classmethod
    def load_json(cls, path: str | Path) -> Vocabulary:
        """Our JSON form or SCAN's `{"word2idx": ..., "idx2word": ..., "idx": ...}`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise VocabularyError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise VocabularyError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_word2idx(cls, word2idx: Mapping[str, Any]) -> Vocabulary:
        """From a word -> id map whose ids are exactly 0..n-1."""
        if not isinstance(word2idx, Mapping):
            raise VocabularyError(f"word2idx must map words to ids, got {type(word2idx).__name__}")
        try:
            by_id = sorted((int(i), str(w)) for w, i in word2idx.items())
        except (TypeError, ValueError) as exc:
            raise VocabularyError(f"word2idx ids must be integers: {exc}") from exc
        ids = [i for i, _ in by_id]
        if ids != list(range(len(ids))):
            raise VocabularyError("word ids must be exactly 0..n-1 without gaps or duplicates")
        return cls([w for _, w in by_id])

    # -- the official pickle ------------------------------------------------------------------
    @classmethod
    def load_official_pickle(cls, path: str | Path) -> Vocabulary:
        """The official `vocab.Vocabulary` pickle (Python 2 or 3), without running its code."""
        data = Path(path).read_bytes()
        try:
            obj = _VocabularyUnpickler(io.BytesIO(data), encoding="utf-8").load()
        except UnsafePickleError:
            raise
        except Exception as exc:  # a truncated or foreign file fails in many ways inside pickle
            raise VocabularyError(
                f"{path} is neither a JSON vocabulary nor a readable vocabulary pickle "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        if not isinstance(obj, _PickledVocabulary) or "word2idx" not in obj.__dict__:
            raise VocabularyError(f"{path} does not hold a vocab.Vocabulary object")
        return cls.from_word2idx(obj.__dict__["word2idx"])


def load_vocabulary(path: str | Path) -> Vocabulary:
    """Any supported form, chosen by the file's content (JSON or pickle)."""
    head = Path(path).read_bytes()[:64].lstrip()[:1]
    if head in (b"{", b"["):
        return Vocabulary.load_json(path)
    return Vocabulary.load_official_pickle(path)


def _check_scan_fields(vocabulary: Vocabulary, data: Mapping[str, Any]) -> None:
    """SCAN's JSON repeats the map as `idx2word` (string keys) and the size as `idx`; a file
    whose copies disagree is corrupt, and which copy is right cannot be known."""
    idx2word = data.get("idx2word")
    if idx2word is not None:
        if not isinstance(idx2word, Mapping):
            raise VocabularyError(f"idx2word must be an object, got {type(idx2word).__name__}")
        expected = {str(i): w for i, w in enumerate(vocabulary.idx2word)}
        given = {str(i): w for i, w in idx2word.items()}
        if given != expected:
            wrong = sorted(set(given.items()) ^ set(expected.items()))[:5]
            raise VocabularyError(f"idx2word disagrees with word2idx, e.g. at {wrong}")
    if "idx" in data and data["idx"] != len(vocabulary):
        raise VocabularyError(f"idx says {data['idx']} words but word2idx holds {len(vocabulary)}")


class _PickledVocabulary:
    """Inert stand-in for the official class: its state lands in __dict__, nothing else runs."""


# (module, name) pairs the vocabulary pickle may reference (Python 2 and 3 spellings).
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("vocab", "Vocabulary"): _PickledVocabulary,
    ("__main__", "Vocabulary"): _PickledVocabulary,
    ("builtins", "object"): object,
    ("__builtin__", "object"): object,
}


def _reconstructor(cls: type, base: type, state: object) -> object:
    """Safe version of copyreg._reconstructor for the allow-listed class only."""
    if cls is not _PickledVocabulary or base is not object or state is not None:
        raise UnsafePickleError("copyreg._reconstructor used outside the Vocabulary pattern")
    return object.__new__(cls)


_ALLOWED_GLOBALS[("copyreg", "_reconstructor")] = _reconstructor
_ALLOWED_GLOBALS[("copy_reg", "_reconstructor")] = _reconstructor


class _VocabularyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: a vocabulary pickle may only reference "
                f"vocab.Vocabulary; this file is not an official vocabulary (or is malicious)"
            )
        return allowed


__all__ = [
    "DEFAULT_MAX_WORDS",
    "END_ID",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "START_ID",
    "UNK_ID",
    "UnsafePickleError",
    "Vocabulary",
    "VocabularyError",
    "load_vocabulary",
]

"""Lower-case, Treebank-style word tokenization, as `nltk.word_tokenize(caption.lower())`.

The official CAMP/SCAN data code tokenizes with nltk, whose sentence splitter (punkt) needs a
data download that is not possible offline. This module re-implements the rules of nltk's
`NLTKWordTokenizer` (the improved Treebank tokenizer behind `word_tokenize`) with plain regular
expressions, plus the one thing punkt contributes for captions: a period that ends a sentence
inside the text is split off its word ("a dog. a cat" -> a dog . a cat), except after common
abbreviations and single-letter initials.
"""

from __future__ import annotations

import re

_STARTING_QUOTES = [
    (re.compile(r"([«“‘„]|[`]+)"), r" \1 "),
    (re.compile(r"^\""), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ \(\[{<])(\"|\'{2})"), r"\1 `` "),
    (re.compile(r"(?i)(\')(?!re|ve|ll|m|t|s|d|n)(\w)\b"), r"\1 \2"),
]

_PUNCTUATION = [
    (re.compile(r"([^\.])(\.)([\]\)}>\"\'»”’ ]*)\s*$"), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"([^\.])(\.)([\]\)}>\"\']*)\s*$"), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
]

_PARENS_BRACKETS = (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> ")
_DOUBLE_DASHES = (re.compile(r"--"), r" -- ")

_ENDING_QUOTES = [
    (re.compile(r"([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]

# Robert MacIntyre's contractions, as nltk applies them.
_CONTRACTIONS = [
    re.compile(pattern)
    for pattern in (
        r"(?i)\b(can)(?#X)(not)\b",
        r"(?i)\b(d)(?#X)('ye)\b",
        r"(?i)\b(gim)(?#X)(me)\b",
        r"(?i)\b(gon)(?#X)(na)\b",
        r"(?i)\b(got)(?#X)(ta)\b",
        r"(?i)\b(lem)(?#X)(me)\b",
        r"(?i)\b(more)(?#X)('n)\b",
        r"(?i)\b(wan)(?#X)(na)(?=\s)",
        r"(?i) ('t)(?#X)(is)\b",
        r"(?i) ('t)(?#X)(was)\b",
    )
]

# Words after which a period does not end a sentence (a small stand-in for punkt's list).
_ABBREVIATIONS = frozenset(
    [
        "mr",
        "mrs",
        "ms",
        "dr",
        "st",
        "jr",
        "sr",
        "vs",
        "etc",
        "inc",
        "co",
        "ltd",
        "prof",
        "mt",
        "ft",
        "no",
        "e.g",
        "i.e",
        "u.s",
        "a.m",
        "p.m",
        "approx",
    ]
)
_SENTENCE_END = re.compile(r"(?<=\.)\s+")


def _split_sentences(text: str) -> list[str]:
    """Split after a period followed by whitespace unless it closes an abbreviation/initial."""
    pieces = _SENTENCE_END.split(text)
    sentences: list[str] = []
    current = ""
    for piece in pieces:
        current = f"{current} {piece}" if current else piece
        last_word = current.rsplit(None, 1)[-1].rstrip(".") if current.strip() else ""
        is_initial = len(last_word) == 1 and last_word.isalpha()
        is_abbreviation = last_word in _ABBREVIATIONS or is_initial
        if not is_abbreviation or piece is pieces[-1]:
            sentences.append(current)
            current = ""
    if current:
        sentences.append(current)
    return sentences


def _treebank(text: str) -> list[str]:
    for pattern, replacement in _STARTING_QUOTES:
        text = pattern.sub(replacement, text)
    for pattern, replacement in _PUNCTUATION:
        text = pattern.sub(replacement, text)
    text = _PARENS_BRACKETS[0].sub(_PARENS_BRACKETS[1], text)
    text = _DOUBLE_DASHES[0].sub(_DOUBLE_DASHES[1], text)
    text = f" {text} "
    for pattern, replacement in _ENDING_QUOTES:
        text = pattern.sub(replacement, text)
    for pattern in _CONTRACTIONS:
        text = pattern.sub(r" \1 \2 ", text)
    return text.split()


def tokenize(text: str) -> list[str]:
    """Lower-cased Treebank tokens of `text` ("Don't go!" -> ["do", "n't", "go", "!"])."""
    text = text.lower().strip()
    tokens: list[str] = []
    for sentence in _split_sentences(text):
        tokens.extend(_treebank(sentence))
    return tokens

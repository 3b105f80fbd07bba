"""Text encoders by name: each entry builds its encoder module and its own tokenizer.

Like the region extractors (model/vision/extractors/), a `NetworkSpec` names its text side
("gru", "minilm") once; everything that follows from that choice (the module, the tokenizer that
feeds it, the width the pooled text head reads, the CAMP word table, whether a checkpoint must
carry a vocabulary) is asked of the entry instead of compared against the name where it matters.
`@register_text_encoder("name")` adds an entry; `text_encoder_kind(name)` finds it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, ClassVar, TypeVar

from model.architecture.encoders import GRUTextEncoder, TextEncoder
from model.text.minilm import (
    MINILM_HIDDEN,
    MINILM_VOCAB,
    MiniLMBackbone,
    MiniLMWordEncoder,
    WordpieceTokenizer,
    load_minilm,
)
from model.text.tokenizer import tokenize
from model.text.vocab import END, START, Vocabulary

if TYPE_CHECKING:
    from model.architecture.network import NetworkSpec

# Token ids per text (what the encoder reads and the catalog stores) and display tokens per
# text (aligned with the word features, for explanations).
TokenizedTexts = tuple[list[list[int]], list[list[str]]]
# What an entry is built from besides the spec: our vocabulary (GRU) and MiniLM's body.
Words = Vocabulary | None
Backbone = MiniLMBackbone | None


class UnknownTextEncoder(ValueError):
    """No text encoder is registered under that name."""


class CaptionTokenizer(ABC):
    """Texts -> `TokenizedTexts`, exactly as one text encoder reads them."""

    @property
    @abstractmethod
    def max_tokens(self) -> int:
        """The longest token sequence it produces, special tokens included."""

    @abstractmethod
    def __call__(self, texts: Sequence[str]) -> TokenizedTexts: ...


class VocabularyTokenizer(CaptionTokenizer):
    """The paper's: Treebank words looked up in our vocabulary, between <start> and <end>."""

    def __init__(self, vocabulary: Vocabulary, max_words: int) -> None:
        self.vocabulary = vocabulary
        self.max_words = max_words

    @property
    def max_tokens(self) -> int:
        return self.max_words + 2  # <start> and <end>

    def __call__(self, texts: Sequence[str]) -> TokenizedTexts:
        ids = [self.vocabulary.encode(text, max_words=self.max_words) for text in texts]
        tokens = [[START, *tokenize(text)[: self.max_words], END] for text in texts]
        return ids, tokens


class MiniLMTokenizer(CaptionTokenizer):
    """MiniLM's own wordpieces ([CLS] ... [SEP]), truncated at `max_wordpieces`."""

    def __init__(self, max_wordpieces: int) -> None:
        self.wordpieces = WordpieceTokenizer(max_wordpieces=max_wordpieces)

    @property
    def max_tokens(self) -> int:
        return self.wordpieces.max_wordpieces

    def __call__(self, texts: Sequence[str]) -> TokenizedTexts:
        batch = self.wordpieces(list(texts))
        ids = [
            row[:length].tolist()
            for row, length in zip(batch.input_ids, batch.lengths, strict=True)
        ]
        return ids, batch.tokens


class TextEncoderKind(ABC):
    """One registered text side: builds its module and its tokenizer from a `NetworkSpec`."""

    name: ClassVar[str]
    # Token ids come from our `Vocabulary`: training builds one, a checkpoint must carry it.
    uses_vocabulary: ClassVar[bool]

    @abstractmethod
    def feature_dim(self, spec: NetworkSpec) -> int:
        """Width of the text features the pooled text head reads."""

    @abstractmethod
    def word_table(self, spec: NetworkSpec, vocabulary: Words) -> tuple[int, int]:
        """(vocab_size, word_dim) recorded in the network's `CampConfig`."""

    @abstractmethod
    def build(self, spec: NetworkSpec, vocabulary: Words, backbone: Backbone) -> TextEncoder: ...

    @abstractmethod
    def tokenizer(
        self, spec: NetworkSpec, vocabulary: Words, max_words: int
    ) -> CaptionTokenizer: ...

    def load_backbone(self, loader: Callable[[], MiniLMBackbone] | None = None) -> Backbone:
        """The pretrained body that lives outside the checkpoint, if this encoder has one."""
        return None


_REGISTRY: dict[str, TextEncoderKind] = {}
K = TypeVar("K", bound=type[TextEncoderKind])


def register_text_encoder(name: str) -> Callable[[K], K]:
    """Class decorator: make a text encoder choosable by name in a `NetworkSpec`."""

    def decorator(cls: K) -> K:
        if name in _REGISTRY and type(_REGISTRY[name]) is not cls:
            raise ValueError(f"a text encoder named {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls()
        return cls

    return decorator


def registered_text_encoders() -> Iterator[tuple[str, TextEncoderKind]]:
    yield from sorted(_REGISTRY.items())


def text_encoder_kind(name: str) -> TextEncoderKind:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownTextEncoder(
            f"unknown text_encoder {name!r}; choose one of {tuple(sorted(_REGISTRY))}"
        ) from None


@register_text_encoder("gru")
class GRUText(TextEncoderKind):
    """The paper's embedding + bi-GRU over our vocabulary; the pooled head reads its word states
    (width d)."""

    uses_vocabulary = True

    def feature_dim(self, spec: NetworkSpec) -> int:
        return spec.embed_size

    def word_table(self, spec: NetworkSpec, vocabulary: Words) -> tuple[int, int]:
        return len(vocabulary), spec.word_dim

    def build(self, spec: NetworkSpec, vocabulary: Words, backbone: Backbone) -> TextEncoder:
        if vocabulary is None:
            raise ValueError("a GRU text encoder needs a vocabulary")
        return GRUTextEncoder(
            vocab_size=len(vocabulary), word_dim=spec.word_dim, embed_size=spec.embed_size
        )

    def tokenizer(self, spec: NetworkSpec, vocabulary: Words, max_words: int) -> CaptionTokenizer:
        return VocabularyTokenizer(vocabulary, max_words)


@register_text_encoder("minilm")
class MiniLMText(TextEncoderKind):
    """all-MiniLM-L6-v2 token features (frozen, from its package) projected to d; the pooled head
    reads the backbone features (384)."""

    uses_vocabulary = False

    def feature_dim(self, spec: NetworkSpec) -> int:
        return MINILM_HIDDEN

    def word_table(self, spec: NetworkSpec, vocabulary: Words) -> tuple[int, int]:
        return MINILM_VOCAB, MINILM_HIDDEN

    def build(self, spec: NetworkSpec, vocabulary: Words, backbone: Backbone) -> TextEncoder:
        return MiniLMWordEncoder(
            embed_size=spec.embed_size, hidden_size=MINILM_HIDDEN, backbone=backbone
        )

    def tokenizer(self, spec: NetworkSpec, vocabulary: Words, max_words: int) -> CaptionTokenizer:
        return MiniLMTokenizer(spec.max_wordpieces)

    def load_backbone(self, loader: Callable[[], MiniLMBackbone] | None = None) -> Backbone:
        return (loader or load_minilm)()


__all__ = [
    "CaptionTokenizer",
    "TextEncoderKind",
    "TokenizedTexts",
    "UnknownTextEncoder",
    "register_text_encoder",
    "registered_text_encoders",
    "text_encoder_kind",
]

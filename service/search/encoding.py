"""Query texts encoded in shared model calls.

Concurrent text searches each need their query encoded (MiniLM, then the shortlist vector and
CAMP's per-caption tensors). Run one by one on their own threads, 16 searches are 16 small
model calls competing for the same cores; through a `MicroBatcher` with this batch function
they are one call over all the texts that queued meanwhile, on one thread. The batcher never
waits on a CPU (max_wait_s=0), so a lone search pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.retrieval import EncodedTexts, RetrievalModel


class QueryEncoder:
    """`MicroBatcher` batch function: texts -> one `EncodedTexts` of one text each, or the
    `ValueError` that text alone raises (an empty text must fail its own search only)."""

    def __init__(self, model: RetrievalModel, on_call: Callable[[int], None] | None = None) -> None:
        self.model = model
        self._on_call = on_call

    def __call__(self, texts: Sequence[str]) -> list[EncodedTexts | ValueError]:
        if self._on_call is not None:
            self._on_call(len(texts))
        try:
            encoded = self.model.encode_texts(list(texts), query=True)
        except ValueError as error:
            if len(texts) == 1:
                return [error]
            return [self(text_alone)[0] for text_alone in ([t] for t in texts)]
        return [one_text(encoded, i) for i in range(len(texts))]


def one_text(encoded: EncodedTexts, index: int) -> EncodedTexts:
    """Text `index` of a batch on its own: its pooled row, ids, tokens, and per-caption tensors
    trimmed to its own length (padding to the batch's longest is gone)."""
    return type(encoded)(
        pooled=encoded.pooled[index : index + 1],
        token_ids=[encoded.token_ids[index]],
        tokens=[encoded.tokens[index]],
        precompute=encoded.precompute.select([index]),
    )

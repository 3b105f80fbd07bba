"""The names of stored record namespaces, and which catalog table owns each by its prefix.

One module that the embedded corpus (`index.corpus`), the PostgreSQL stores (`index.postgres`)
and the copy between them (`index.migrate`) all import, so that the owner rule (which records a
delete or an orphan sweep removes with an item) is written once.
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["images", "captions"]

# Which catalog table owns the records of a namespace, by prefix (orphans, deletes, copies).
IMAGE_PREFIXES = ("regions:", "pooled:images:", "rerank:images:")
CAPTION_PREFIXES = ("pooled:captions:", "rerank:captions:")


def regions_namespace(extractor: str, version: str) -> str:
    return f"regions:{extractor}:{version}"


def pooled_namespace(kind: Kind, model_version: str) -> str:
    return f"pooled:{kind}:{model_version}"


def rerank_namespace(kind: Kind, tensor_version: str) -> str:
    """Where the reranker's per-item tensors of one model live: a new checkpoint reads (and
    rebuilds into) its own namespace, so tensors of two models never mix."""
    return f"rerank:{kind}:{tensor_version}"

"""The two-stage search: a micro-batched FAISS shortlist, then the micro-batched CAMP reranker
over cached per-item tensors, and the regions of an uploaded photo."""

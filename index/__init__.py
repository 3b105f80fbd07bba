"""Everything stored and searched: FAISS shortlist indexes, the durable region-feature store
with its Redis cache, and the catalog of images and captions.

`index` never imports `service` and knows nothing of HTTP or torch modules.
"""

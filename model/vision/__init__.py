"""Images and extractors: decoding untrusted bytes, the region extractors and their backbone,
and batch extraction into the precomputed layout."""

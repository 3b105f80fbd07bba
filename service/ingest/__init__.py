"""Writes: the `Indexer` stores photos and captions in the corpus, for the API and bulk ingest."""

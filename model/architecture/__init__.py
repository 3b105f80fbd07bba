"""The network and its scorer: encoders, the CAMP cross-modal scorer and its precompute split,
the pooled shortlist heads, score fusion, and `RetrievalNetwork` that holds them all."""

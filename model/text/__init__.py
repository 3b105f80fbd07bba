"""Text handling: word tokenization, the vocabulary, the MiniLM tokenizer and body, GloVe
vectors and cached token features."""

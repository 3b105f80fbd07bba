"""Text handling: word tokenization, the vocabulary, the MiniLM tokenizer and body, the
text-encoder registry (each entry with its own tokenizer), GloVe vectors and cached token
features."""

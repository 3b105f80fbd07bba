"""Everything learned: encoders, the CAMP scorer, pooled shortlist heads, region extractors,
vocabulary and tokenizer, losses, checkpoints, training and evaluation.

`model` never imports `index` or `service`; it hands them plain numpy arrays and ids.
Keep this file free of heavy imports so that light modules (types, tokenizer) load fast.
"""

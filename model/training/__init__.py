"""Training (kept apart from the inference import path: nothing in model/ imports this)."""

"""Evaluation: the precomputed split layout, the VSE++/SCAN protocol and the runs that score a
model on a split."""

"""Checkpoints and configs: our single-file checkpoint format, import of the official release,
and the architecture configs (JSON in model/configs/)."""

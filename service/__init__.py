"""The FastAPI app, the two-stage search pipeline and the `camp-search` command line.

`service` composes `model` and `index`; nothing here assumes it is the only process.
"""

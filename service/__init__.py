"""The service room: composes `model` and `index` into search and ingest, behind two faces.

`api/` is the HTTP face and `cli/` the command line; `search/` and `ingest/` are the core, which
speaks no HTTP; `runtime/` holds settings, metrics, memory budgets and the service's lifecycle.
Nothing here assumes it is the only process. See docs/ARCHITECTURE.md.
"""

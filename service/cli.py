"""The `camp-search` command line: one typer app; each command lives in its own module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="camp-search",
    help="Self-hosted text-image retrieval with a FAISS shortlist and the CAMP reranker.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """camp-search: text-to-image and image-to-caption retrieval."""

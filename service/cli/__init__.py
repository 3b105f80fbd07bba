"""The `camp-search` command line: `main` declares every command, each body has its module."""

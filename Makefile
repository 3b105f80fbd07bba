# One entry point for people and CI. `make test` and `make serve` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch lies on local disk here; a bare `torch` would pull several GB of CUDA.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup system-deps test test-all lint serve

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Real services the tests start themselves: Redis (and, for the UI, Chromium and nginx).
system-deps:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }

lint: setup
	$(VENV)/bin/ruff check .

test: setup system-deps lint
	$(PY) -m pytest

test-all: setup system-deps
	$(PY) -m pytest -m "slow or not slow"

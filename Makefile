# One entry point for people and CI. `make test` and `make serve` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first, from the same list as docker/Dockerfile.cpu: a bare `torch` would pull several GB
# of CUDA. On a fresh machine set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (the
# image does); here the CPU wheel lies on local disk and the default index finds it.
TORCH_REQUIREMENTS ?= requirements/torch-cpu.txt
TORCH_INDEX_URL ?=

.PHONY: setup system-deps test test-all lint serve demo

$(VENV)/.installed: pyproject.toml $(TORCH_REQUIREMENTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)") -r $(TORCH_REQUIREMENTS)
	$(PIP) install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Real services the tests start themselves: Redis (redis-cli forms the test Redis Cluster),
# PostgreSQL 15's server binaries (the tests start their own primary and streaming replica on free
# ports; a server on 5432 is neither needed nor used), and for the web UI Chromium and
# nginx; Debian's own Python 3.11 with venv stands in for the images' Python
# (tests/test_docker_images.py).
system-deps:
	@test -x /usr/bin/python3.11 && /usr/bin/python3.11 -c "import ensurepip" 2>/dev/null || { apt-get update -qq && apt-get install -y -qq python3.11-venv; }
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	@command -v redis-cli >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-tools; }
	@test -x /usr/lib/postgresql/15/bin/initdb || { apt-get update -qq && apt-get install -y -qq postgresql-15; }
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

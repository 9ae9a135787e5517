# isopool: `make serve` runs the daemon on the built-in model; `make test` runs the suite.
# Both create .venv first. torch 2.13.0 (CPU) is installed only when torch is missing,
# so a CUDA build you installed yourself is kept.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.isopool-installed

.PHONY: venv serve serve-embeddings test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[server,test,embeddings,bench]'
	touch $@

serve: $(STAMP)
	$(VENV)/bin/isopool serve --http 127.0.0.1:8000

serve-embeddings: $(STAMP)
	$(VENV)/bin/isopool serve --model isopool.examples.embeddings:Embedder

test: $(STAMP)
	$(VENV)/bin/python -m pytest

bench: $(STAMP)
	$(VENV)/bin/isopool bench --out bench/results

clean:
	rm -rf $(VENV) build *.egg-info

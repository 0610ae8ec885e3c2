# `make demo` and `make test` work on a fresh machine: each sets up .venv once (again only when
# pyproject.toml changes), then runs. TORCH picks the torch build (default: the CPU wheel).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

# The test extra (pytest, and transformers as the oracle) only for the tests: the demo does not import it (~20 s).
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(PY) demo.py --out $(OUT)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs

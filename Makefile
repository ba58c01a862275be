# Every target sets up .venv itself when missing (torch 2.13.0 CPU wheel first, then the package).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test demo lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

SLOW ?= 0
test: $(STAMP)
	$(PY) -m pytest $(if $(filter 1,$(SLOW)),,-m "not slow")

demo: $(STAMP)
	$(VENV)/bin/evomerge demo

lint: $(STAMP)
	$(VENV)/bin/ruff check evomerge tests tools
	$(VENV)/bin/ruff format --check evomerge tests tools
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) tools/bench_merge.py

clean:
	rm -rf runs/demo .pytest_cache

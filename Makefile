# Two commands on a fresh clone: `make test` and `make run` (both install first if needed).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# real datasets are read in place (never copied into the repo); tests needing them skip when absent
export ADAPTKIT_DATA ?= $(abspath ../shared/data)

.PHONY: install test run clean

install: $(STAMP)

# torch first, pinned to the CPU wheel: otherwise the resolver may pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

run: install
	$(BIN)/python recipes/compare.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# Two commands on a fresh clone: `make test` and `make run` (both install first if needed).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# real datasets are read in place (never copied into the repo); tests needing them skip when absent
export ADAPTKIT_DATA ?= $(abspath ../shared/data)

.PHONY: install lock test test-latest run clean

install: $(STAMP)

# Exactly the versions the suite passed with (requirements.lock, transitive ones included), then adaptkit
# itself with --no-deps so nothing is re-resolved. The lock pins torch to the CPU wheel.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# Regenerate the lock with pip-tools from pyproject's ranges (the newest versions they allow), torch held at
# the CPU wheel. Run `make test` on the result before committing it. adaptkit is left out of the lock: the `dev`
# extra names adaptkit[recipes], and pip-compile would pin that as `adaptkit @ file:///<this checkout>`, a path
# no other clone has (pip and setuptools stay out too, as pip-compile's own default does).
lock: install
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --upgrade --strip-extras \
		--extra dev --extra recipes --extra bitsandbytes --extra tensorboard --extra plots \
		--unsafe-package adaptkit --unsafe-package pip --unsafe-package setuptools \
		--constraint requirements/torch-cpu.txt --no-emit-find-links --no-emit-index-url \
		--output-file $(LOCK) pyproject.toml
	rm -f $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# The canary: a separate environment with the newest release of every dependency (pyproject's upper bounds
# ignored, torch held at requirements/torch-cpu.txt), then the suite. Names the tests that break and the versions
# that moved; exits 1 when tests fail. Not CI's gate. Cheap form, before every lock change:
# `make test-latest CANARY="--fast --reuse"` (the version-sensitive tests, the environment upgraded in place).
test-latest:
	PYTHON=$(PYTHON) bash .ci/test-latest $(CANARY)

run: install
	$(BIN)/python recipes/compare.py

clean:
	rm -rf $(VENV) .venv-latest build *.egg-info .pytest_cache

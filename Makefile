# genq: `make run` starts the whole stack on this machine, `make test` runs every check.
# Both install what is missing into .venv first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build; point TORCH_SPEC at another build (or a CUDA one) to taste.
TORCH_SPEC ?= torch==2.13.0
EXTRAS := gateway,worker,dev,embedded-redis
STAMP := $(VENV)/.installed

.PHONY: run test lint load install clean

run: $(STAMP)
	$(BIN)/genq run

test: $(STAMP)
	$(BIN)/genq model fetch
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/lint-imports
	$(BIN)/pytest -p no:cacheprovider

# Load a running stack (`make run` in another terminal) with every user class of
# tests/load_test.py; CSVs and locust's HTML report go to bench/results/.
HOST ?= http://127.0.0.1:8000
USERS ?= 16
TIME ?= 60s
LOAD_ARGS ?=
load: $(STAMP)
	mkdir -p bench/results
	$(BIN)/locust -f tests/load_test.py --headless --host $(HOST) --users $(USERS) \
		--spawn-rate $(USERS) --run-time $(TIME) --csv bench/results/load \
		--html bench/results/load.html $(LOAD_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/lint-imports

install: $(STAMP)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "genq needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstalled whenever pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache build *.egg-info

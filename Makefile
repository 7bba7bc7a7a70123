# genq: `make run` starts the whole stack on this machine, `make test` runs every check.
# Both install what is missing into .venv first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build; point TORCH_SPEC at another build (or a CUDA one) to taste.
TORCH_SPEC ?= torch==2.13.0
EXTRAS := gateway,worker,dev,embedded-redis
STAMP := $(VENV)/.installed

.PHONY: run test lint install clean

run: $(STAMP)
	$(BIN)/genq run

test: $(STAMP)
	$(BIN)/genq model fetch
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/pytest -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

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

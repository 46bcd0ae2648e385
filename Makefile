# Content pipeline. `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev tools

demo: $(STAMP) ## run one job of each content type on the embedded default, check, stop
	$(BIN)/pipeline demo

run: $(STAMP) ## API + worker + beat in the foreground (PORT=8000)
	$(BIN)/pipeline run --port $(or $(PORT),8000)

# Two pytest processes (pytest-xdist): most tests wait on workers, servers and sleeps, so
# two share the 2 cores well; every test makes its own database, prefix and ports.
test: $(STAMP) ## the whole suite (needs PostgreSQL, Redis and RabbitMQ on localhost)
	$(BIN)/python -m pytest -n 2

wheel: $(STAMP) ## build the wheel into dist/ (what the Dockerfile installs)
	$(BIN)/pip wheel --no-deps --no-build-isolation --quiet -w dist .

flower: $(STAMP) ## Flower on 127.0.0.1:5555 against the configured broker (FLOWER_BASIC_AUTH=user:password)
	$(BIN)/pipeline flower --port $(or $(FLOWER_PORT),5555)

bench: $(STAMP) ## the full benchmark run (< 15 min): table + bench/results/latest.json
	$(BIN)/pipeline bench

bench-quick: $(STAMP) ## a subset of the benchmarks with fewer jobs (< 5 min)
	$(BIN)/pipeline bench --quick

lint: $(STAMP) ## ruff, and the layers of the code (import-linter, .importlinter)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean: ## remove the virtualenv and local data
	rm -rf $(VENV) var .pytest_cache .ruff_cache build dist

.PHONY: help install demo run test wheel flower lint clean bench bench-quick

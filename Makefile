# cdp-activation — every target sets up .venv itself. `make help` lists them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
LOCK := requirements/dev.lock
export DAGSTER_HOME := $(CURDIR)/dagster_home

.DEFAULT_GOAL := help
.PHONY: help install lock audit demo dev test lint validate bench scale-demo clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

# Exactly what was tested: every package pinned with its hashes in $(LOCK) (pip refuses any
# other file), pip itself first from requirements/pip.lock, then the project, built offline.
$(STAMP): pyproject.toml $(LOCK) requirements/pip.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "cdp-activation needs Python 3.11 or newer (set PYTHON=python3.11)")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements/pip.lock
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its dev tools, from the lock

lock: $(STAMP) ## Re-resolve requirements/dev.lock from pyproject.toml (UPGRADE=1: newest releases)
	$(BIN)/uv pip compile pyproject.toml requirements/tools.in --extra dev --universal \
	  --python-version 3.11 --generate-hashes --quiet $(if $(UPGRADE),--upgrade) -o $(LOCK)
	awk '/^pip==/{p=1} p{print} p && !/\\$$/{exit}' $(LOCK) > requirements/pip.lock

audit: $(STAMP) ## Check the lock against known vulnerabilities (pip-audit; needs PyPI's JSON API)
	$(BIN)/python requirements/audit.py

demo: $(STAMP) ## Build the demo warehouse, start the sandbox, run winback_whatsapp for today
	$(BIN)/cdp-activation demo $(if $(SEND_WINDOW),--send-window $(SEND_WINDOW))

dev: $(STAMP) ## Start the sandbox, the status webhook receiver and the Dagster UI on http://127.0.0.1:3000
	$(BIN)/cdp-activation dev

scale-demo: $(STAMP) ## One activation on 4 Celery workers: local RabbitMQ + PostgreSQL, 1M customers
	$(BIN)/cdp-activation scale-demo --workers $(or $(WORKERS),4)

# On every core (pytest-xdist, a test file per worker: 10-11 minutes instead of 17-21), then
# the tests marked `serial` one at a time: they time requests or kills against other
# processes, and another worker's load made them miss (3 of 5 all-parallel runs).
test: $(STAMP) ## Run the whole test suite
	$(BIN)/pytest -n auto --dist loadfile -m "not serial"
	$(BIN)/pytest -m serial

lint: $(STAMP) ## ruff lint and format check, mypy over src/
	$(BIN)/ruff check src tests bench requirements
	$(BIN)/ruff format --check src tests bench requirements
	$(BIN)/mypy src/cdp_activation

validate: $(STAMP) ## Check every activation and SQL file, then the Dagster definitions
	$(BIN)/cdp-activation validate
	$(BIN)/dagster definitions validate -w workspace.yaml

bench: $(STAMP) ## Run the benchmarks; figures go to bench/results.md
	$(BIN)/python -m bench

clean: ## Remove .venv and everything generated under dagster_home/
	rm -rf $(VENV) .pytest_cache .ruff_cache
	find dagster_home -mindepth 1 ! -name 'dagster.yaml' ! -name 'dagster.*.yaml.example' -exec rm -rf {} +

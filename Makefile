# SOFARE: `make demo` and `make test` work from a fresh clone; everything else is optional.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
LINTED := include dags plugins tests benchmarks scripts
PIP_QUIET := 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)

.PHONY: help setup init demo test lint bench airflow clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv and install the lock (requirements.txt) + the package

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt $(PIP_QUIET)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . $(PIP_QUIET)
	touch $@

init: setup  ## var/: warehouse schema, Airflow metadata DB and connection
	$(BIN)/sofare init

demo: setup  ## set up, run the pipeline through the DAGs on the embedded data, serve it behind the front door
	scripts/system-deps.sh
	$(BIN)/sofare demo

test: init lint  ## set up (.venv, lock, var/), lint, then run every test tier
	scripts/system-deps.sh
	$(BIN)/pytest

lint: setup  ## ruff check, ruff format --check and mypy (what the pre-commit hooks run)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy include/sofare

bench: setup  ## run the benchmarks and rewrite docs/benchmarks.md
	scripts/system-deps.sh
	$(BIN)/python benchmarks/run.py

airflow: init  ## the Airflow UI on http://127.0.0.1:8080 (airflow standalone, var/airflow; Ctrl-C stops all of it)
	scripts/airflow-standalone.sh

clean:  ## remove everything runs wrote (var/); keeps .venv
	rm -rf var

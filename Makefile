# panicd — the two commands of the quick start:
#   make demo   run the whole pipeline end to end on embedded defaults
#   make test   lint, type-check and run every test against real parts
# Both create the virtualenv they need and install what the tests/demo start
# (Mosquitto from Debian, Prism from npm) when it is missing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest deps bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "panicd needs Python 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

deps:
	scripts/ensure-mosquitto.sh
	scripts/ensure-peers.sh
	scripts/ensure-postgres.sh
	scripts/ensure-rabbitmq.sh

demo: $(STAMP)
	scripts/ensure-mosquitto.sh
	$(BIN)/panic-sim demo

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) deps
	$(BIN)/pytest

test: lint typecheck pytest

bench: $(STAMP) deps
	bench/run

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache

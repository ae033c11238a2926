# Two commands for a fresh Debian/Ubuntu machine with Python 3.11+:
#   make run   - creates .venv, installs Telemetra, starts it on embedded defaults (SQLite + MQTT broker)
#   make test  - installs test dependencies and the services the suite needs, then runs all of it
PYTHON ?= python3
# The browser tests drive Debian's chromium (scripts/test-services.sh installs it); Playwright never fetches one.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1
VENV   ?= .venv
# Test processes (pytest-xdist); TEST_WORKERS=0 runs the suite in this one process.
TEST_WORKERS ?= 3
BIN    := $(VENV)/bin

.PHONY: run test install install-test services lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'

run: install
	$(BIN)/telemetra serve

services:
	./scripts/test-services.sh

lint: install-test
	$(BIN)/ruff check src tests bench

test: install-test services
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/python scripts/check_secrets.py
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=15

bench: install-test
	$(BIN)/python bench/http_ingest.py

clean:
	rm -rf $(VENV) telemetra-data build *.egg-info

# Two commands a new user needs: `make demo` and `make test`. Everything installs into ./.venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
TESTING := $(VENV)/.installed-test

.PHONY: demo test lint serve bench clean

$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(TESTING): $(RUNTIME)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

## demo: start an embedded 4-worker service, oversell it unlocked, fix it locked, stop it
demo: $(RUNTIME)
	$(BIN)/ticketlock-loadtest

## test: lint, the whole test suite against real gunicorn, then the docker-compose demo (root only; see README)
test: lint
	$(BIN)/python -m pytest
	bash tests/compose/run.sh

lint: $(TESTING)
	$(BIN)/ruff check service loadtest tests bench
	$(BIN)/ruff format --check service loadtest tests bench
	$(BIN)/mypy service loadtest

## bench: the four performance measurements of issue #6, by hand (needs wrk: apt-get install wrk)
bench: $(RUNTIME)
	$(BIN)/python bench/bench.py

## serve: the service on http://127.0.0.1:8000 with the repository's db.json
serve: $(RUNTIME)
	$(BIN)/ticketlock-serve

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

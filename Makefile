# Two commands a new user needs: `make demo` and `make test`. Everything installs into ./.venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
TESTING := $(VENV)/.installed-test

.PHONY: demo demo-hosts setup test lint serve bench clean

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

## demo-hosts: three hosts of 4 workers on one throwaway PostgreSQL and Redis, every mode, then a lease holder
## stopped past its lease (needs their servers: apt-get install postgresql redis-server)
demo-hosts: $(RUNTIME)
	$(BIN)/ticketlock-loadtest --hosts 3 --store postgres

## setup: .venv with the service, the load tester and the test tools
setup: $(TESTING)

## test: the README's test command: the code checks, the suite against real gunicorn, the compose demo
test: setup
	$(BIN)/python -m pytest

## lint: just the code checks (tests/test_quality.py runs the same ones)
lint: setup
	$(BIN)/ruff check service loadtest tests bench
	$(BIN)/ruff format --check service loadtest tests bench
	$(BIN)/mypy service loadtest

## bench: issue #20's five goals side by side, wrk as the client (needs wrk, postgresql and pgbench; redis-server for the lease modes)
bench: $(RUNTIME)
	$(BIN)/python bench/bench.py

## serve: the service on http://127.0.0.1:8000 with the repository's db.json
serve: $(RUNTIME)
	$(BIN)/ticketlock-serve

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

# eventstore: `make run` serves it, `make test` tests it. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8080
DB     ?= $(or $(EVENTSTORE_DB),eventstore.db)

.PHONY: run test tools bench fuzz mutants clean

# A postgresql:// database needs psycopg too (requirements-postgres.txt).
run: $(VENV)/.runtime $(if $(filter postgres%,$(DB)),$(VENV)/.postgres)
	$(PY) serve.py --host $(HOST) --port $(PORT) --db $(DB)

test: $(VENV)/.dev tools
	$(PY) -m pytest -q

# System tools the tests use: strace (to see each commit's fsync) and PostgreSQL's
# server binaries (the tests start a throwaway cluster). Installed with apt-get
# where we are root; elsewhere those tests skip, except in CI (.ci/run), where
# a missing PostgreSQL fails the run.
tools:
	@command -v strace >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  apt-get install -y -qq strace >/dev/null; } || echo "note: strace is not installed; its test will skip"
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ -n "$$EVENTSTORE_PG_BIN" ] || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "note: PostgreSQL's server binaries are not installed; the PostgreSQL half of the tests will skip"

# Longer schemathesis runs than make test's: FUZZ_SECONDS per user and seed
# (default 120), over FUZZ_SEEDS (default 2 3 4 5; make test uses seed 1).
fuzz: $(VENV)/.dev
	set -e; for seed in $(or $(FUZZ_SEEDS),2 3 4 5); do \
	  FUZZ_SEED=$$seed FUZZ_SECONDS=$(or $(FUZZ_SECONDS),120) $(PY) -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py; \
	done

# Break one rule at a time in a copy of the code; every mutant must be killed.
mutants: $(VENV)/.dev tools
	$(PY) bench/mutants.py $(MUTANTS_ARGS)

bench: $(VENV)/.dev
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(PY) bench/run.py $(BENCH_ARGS)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.postgres: requirements-postgres.txt | $(VENV)/bin/python
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-postgres.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt requirements-postgres.txt | $(VENV)/bin/python
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@ $(VENV)/.runtime $(VENV)/.postgres

clean:
	rm -rf $(VENV) .pytest_cache

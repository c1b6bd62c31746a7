# eventstore: `make run` serves it, `make test` tests it. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8080
DB     ?= $(or $(EVENTSTORE_DB),eventstore.db)

.PHONY: run test tools bench fuzz clean

run: $(VENV)/.runtime
	$(PY) serve.py --host $(HOST) --port $(PORT) --db $(DB)

test: $(VENV)/.dev tools
	$(PY) -m pytest -q

# System tools the tests use: strace (to see each commit's fsync). Installed with
# apt-get where we are root; elsewhere those tests skip, except in CI (CI=true).
tools:
	@command -v strace >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  apt-get install -y -qq strace >/dev/null; } || echo "note: strace is not installed; its test will skip"

# A longer schemathesis run than make test's: FUZZ_SECONDS per user (default 600).
fuzz: $(VENV)/.dev
	FUZZ_SECONDS=$(or $(FUZZ_SECONDS),600) $(PY) -m pytest -q -s tests/test_fuzz.py

bench: $(VENV)/.dev
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(PY) bench/run.py $(BENCH_ARGS)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

clean:
	rm -rf $(VENV) .pytest_cache

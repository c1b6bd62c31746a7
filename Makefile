# eventstore: `make run` serves it, `make test` tests it. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8080
DB     ?= $(or $(EVENTSTORE_DB),eventstore.db)

.PHONY: run test tools bench fuzz mutants clean pg pg-stop

# A postgresql:// database needs psycopg too (requirements-postgres.txt). The
# first start makes the default database (the README's first run); another DB=
# that does not exist is refused (a mistyped name would make an empty registry)
# unless CREATE=1 is given too. The command is not echoed: a postgresql:// DB
# may hold a password (serve.py's banner shows it masked).
CREATE ?= $(if $(filter eventstore.db,$(DB)),1)
run: $(VENV)/.runtime $(if $(filter postgres%,$(DB)),$(VENV)/.postgres)
	@$(PY) serve.py --host $(HOST) --port $(PORT) --db '$(DB)'$(if $(CREATE), --create)

test: $(VENV)/.dev tools
	$(PY) -m pytest -q

# System tools the tests use: strace (to see each commit's fsync), curl (the
# README's session), Debian's chromium and its chromedriver (the console's test in
# a real browser; nothing downloads a browser of its own) and PostgreSQL's server
# binaries (the tests start a throwaway cluster). Installed with apt-get where we are root; elsewhere those tests skip,
# except in CI (.ci/run), where a missing one fails the run.
tools:
	@command -v strace >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  apt-get install -y -qq strace >/dev/null; } || echo "note: strace is not installed; its test will skip"
	@command -v curl >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  apt-get install -y -qq curl >/dev/null; } || echo "note: curl is not installed; the README session's test will skip"
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  apt-get install -y -qq chromium chromium-driver >/dev/null; } || echo "note: chromium is not installed; the console's browser test will skip"
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ -n "$$EVENTSTORE_PG_BIN" ] || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "note: PostgreSQL's server binaries are not installed; the PostgreSQL half of the tests will skip"

# A throwaway PostgreSQL cluster to try the PostgreSQL backend with, from Debian's
# server binaries (`make tools` installs them where we are root; as root the server
# runs as the user postgres, since it refuses root), on port PGPORT. It listens on no
# TCP port, only on a Unix socket in its private folder PGDIR (mode 0700), so no
# other local user can reach it; the app's role `eventstore` is no superuser (it
# owns the database eventstore and may read pg_stat_activity). Then:
#   make run DB=$(PGURL)
# `make pg-stop` stops it; its files stay in PGDIR until removed.
PGPORT ?= 5433
PGDIR  ?= /tmp/eventstore-trial-pg-$(PGPORT)
PGBIN  := $(lastword $(sort $(wildcard /usr/lib/postgresql/*/bin)))
AS_PG  := $(if $(filter 0,$(shell id -u)),runuser -u postgres --)
PGUSER_OWNER := $(if $(AS_PG),postgres,$(shell id -un))
PGURL   = postgresql://eventstore@$(subst /,%2F,$(PGDIR)):$(PGPORT)/eventstore
PSQL    = $(AS_PG) $(PGBIN)/psql -h $(PGDIR) -p $(PGPORT) -U $(PGUSER_OWNER) -d postgres -v ON_ERROR_STOP=1 -qtA
pg: $(VENV)/.postgres
	@test -x "$(PGBIN)/initdb" || { echo "error: PostgreSQL's server binaries are not installed (make tools installs them as root)"; exit 1; }
	@test -d $(PGDIR)/data || { mkdir -m 700 $(PGDIR) || \
	    { echo "error: cannot make $(PGDIR), which must not exist yet (make pg makes it private); remove it or give another PGDIR"; exit 1; }; \
	  $(if $(AS_PG),chown postgres $(PGDIR) &&) $(AS_PG) $(PGBIN)/initdb -D $(PGDIR)/data --auth-local=trust \
	    --auth-host=reject --encoding=UTF8 --locale=C >$(PGDIR)/initdb.log 2>&1 || \
	    { echo "error: initdb failed; its log: $(PGDIR)/initdb.log"; exit 1; }; }
	@test ! -L $(PGDIR) && test "$$(stat -c '%U %a' $(PGDIR))" = "$(PGUSER_OWNER) 700" || \
	  { echo "error: $(PGDIR) is not a private folder of $(PGUSER_OWNER) (mode 700); remove it or give another PGDIR"; exit 1; }
	@$(AS_PG) $(PGBIN)/pg_ctl -D $(PGDIR)/data -l $(PGDIR)/log -w -t 60 status >/dev/null || \
	  $(AS_PG) $(PGBIN)/pg_ctl -D $(PGDIR)/data -l $(PGDIR)/log -w -t 60 start \
	    -o "-p $(PGPORT) -k $(PGDIR) -c listen_addresses='' -c unix_socket_permissions=0700" >/dev/null || \
	  { echo "error: PostgreSQL did not start on port $(PGPORT); its log: $(PGDIR)/log"; tail -n 3 $(PGDIR)/log 2>/dev/null; exit 1; }
	@$(PSQL) -c "SELECT 1 FROM pg_roles WHERE rolname = 'eventstore'" | grep -q 1 || \
	  $(PSQL) -c "CREATE ROLE eventstore LOGIN" -c "GRANT pg_read_all_stats TO eventstore"
	@$(PSQL) -c "SELECT 1 FROM pg_database WHERE datname = 'eventstore'" | grep -q 1 || \
	  $(PSQL) -c "CREATE DATABASE eventstore OWNER eventstore"
	@echo "PostgreSQL is up: make run DB=$(PGURL)  (make pg-stop stops it)"

pg-stop:
	@test ! -d $(PGDIR)/data || ! $(AS_PG) $(PGBIN)/pg_ctl -D $(PGDIR)/data status >/dev/null || \
	  $(AS_PG) $(PGBIN)/pg_ctl -D $(PGDIR)/data -w -t 60 stop -m fast

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

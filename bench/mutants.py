"""``make mutants``: break one rule of the contract at a time, in a copy of the
repository, and check that the test suite notices (the mutant is "killed").

Each mutant is a few exact text replacements in one file; every replacement
must match exactly once, so a mutant that no longer applies to the code is
reported as such instead of passing silently. By default each mutant runs the
test files that own its rule (fast); ``--full`` runs the whole suite for each.

    python bench/mutants.py               # every mutant, its own test files
    python bench/mutants.py --full        # every mutant, the whole suite
    python bench/mutants.py --only sync   # mutants whose name contains "sync"

A mutant is killed only by a failed test (pytest exit 1 with a FAILED line): one
that breaks the run instead (an import error, a fixture error, a hang) is
reported as not killed. The mutants' tests are first run once on the code as it
is: a test that fails there would "kill" every mutant it judges, so the run stops.
Exit status 1 when any mutant is not killed or does not apply, when the code as it
is fails, or when ``--only`` names no mutant.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, file, [(old, new), ...], test files that should kill it)
MUTANTS = [
    ("shared 401 exception re-raised", "eventstore.py", [
        ("def unauthorized():", "_SHARED_401 = None\n\n\ndef unauthorized():"),
        ("    return Problem(401, ", "    global _SHARED_401\n    _SHARED_401 = _SHARED_401 or Problem(401, "),
        ('               headers=[("WWW-Authenticate", REALM)])\n',
         '               headers=[("WWW-Authenticate", REALM)])\n    return _SHARED_401\n'),
    ], ["tests/test_memory.py"]),
    ("DELETE answers 404 before 403", "eventstore.py", [
        ('    event_id, program_id = _event_id_param(req)\n    req.require("write", program_id)\n'
         '    if not EVENT_ID_RE',
         '    event_id, program_id = _event_id_param(req)\n'
         '    if req.reads.read_event(event_id) is None:\n'
         '        raise Problem(404, f"Event {event_id!r} does not exist.")\n'
         '    req.require("write", program_id)\n    if not EVENT_ID_RE'),
    ], ["tests/test_auth.py", "tests/test_events.py"]),
    ("member erasure answers 404 before 403", "eventstore.py", [
        ('    program_id, member_id = req.params["program_id"], req.params["member_id"]\n',
         '    program_id, member_id = req.params["program_id"], req.params["member_id"]\n'
         '    if req.reads.find_program(program_id) is None:\n'
         '        raise Problem(404, f"Program {program_id!r} is not registered.")\n'),
    ], ["tests/test_lifecycle.py"]),
    ("replay treats 1, 1.0 and true alike below the top level", "eventstore.py", [
        ("    content = canonical_json([member_id, event_type, start_us, end_us, data, ref])",
         "    content = canonical_json([member_id, event_type, start_us, end_us, {k: v if not isinstance(v, "
         "(dict, list)) else json.loads(json.dumps(v).replace('true', '1').replace('.0', '')) "
         "for k, v in data.items()}, ref])"),
    ], ["tests/test_events.py"]),
    ("auth cache keyed by user id", "eventstore.py", [
        ('        cache_key = hashlib.sha256(header.encode("utf-8", "surrogateescape")).digest() if header else None',
         '        cache_key = (parse_basic_auth(header) or (None,))[0]'),
    ], ["tests/test_auth.py"]),
    ("no in-process wake-up of long polls on commit", "eventstore.py", [
        ("GroupCommitWriter(storage.session, clock, on_commit=news.committed, **options)",
         "GroupCommitWriter(storage.session, clock, on_commit=lambda touched: None, **options)"),
    ], ["tests/test_feed.py"]),
    ("synchronous=NORMAL", "eventstore_sqlite.py", [
        ('conn.execute("PRAGMA synchronous = FULL")', 'conn.execute("PRAGMA synchronous = NORMAL")'),
    ], ["tests/test_durability.py"]),
    ("a failed COMMIT acknowledged", "eventstore_writer.py", [
        ("                item.error, item.result = copy.copy(exc).with_traceback(None), None",
         "                pass"),
    ], ["tests/test_group_commit.py"]),
    ("writer connection opened outside error handling", "eventstore_writer.py", [
        ("        try:\n            with FORK_GUARD.database_calls():  # a fork waits for the opening too\n"
         "                session = self.open_session()\n        except Exception as exc:\n"
         "            return self._died(exc, batch)\n",
         "        session = self.open_session()\n"),
    ], ["tests/test_group_commit.py"]),
    ("a dead writer's changes never answered", "eventstore_writer.py", [
        ("            if not item.done.is_set():\n                item.error, item.result = self.unavailable(), None\n"
         "                item.done.set()",
         "            pass"),
    ], ["tests/test_group_commit.py"]),
    ("a key's last use waits for the writer", "eventstore.py", [
        ("            self.writer.post(lambda tx: tx.touch_key(",
         "            self.writer.submit(lambda tx: tx.touch_key("),
    ], ["tests/test_auth.py"]),
    ("Content-Length checked with str.isdigit", "eventstore.py", [
        ("            if not CONTENT_LENGTH_RE.fullmatch(length):", "            if not length.isdigit():"),
        ('            digits = length.lstrip("0") or "0"', "            digits = length"),
    ], ["tests/test_events.py"]),
    ("repeatable feed parameters unbounded", "eventstore.py", [
        ("MAX_REPEATED = 100 ", "MAX_REPEATED = 10**9 "),
    ], ["tests/test_feed.py"]),
    ("If-Match compares weakly", "eventstore.py", [
        ("            if current is None or not strong_match(self.if_match, current):",
         "            if current is None or not weak_match(self.if_match, current):"),
    ], ["tests/test_events.py"]),
    ("SYSTEM user gets 403 for an id without a hyphen", "eventstore.py", [
        ("        if self.user.is_system:\n            return\n", ""),
    ], ["tests/test_auth.py"]),
    ("Sequence counted per process, not read in the transaction", "eventstore_sqlite.py", [
        ("class SQLiteTransaction(", "SEQ_COUNTERS = {}\n\n\nclass SQLiteTransaction("),
        ("            self._last_seq = self.last_sequence()",
         '            self._last_seq = SEQ_COUNTERS.setdefault("seq", self.last_sequence())'),
        ("        self._last_seq = seq\n",
         '        self._last_seq = SEQ_COUNTERS["seq"] = seq\n'),
    ], ["tests/test_durability.py"]),
    ("tombstones keep the member id", "eventstore_sqlite.py", [
        ('        "UPDATE events SET member_id = NULL, start_us = NULL',
         '        "UPDATE events SET member_id = member_id, start_us = NULL'),
    ], ["tests/test_events.py", "tests/test_lifecycle.py"]),
    ("failed authentications counted per process", "eventstore_throttle.py", [
        ("        return AuthThrottle(path=path, **options)", "        return AuthThrottle(**options)"),
    ], ["tests/test_processes.py"]),
    ("other processes' commits never wake a long poll", "eventstore_news.py", [
        ("                    self.committed(None if len(changed) == WATCH_LIMIT else\n"
         "                                   {(change.program_id, change.event_type) for change in changed})",
         "                    pass"),
    ], ["tests/test_processes.py"]),
    ("a stopping server does not answer waiting long polls", "serve.py", [
        ("        app.end_long_polls()\n", "        pass\n"),
    ], ["tests/test_processes.py"]),
    ("the feed walk ignores the caller's programs", "eventstore_sqlite.py", [
        ("        if programs is not None:\n            where.insert(0, f\"+program_id IN",
         "        if False:\n            where.insert(0, f\"+program_id IN"),
    ], ["tests/test_properties.py"]),
    ("a long poll re-reads for commits it cannot match", "eventstore_news.py", [
        ("if touched is None or listener.may_match(touched)]", "]"),
    ], ["tests/test_feed.py"]),
    ("batch is not all or nothing", "eventstore.py", [
        ("    if errors:\n        errors += _type_errors(req, batch)",
         "    if errors and not events:\n        errors += _type_errors(req, batch)"),
    ], ["tests/test_batch.py"]),
    ("the throttle's latest failure not recorded: a quiet table hides guessers", "eventstore_throttle.py", [
        ("            self.LATEST.pack_into(self._map, self._latest_at, now)\n        finally:",
         "        finally:"),
    ], ["tests/test_throttle.py"]),
    ("a change of type does not move its count", "schema.sql", [
        ("WHEN OLD.deleted = 0 AND (NEW.deleted = 1 OR NEW.event_type IS NOT OLD.event_type)",
         "WHEN OLD.deleted = 0 AND NEW.deleted = 1"),
        ("WHEN NEW.deleted = 0 AND (OLD.deleted = 1 OR NEW.event_type IS NOT OLD.event_type)",
         "WHEN NEW.deleted = 0 AND OLD.deleted = 1"),
    ], ["tests/test_event_types.py"]),
    ("counts of a version-1 database not built on upgrade", "eventstore_sqlite.py", [
        ("    if version < 2:  # counts", "    if False:  # counts"),
    ], ["tests/test_event_types.py"]),
    ("the catalogue shows counts of programs the caller cannot read", "eventstore.py", [
        ("    entries = req.reads.event_types_json(readable_programs(req.user), event_type)",
         "    entries = req.reads.event_types_json(None, event_type)"),
    ], ["tests/test_event_types.py"]),
    ("a strict program's batch items not checked", "eventstore.py", [
        ("    wrong_types = unregistered_type_errors(tx.rules, [(index, event.event_id, event.program_id, event.event_type)\n"
         "                                                     for index, event in indexed_events])",
         "    wrong_types = []"),
    ], ["tests/test_event_types.py"]),
    ("a type a strict program uses can be unregistered", "eventstore.py", [
        ("    if users:\n        named", "    if False:\n        named"),
    ], ["tests/test_event_types.py"]),
    ("PostgreSQL: the feed without the barrier of transactions in progress", "eventstore_pg.py", [
        ('BARRIER = "xid < pg_snapshot_xmin(pg_current_snapshot())"', 'BARRIER = "true"'),
    ], ["tests/test_postgres.py"]),
    ("PostgreSQL: Sequences taken without the lock and the xid", "schema-postgres.sql", [
        ("    PERFORM pg_advisory_lock(7310582);\n    BEGIN\n        PERFORM pg_current_xact_id();\n", "    BEGIN\n"),
    ], ["tests/test_postgres.py"]),
    ("PostgreSQL: a group commit sends no notification", "eventstore_pg.py", [
        ("pg_notify('{NOTIFY_CHANNEL}', ''),", "'{NOTIFY_CHANNEL}',"),
    ], ["tests/test_postgres.py"]),
    ("PostgreSQL: a COMMIT that rolled back is taken for a commit", "eventstore_pg.py", [
        ('if result.command_status != b"COMMIT":', "if False:"),
    ], ["tests/test_postgres.py"]),
    ("PostgreSQL: programs read at BEGIN not read again after a program is written", "eventstore_pg.py", [
        ("        self._programs = None  # read them from the table again\n", ""),
    ], ["tests/test_postgres.py"]),
    ("PostgreSQL: GETs read together handed the wrong rows", "eventstore_pg.py", [
        ("read.row = rows.get(read.event_id)", "read.row = next(iter(rows.values()), None)"),
    ], ["tests/test_postgres.py"]),
    ("PostgreSQL: the GET pipeline waits for a hung connection without end", "eventstore_pg.py", [
        ("if not poll.poll(None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000):",
         "if not poll.poll(None):"),
    ], ["tests/test_postgres.py"]),
    ("PostgreSQL: a group's upserts sent one round trip each", "eventstore_pg.py", [
        ("    PIPELINE_MAX = 64 ", "    PIPELINE_MAX = 1 "),
    ], ["tests/test_postgres.py"]),
    ("PostgreSQL: an upsert's answer awaited holding the GIL", "eventstore_pg.py", [
        ("            _wait_for_answer(pgconn)\n            return pgconn.get_result()",
         "            return pgconn.get_result()"),
    ], ["tests/test_postgres.py::test_an_upsert_held_by_a_row_lock_leaves_the_other_threads_running"]),
    ("PostgreSQL: a failed transaction rolled back in pipeline mode", "eventstore_pg.py", [
        ("            if tx is not None:\n                tx.settle()\n", "            pass\n"),
    ], ["tests/test_postgres.py"]),
    ("PostgreSQL: the GET pipeline's statement planned anew at every read", "eventstore_pg.py", [
        (' -c plan_cache_mode=force_generic_plan"', '"'),
    ], ["tests/test_postgres.py"]),
    ("replays skip the registered-types check", "eventstore.py", [
        ("    if not tx.rules.type_allowed(event.program_id, event.event_type):\n        raise bad_request(",
         "    if not tx.rules.type_allowed(event.program_id, event.event_type) and not tx.current(event.event_id):\n"
         "        raise bad_request("),
    ], ["tests/test_event_types.py"]),
    # Issue 24's fixes, each broken again.
    ("PostgreSQL: a failed BEGIN leaves the writer's connection in its aborted transaction", "eventstore_pg.py", [
        ("                and self.conn.pgconn.transaction_status == pq.TransactionStatus.IDLE)", ")"),
        ("            if not self.conn.closed and pgconn.transaction_status in (",
         "            if False and pgconn.transaction_status in ("),
    ], ["tests/test_postgres.py"]),
    ("PostgreSQL: the commit watcher gives up on a lost connection", "eventstore_news.py", [
        ("                    watch = None\n                    self._closed.wait(1.0)\n                    continue\n",
         "                    return\n"),
    ], ["tests/test_postgres.py"]),
    ("a forked child goes on with its parent's connections and threads", "eventstore.py", [
        ("        if self._pid != os.getpid():\n            self._after_fork()\n", ""),
    ], ["tests/test_embedding.py"]),
    ("a forked child shares its parent's writer-lock file description", "eventstore_sqlite.py", [
        ("            self.writer_lock.close()  # the parent's lock is unaffected: it holds the description too\n"
         "            self.writer_lock = None\n", "            pass\n"),
        ("        return SQLiteStorage(self.path, self.busy_timeout_ms)\n",
         "        fresh = SQLiteStorage(self.path, self.busy_timeout_ms)\n"
         "        fresh.writer_lock = self.writer_lock\n        return fresh\n"),
    ], ["tests/test_embedding.py"]),
    ("os.fork does not wait for the writer's commit", "eventstore_forks.py", [
        ("    os.register_at_fork(before=FORK_GUARD.before_fork, after_in_parent=FORK_GUARD.after_fork_in_parent,",
         "    os.register_at_fork(after_in_parent=FORK_GUARD.after_fork_in_parent,"),
    ], ["tests/test_embedding.py"]),
    ("the writer opens its session outside the fork guard", "eventstore_writer.py", [
        ("            with FORK_GUARD.database_calls():  # a fork waits for the opening too\n"
         "                session = self.open_session()",
         "            if True:\n                session = self.open_session()"),
    ], ["tests/test_embedding.py"]),
    ("a write withdrawn at its deadline stays in the queue (and is written later)", "eventstore_writer.py", [
        ("                        self._queue.remove(item)  # no writer has it: nothing of it is written, ever\n",
         ""),
    ], ["tests/test_group_commit.py"]),
    ("writes waiting on a held transaction keep every thread", "eventstore_writer.py", [
        ("                            self._slow() and self._queue.index(item) >= self.max_waiting):",
         "                            False):"),
        ("            if self.stuck() or (self._slow() and len(self._queue) >= self.max_waiting):",
         "            if self.stuck():"),
    ], ["tests/test_group_commit.py"]),
    ("PostgreSQL: a read on a connection a blip killed is not tried again", "eventstore_pg.py", [
        ("            if not (held.conn.broken or held.conn.closed):\n                raise\n",
         "            raise\n"),
    ], ["tests/test_postgres.py"]),
    ("the commit watcher forgets its last Sequence when it connects again", "eventstore_news.py", [
        ("                            watch = self.storage.watch_commits(after=seen)",
         "                            watch = self.storage.watch_commits()"),
    ], ["tests/test_postgres.py"]),
    ("PostgreSQL: the watch waits for a notification after connecting again", "eventstore_pg.py", [
        ("        if not self._behind:\n", "        if True:\n"),
    ], ["tests/test_postgres.py"]),
    ("PostgreSQL: rows restored into a younger cluster stay behind the feed's barrier", "eventstore_pg.py", [
        ("            if newest and newest[0]:\n", "            if False:\n"),
    ], ["tests/test_postgres.py"]),
    ("a group's writes keep the rules read before a change of them in the same group", "eventstore_storage.py", [
        ('        """Read every rule anew from now on (a program or a type was just changed)."""\n',
         '        """Read every rule anew from now on (a program or a type was just changed)."""\n'
         '        if hasattr(self, "_types"):\n            return\n'),
    ], ["tests/test_schemas.py"]),
    ("a host serving one request at a time holds long polls", "eventstore.py", [
        ('    if not environ.get("wsgi.multithread"):\n        return 0\n', ""),
    ], ["tests/test_feed.py", "tests/test_poll_after.py"]),
    ("a host that does not say its threads holds long polls by default", "eventstore.py", [
        ('    return MANY_LONG_POLLS if environ.get("SERVER_SOFTWARE", "").startswith("Werkzeug/") else 0',
         "    return MANY_LONG_POLLS"),
    ], ["tests/test_poll_after.py"]),
    ("uWSGI's threads do not bound the long polls held", "eventstore.py", [
        ("    if isinstance(threads, int) and threads > 0:", "    if False:"),
    ], ["tests/test_poll_after.py"]),
    ("a long poll not held says nothing of when to ask again", "eventstore.py", [
        ("        could_not_wait = [(POLL_AFTER_HEADER, str(POLL_AFTER_SECONDS))]", "        could_not_wait = []"),
    ], ["tests/test_poll_after.py"]),
    ("end_long_polls() ends no app's long polls", "eventstore.py", [
        ("    for app in list(_APPS):\n        app.end_long_polls()\n", "    pass\n"),
    ], ["tests/test_poll_after.py", "tests/test_hosts.py"]),
    ("a query parameter where none is taken is ignored", "eventstore.py", [
        ('        if query and not route.takes_query:',
         '        if False and not route.takes_query:'),
    ], ["tests/test_events.py"]),
    ("the command line makes a database on a mistyped name", "eventstore_admin.py", [
        ("and not os.path.exists(args.db) and not args.create:", "and False:"),
    ], ["tests/test_cli.py"]),
    ("client: the cursor saved before its page is written", "eventstore_client.py", [
        ('        out.write(("\\n".join(texts) + "\\n").encode("utf-8"))\n'
         '        out.flush()  # the events are out before the cursor (or the acknowledgement) says so\n'
         '        if args.cursor_file:\n            write_cursor(args.cursor_file, last)\n',
         '        if args.cursor_file:\n            write_cursor(args.cursor_file, last)\n'
         '        out.write(("\\n".join(texts) + "\\n").encode("utf-8"))\n        out.flush()\n'),
    ], ["tests/test_client.py"]),
    ("client: leaving follow() leaves its long poll waiting", "eventstore_client.py", [
        ("                    self._sock.shutdown(socket.SHUT_RDWR)", "                    pass"),
    ], ["tests/test_client.py"]),
    ("serve.py: a long poll whose client left waits on", "serve.py", [
        ("channel_request_lookahead=1, ", ""),
    ], ["tests/test_client.py"]),
    # Issue 35: the JSON access line written out field by field.
    ("serve.py: a JSON access line's user written unescaped", "serve.py", [
        ('f\'"user": {text(user)}, ', 'f\'"user": "{user}", '),
    ], ["tests/test_server.py"]),
    # Issue 29's fixes, each broken again.
    ("serve.py: a second server on another spelling of the address is let in", "serve.py", [
        ("    if port:\n        for family, address in addresses:", "    if False:\n        for family, address in addresses:"),
    ], ["tests/test_processes.py"]),
    ("serve.py: a silent connection holds its slot until the channel timeout", "serve.py", [
        ("            if not self.heard_from and reading and", "            if False and"),
    ], ["tests/test_server.py"]),
    ("serve.py: one address may hold every connection", "serve.py", [
        ("        if self.per_address[address] >= self.max_per_address:", "        if False:"),
    ], ["tests/test_server.py"]),
    ("serve.py: a request past its time closes the connection under the answers before it", "serve.py", [
        ("            self.time_out()\n            return False", "            self.will_close = True\n            return False"),
    ], ["tests/test_server.py"]),
    ("serve.py: a request's clock runs while waitress does not read it", "serve.py", [
        ("            self.receiving_since, self.paused = time.monotonic(), False  # read again",
         "            self.paused = False  # read again"),
    ], ["tests/test_server.py"]),
    ("serve.py: a missing database is made without --create", "serve.py", [
        ("or os.path.exists(args.db) or args.create:", "or True:"),
    ], ["tests/test_server.py"]),
    ("a database in a missing folder is named without it", "eventstore_sqlite.py", [
        ('            raise StorageOpenError(f"{self.path}: there is no folder {folder}")', "            pass"),
    ], ["tests/test_server.py"]),
    ("PostgreSQL: the catalogue written with spaces", "eventstore_pg.py", [
        ("string_agg(row_to_json(counted)::text, ','", "string_agg(row_to_json(counted)::text, ', '"),
    ], ["tests/test_event_types.py"]),
    ("make pg listens on a TCP port", "Makefile", [
        ("-c listen_addresses=''", "-c listen_addresses=127.0.0.1"),
    ], ["tests/test_postgres.py::test_make_pg_starts_a_throwaway_cluster_that_make_run_can_use_and_no_one_else"]),
    ("make pg makes the app's role a superuser", "Makefile", [
        ('-c "CREATE ROLE eventstore LOGIN"', '-c "CREATE ROLE eventstore LOGIN SUPERUSER"'),
    ], ["tests/test_postgres.py::test_make_pg_starts_a_throwaway_cluster_that_make_run_can_use_and_no_one_else"]),
    ("the tests' cluster listens on a TCP port", "tests/pg_cluster.py", [
        ('"-c listen_addresses=\'\'"', '"-c listen_addresses=127.0.0.1"'),
    ], ["tests/test_postgres.py::test_the_tests_cluster_takes_no_one_else"]),
    ("pip install: openapi.json not shipped", "pyproject.toml", [
        ('"openapi.json" = "eventstore_data/openapi.json"\n', ""),
    ], ["tests/test_install.py"]),
    ("make_app says nothing on a database without users", "eventstore.py", [
        ("        warn_if_no_users(self.storage)\n", ""),
    ], ["tests/test_server.py"]),
    ("client: an idle follower asks again at once where the server could not wait", "eventstore_client.py", [
        ("                if pause and fetch.stopped.wait(pause):", "                if False:"),
    ], ["tests/test_poll_after.py"]),
    ("client: a resent conditional PUT takes any revision for its own", "eventstore_client.py", [
        ('current["Revision"] == expected \\\n', 'True \\\n'),
    ], ["tests/test_client.py"]),
    ("client: a resent conditional PUT takes any content for its own", "eventstore_client.py", [
        ("                    and _same_event(current, body):", "                    and True:"),
    ], ["tests/test_client.py"]),
    ("schema: a PUT is not validated", "eventstore.py", [
        ("    violations = schema_violations(tx, schemas or SchemaCache(), event, checked)\n",
         "    violations = []\n"),
    ], ["tests/test_schemas.py"]),
    ("schema: a batch item is not validated", "eventstore.py", [
        ("for error in batch_errors(index, event.event_id, schema_violations(tx, schemas, event, item_checked))]",
         "for error in batch_errors(index, event.event_id, [])]"),
    ], ["tests/test_schemas.py"]),
    ("schema: a replay is not validated", "eventstore.py", [
        ("    violations = schema_violations(tx, schemas or SchemaCache(), event, checked)\n    if violations:",
         "    violations = schema_violations(tx, schemas or SchemaCache(), event, checked)\n"
         "    if violations and getattr(tx.current(event.event_id), 'content_hash', None) != event.content_hash:"),
    ], ["tests/test_schemas.py"]),
    ("schema: an import line is not checked before any is applied", "eventstore_admin.py", [
        ("            if kind == \"put\" and rules.schema_version(value.event_type) is not None:",
         "            if False:"),
    ], ["tests/test_schemas.py"]),
    ("schema: the 409 check skipped", "eventstore.py", [
        ("    if total:\n        raise incompatible(event_type, violations, total)\n\n    def register",
         "    if False:\n        raise incompatible(event_type, violations, total)\n\n    def register"),
        ("        if total:\n            raise incompatible(event_type, violations, total)",
         "        if False:\n            raise incompatible(event_type, violations, total)"),
    ], ["tests/test_schemas.py"]),
    ("schema: a dry run changes the type", "eventstore.py", [
        ("    if dry_run:\n        return {", "    if dry_run and False:\n        return {"),
    ], ["tests/test_schemas.py"]),
    ("schema: compiled validators keyed without the version", "eventstore_schemas.py", [
        ("        key = (event_type, version)", "        key = event_type"),
    ], ["tests/test_schemas.py"]),
    ("schema: the fast pass takes what a leaf keyword refuses", "eventstore_schemas.py", [
        ("        for _ in function(validator, value, instance, schema) or ():\n            return False\n",
         "        for _ in function(validator, value, instance, schema) or ():\n            return True\n"),
    ], ["tests/test_schemas.py"]),
    ("schema: the fast pass skips a property's subschema", "eventstore_schemas.py", [
        ("            if name in instance and not check(instance[name]):", "            if False:"),
    ], ["tests/test_schemas.py"]),
    ("schema: the fast pass without the budget's bound", "eventstore_schemas.py", [
        ("    return check if steps[0] < MAX_STEPS else None", "    return check"),
    ], ["tests/test_schemas.py"]),
    ("schema: the fast pass takes a subschema naming its own draft", "eventstore_schemas.py", [
        (' or (depth and "$schema" in schema):', ":"),
    ], ["tests/test_schemas.py"]),
    ("schema: a subschema naming its own draft runs without the budget", "eventstore_schemas.py", [
        ("            extended.evolve = _evolve_within(", "            _unused = _evolve_within("),
    ], ["tests/test_schemas.py"]),
    ("schema: multipleOf past float range is a 500", "eventstore_schemas.py", [
        ('overrides = {"uniqueItems": self._unique_items, "multipleOf": self._multiple_of}',
         'overrides = {"uniqueItems": self._unique_items}'),
    ], ["tests/test_schemas.py"]),
    ("retention: erases events that have not expired", "eventstore_sqlite.py", [
        ('            " AND e.updated_us < ? - t.retain_days * 86400000000"',
         '            " AND e.updated_us < ? + 0 * t.retain_days"'),
    ], ["tests/test_retention.py"]),
    ("retention: an expired event is still served", "eventstore_retention.py", [
        ("        erase_events(tx, [key.event_id for key in keys])\n", ""),
    ], ["tests/test_retention.py"]),
    ("retention: more than 1,000 events a transaction", "eventstore_retention.py", [
        ("    BATCH = 100 ", "    BATCH = 5000 "),
    ], ["tests/test_retention.py"]),
    ("retention: work under a lost lease is recorded", "eventstore_leases.py", [
        ("        if not tx.holds_lease(self.name, self.holder):", "        if False:"),
    ], ["tests/test_retention.py"]),
    ("client: a connection failure escapes ClientError", "eventstore_client.py", [
        ("class NoAnswer(ClientError, ConnectionError):", "class NoAnswer(ConnectionError):\n    status = None\n"),
        ("        super().__init__(None, None, message)", "        super().__init__(message)"),
    ], ["tests/test_client.py"]),
    # Issue 31: cursor hygiene and subscriptions.
    ("the head check: a cursor past the largest committed Sequence is taken", "eventstore.py", [
        ("    if sequence > limit:\n", "    if False:\n"),
    ], ["tests/test_feed.py"]),
    ("PostgreSQL: the limit on cursors is the served head", "eventstore_pg.py", [
        ('        return self._one("SELECT COALESCE(MAX(seq), 0) FROM events")[0]',
         "        return self.last_sequence()"),
    ], ["tests/test_postgres.py"]),
    ("subscriptions: an ack answered before its commit (not durable)", "eventstore.py", [
        ("    row = req.app.write(lambda tx: acknowledge_subscription(tx, name, req.user, through, rewind),\n"
         "                        touched=lambda _: False, seqs=0)\n",
         "    req.app.writer.post(lambda tx: acknowledge_subscription(tx, name, req.user, through, rewind),\n"
         "                        touched=lambda _: False, seqs=0)\n"
         "    row = visible_subscription(req.reads, req.user, name)._replace(position=through)\n"),
    ], ["tests/test_durability.py", "tests/test_subscriptions.py"]),
    ("subscriptions: reading moves the Position", "eventstore.py", [
        ("    through = rows[-1].seq if rows else row.position\n",
         "    through = rows[-1].seq if rows else row.position\n"
         "    req.app.write(lambda tx: tx.acknowledge(name, through, tx.now), touched=lambda _: False, seqs=0)\n"),
    ], ["tests/test_subscriptions.py"]),
    ("subscriptions: the owner's grants not checked again at a read", "eventstore.py", [
        ("    if denied:\n        raise Problem(403, f\"The subscription's owner {owner.user_id!r} can no longer",
         "    if False:\n        raise Problem(403, f\"The subscription's owner {owner.user_id!r} can no longer"),
    ], ["tests/test_subscriptions.py"]),
    ("subscriptions: an ack decided on the Position read before its transaction", "eventstore.py", [
        ("    row = req.app.write(lambda tx: acknowledge_subscription(tx, name, req.user, through, rewind),",
         "    seen = visible_subscription(req.reads, req.user, name)\n"
         "    row = req.app.write(lambda tx: acknowledge_subscription(tx, name, req.user, through,\n"
         "                                                            rewind or through >= seen.position),"),
    ], ["tests/test_subscriptions.py"]),
    ("PostgreSQL: an ack does not lock its subscription's row", "eventstore_pg.py", [
        (' FROM subscriptions WHERE name = %s FOR UPDATE", (name,))', ' FROM subscriptions WHERE name = %s", (name,))'),
    ], ["tests/test_subscriptions.py"]),
    ("PostgreSQL: a name two users create at once goes to the second", "eventstore_pg.py", [
        ('            + " WHERE subscriptions.owner = excluded.owner",', '            + ", owner = excluded.owner",'),
    ], ["tests/test_subscriptions.py"]),
    ("subscriptions: StartFrom now is a change before the head", "eventstore.py", [
        ('    if start_from == "now":\n        return reads.last_sequence()',
         '    if start_from == "now":\n        return max(0, reads.last_sequence() - 1)'),
    ], ["tests/test_subscriptions.py"]),
    ("client: a subscription's page acknowledged before it is handled", "eventstore_client.py", [
        ('            yield events, texts, rest["Through"]\n            try:\n',
         '            try:\n'),
        ("                    raise\n\n    def _pages(", '                    raise\n            yield events, texts, rest["Through"]\n\n    def _pages('),
    ], ["tests/test_client.py"]),
    ("subscriptions: Behind counts programs the owner can no longer read", "eventstore.py", [
        ("    programs, _ = readable_by_owner(owner, row)\n    if programs == []:",
         "    programs = list(row.programs) or readable_by_owner(owner, row)[0]\n    if programs == []:"),
    ], ["tests/test_subscriptions.py"]),
    ("metrics: a restarted worker's region starts again from zero", "eventstore_metrics.py", [
        ("        if magic != self.MAGIC:\n            used = 0\n", "        used = 0\n"),
    ], ["tests/test_metrics.py"]),
    ("metrics without credentials", "eventstore.py", [
        ('("GET", r"/metrics", metrics_handler, SYSTEM_UNLESS_PUBLIC, QUERY)', '("GET", r"/metrics", metrics_handler, OPEN, QUERY)'),
    ], ["tests/test_metrics.py"]),
    ("metrics: the route label is the path", "eventstore.py", [
        ('environ["eventstore.route"] = route.template', 'environ["eventstore.route"] = path'),
    ], ["tests/test_metrics.py"]),
    ("metrics: a dead process's long polls still counted", "eventstore_metrics.py", [
        ("live = region == self.region or self._held(region)", "live = True"),
    ], ["tests/test_metrics.py"]),
    ("metrics counted per process", "eventstore_metrics.py", [
        ('    if path is None or not hasattr(fcntl, "F_OFD_SETLK"):', "    if True:"),
    ], ["tests/test_metrics.py"]),
    ("metrics: new series added without the process's lock", "eventstore_metrics.py", [
        ("        if found is _MISSING:\n            with self._lock:\n                found = self._indexes(family, values)",
         "        if found is _MISSING:\n            found = self._indexes(family, values)"),
    ], ["tests/test_metrics.py"]),
    ("metrics: a region's blocks not allocated when it is taken (SIGBUS on a full disk)", "eventstore_metrics.py", [
        ("                    os.posix_fallocate(self._fd, self._start(self.region), self.REGION)", "                    pass"),
    ], ["tests/test_metrics.py"]),
    ("metrics: the supervisor holds no region (all workers dying at once start the counts afresh)", "serve.py", [
        ("        return eventstore_metrics.Metrics(storage.local_file(eventstore_metrics.FILE_SUFFIX)) if args.metrics else None",
         "        return None"),
    ], ["tests/test_metrics.py"]),
    ("metrics: the subscriptions' lag left out of a scrape", "eventstore.py", [
        ("SUBSCRIPTION_BEHIND: behind,", "SUBSCRIPTION_BEHIND: [],"),
    ], ["tests/test_metrics.py"]),
    ("metrics: a forked child counts in its parent's region", "eventstore_metrics.py", [
        ("        self.table.close()\n        self.table = open_table(self.path)", "        pass"),
    ], ["tests/test_metrics.py"]),
    ("a request id not echoed", "eventstore.py", [
        ('        headers.append(("X-Request-Id", rid))\n', ""),
    ], ["tests/test_conventions.py"]),
    ("a request id taken unchecked", "eventstore.py", [
        ("    if given and REQUEST_ID_RE.fullmatch(given):", "    if given:"),
    ], ["tests/test_conventions.py"]),
    ("serve.py: a switch without its environment variable", "serve.py", [
        ("    if not long_names or action.help == argparse.SUPPRESS",
         "    if not long_names or action.nargs == 0 or action.help == argparse.SUPPRESS"),
    ], ["tests/test_conventions.py"]),
    ("serve.py: --log-format json logs messages as text", "serve.py", [
        ('handler.setFormatter(JsonLogFormatter() if log_format == "json" else TextLogFormatter())',
         "handler.setFormatter(TextLogFormatter())"),
    ], ["tests/test_conventions.py"]),
    ("serve.py: a JSON log line without its request id", "serve.py", [
        ('        request_id = eventstore.REQUEST_ID.get()\n        if request_id is not None:\n'
         '            line["requestId"] = request_id\n', ""),
    ], ["tests/test_conventions.py"]),
    ("console: a value rendered as markup", "console/console.js", [
        ("    node.append(child instanceof Node ? child : document.createTextNode(String(child)));",
         '    if (child instanceof Node) node.append(child); else node.insertAdjacentHTML("beforeend", String(child));'),
    ], ["tests/test_console.py"]),
    ("console: a value parsed as markup (past the script's static check)", "console/console.js", [
        ("    node.append(child instanceof Node ? child : document.createTextNode(String(child)));",
         "    node.append(...(child instanceof Node ? [child] :\n"
         "      new DOMParser().parseFromString(String(child), \"text/html\").body.childNodes));"),
    ], ["tests/test_console.py"]),
    ("console: the key kept beyond the tab", "console/console.js", [
        ("sessionStorage.setItem(STORED", "localStorage.setItem(STORED"),
    ], ["tests/test_console.py"]),
    ("console: served without frame-ancestors", "eventstore.py", [
        ("form-action 'none'; frame-ancestors 'none'\"", "form-action 'none'\""),
    ], ["tests/test_console.py"]),
    ("pip install: the console not shipped", "pyproject.toml", [
        ('"console" = "eventstore_data/console"\n', ""),
    ], ["tests/test_install.py"]),
    # Issue 32: webhooks.
    ("webhooks: a webhook row's repr shows its secrets", "eventstore_storage.py", [
        ("    def __repr__(self):  # a row may reach a log line or a traceback: never its secrets\n",
         "    def _unused_repr(self):\n"),
    ], ["tests/test_webhooks.py"]),
    ("webhooks: signed with the secrets read before the batch's changes", "eventstore_webhooks.py", [
        ("for secret in signing_secrets(secrets, now))}", "for secret in signing_secrets(webhook, now))}"),
    ], ["tests/test_webhooks.py"]),
    ("webhooks: port 0 accepted in a Url", "eventstore_webhooks.py", [
        ("    if port == 0:\n", "    if port == -1:\n"),
    ], ["tests/test_webhooks.py"]),
    ("webhooks: the Position moved before a 2xx", "eventstore_webhooks.py", [
        ("            if answer.ok:\n                tx.acknowledge(row.name, batch.last, tx.now)",
         "            tx.acknowledge(row.name, batch.last, tx.now)"),
    ], ["tests/test_webhooks.py"]),
    ("webhooks: the lease not checked when an attempt is recorded", "eventstore_webhooks.py", [
        ("            sub.lease.check(tx)\n            current = tx.lock_subscription(row.name)\n"
         "            if not same_delivery(current, row):\n                return False",
         "            current = tx.lock_subscription(row.name)\n"
         "            if not same_delivery(current, row):\n                return False"),
    ], ["tests/test_webhooks.py"]),
    ("webhooks: the signature over the wrong bytes", "eventstore_webhooks.py", [
        ('f"{msg_id}.{timestamp}.".encode("utf-8") + body', 'f"{msg_id}.{timestamp}".encode("utf-8") + body'),
    ], ["tests/test_webhooks.py"]),
    ("webhooks: back-off without a cap", "eventstore_webhooks.py", [
        ("    return min(rng.uniform(base, 1.5 * base), cap)", "    return rng.uniform(base, 1.5 * base)"),
        ("    return failed._replace(next_attempt_us=now + int(max(MIN_WAIT, min(wait, max_backoff)) * 1_000_000))",
         "    return failed._replace(next_attempt_us=now + int(max(MIN_WAIT, wait) * 1_000_000))"),
    ], ["tests/test_webhooks.py"]),
    ("webhooks: a 410 retried", "eventstore_webhooks.py", [
        ("    if answer.status == 410:\n", "    if False:\n"),
    ], ["tests/test_webhooks.py"]),
    ("webhooks: a commit does not wake the deliverer (only the re-check does)", "eventstore_webhooks.py", [
        ("row.event_types, lambda: self._heard(sub))", "row.event_types, lambda: None)"),
    ], ["tests/test_webhooks.py"]),
    ("webhooks: other processes' commits are not watched for the deliverer", "eventstore_news.py", [
        ("            self._watching += 1\n            self._start_watcher()", "            self._watching += 1"),
    ], ["tests/test_webhooks.py"]),
    ("webhooks: a redirect followed", "eventstore_webhooks.py", [
        ("        if 200 <= status < 300:\n",
         "        if 300 <= status < 400 and response.getheader(\"Location\"):\n"
         "            conn.close()\n"
         "            return post(response.getheader(\"Location\"), headers, body, attempt, tls_context)\n"
         "        if 200 <= status < 300:\n"),
    ], ["tests/test_webhooks.py"]),
    ("webhooks: a URL's host looked up (DNS) to decide loopback", "eventstore_webhooks.py", [
        ('    if host in ("localhost", "::1"):\n        return True\n',
         '    if host in ("localhost", "::1"):\n        return True\n'
         "    with contextlib.suppress(OSError):\n"
         "        host = socket.getaddrinfo(host, None)[0][4][0]\n"),
    ], ["tests/test_webhooks.py"]),
    ("webhooks: the answer read whole", "eventstore_webhooks.py", [
        ("            response.read(MAX_ANSWER_BYTES)", "            response.read()"),
    ], ["tests/test_webhooks.py"]),
    ("webhooks: a secret in the representation", "eventstore.py", [
        ('            "DisabledReason": webhook.disabled_reason}', '            "DisabledReason": webhook.disabled_reason, '
         '"Secret": webhook.secret}'),
    ], ["tests/test_webhooks.py"]),
    ("webhooks: ack without Rewind taken on a webhook subscription", "eventstore.py", [
        ("    if webhook is not None and not rewind:\n", "    if False:\n"),
    ], ["tests/test_webhooks.py"]),
    # Issue 32's review.
    ("webhooks: a retry sends the batch kept in memory without reading the owner's grants", "eventstore_webhooks.py", [
        ("        webhook = row.webhook\n        try:\n            programs = self._read(",
         "        webhook = row.webhook\n"
         "        if webhook.batch_last is not None and sub.cached is not None and sub.cached[0][:5] == (\n"
         "                webhook.batch_first, webhook.batch_last, webhook.batch_first_attempt_us, webhook.restarts,\n"
         "                row.position):\n"
         "            return sub.cached[1]\n"
         "        try:\n            programs = self._read("),
    ], ["tests/test_webhooks.py"]),
    ("webhooks: a Retry-After of 0 or in the past taken as it is (no floor under the wait)", "eventstore_webhooks.py", [
        ("int(max(MIN_WAIT, min(wait, max_backoff)) * 1_000_000)", "int(min(wait, max_backoff) * 1_000_000)"),
    ], ["tests/test_webhooks.py"]),
    ("leases: a release not ordered after a renewal in flight", "eventstore_leases.py", [
        ("        with self._changing:\n            if self.held:\n                self.held = False",
         "        if True:\n            if self.held:\n                self.held = False"),
    ], ["tests/test_retention.py"]),
    ("webhooks: a batch formed again keeps its recorded Through whatever it holds", "eventstore_webhooks.py", [
        ("                if 0 < len(kept) <= webhook.max_events:", "                if kept:"),
    ], ["tests/test_webhooks.py"]),
]


def copy_repository(dest):
    """The tracked and untracked-but-not-ignored files, as they are now."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def apply(dest, path, replacements):
    """Apply the replacements; -> None, or why the mutant does not apply."""
    target = dest / path
    text = target.read_text()
    for old, new in replacements:
        if text.count(old) != 1:
            return f"the text to replace is found {text.count(old)} times: {old[:60]!r}"
        text = text.replace(old, new)
    target.write_text(text)
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="run the whole suite for every mutant")
    parser.add_argument("--only", help="only mutants whose name contains this")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or args.only.lower() in m[0].lower()]
    if not chosen:
        print(f"no mutant's name contains {args.only!r}")
        return 1
    outcomes = []
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder) / "base"
        base.mkdir()
        copy_repository(base)
        # A test that fails on the code as it is would "kill" every mutant routed to it.
        tests = [] if args.full else list(dict.fromkeys(test for *_, mutant_tests in chosen for test in mutant_tests))
        tests = [test for test in tests if test.partition("::")[0] == test or test.partition("::")[0] not in tests]
        check = Path(folder) / "unmutated"
        shutil.copytree(base, check)
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                                cwd=check, capture_output=True, text=True)
        shutil.rmtree(check)
        if result.returncode:
            print(f"the unmutated code fails the mutants' tests (pytest exit {result.returncode}); "
                  f"no mutant can be judged:\n{result.stdout[-3000:]}")
            return 1
        print(f"the unmutated code passes the mutants' tests ({len(tests) or 'all'} test files and tests)", flush=True)
        for number, (name, path, replacements, tests) in enumerate(chosen, 1):
            work = Path(folder) / f"m{number}"
            shutil.copytree(base, work)
            started = time.monotonic()
            problem = apply(work, path, replacements)
            if problem:
                outcome = f"DOES NOT APPLY ({problem})"
            else:
                command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           *([] if args.full else tests)]
                try:
                    result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=900)
                except subprocess.TimeoutExpired:  # pytest-timeout fails a hung test well before this
                    result = subprocess.CompletedProcess(command, "hung", "", "")
                # Killed means a test failed: pytest exits 1 with a FAILED summary line (not
                # captured log lines). Anything else (a collection or fixture ERROR, a crash,
                # a usage error, a hang) says the mutant broke the run, not that a test caught it.
                failed = [line.split(" ", 1)[1] for line in result.stdout.splitlines()
                          if line.startswith("FAILED tests/")]
                if not result.returncode:
                    outcome = "SURVIVED"
                elif result.returncode == 1 and failed:
                    outcome = f"killed by {failed[0].split(' - ')[0]}"
                else:
                    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR tests/")]
                    outcome = (f"NOT KILLED: pytest exit {result.returncode} with no failed test"
                               + (f" ({errors[0][:100]})" if errors else ""))
            outcomes.append((name, outcome))
            print(f"{number:2d}. {name}: {outcome} ({time.monotonic() - started:.0f} s)", flush=True)
            shutil.rmtree(work)
    killed = sum(outcome.startswith("killed") for _, outcome in outcomes)
    print(f"\n{killed} of {len(outcomes)} mutants killed")
    return 0 if killed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

"""What the tests share besides fixtures: a registry on a temporary database
(programs FOO and BAR, a user of every kind), WebTest callers authenticated as
each user, the tests' own SQL on either backend, and bounded waits."""

import base64
import contextlib
import os
import select
import sys
import threading
import time
from pathlib import Path

import pytest
import webtest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import eventstore  # noqa: E402
import eventstore_sqlite  # noqa: E402
from server import event_body  # noqa: E402,F401  (tests import it from here too)


def basic(user_id, api_key):
    token = base64.b64encode(f"{user_id}:{api_key}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


THREADED_HOST = {"wsgi.multithread": True}


def line_within(stream, seconds):
    """The next line a child process writes to ``stream`` (a text pipe), waited
    for at most ``seconds``. For a child that writes a line and then waits: a
    second line already in the buffer would not wake select."""
    assert select.select([stream], [], [], seconds)[0], f"no line within {seconds} s"
    return stream.readline()


class Caller:
    """A WebTest app that sends one user's credentials with every request."""

    def __init__(self, app, headers):
        # The tests call the app from several threads at once, as a threaded server
        # does (WebTest says wsgi.multithread False, where long polls answer at once).
        self.app = webtest.TestApp(app, extra_environ=THREADED_HOST)
        self.headers = headers

    def __getattr__(self, verb):
        method = getattr(self.app, verb)

        def call(url, *args, headers=None, **kwargs):
            return method(url, *args, headers={**self.headers, **(headers or {})}, **kwargs)

        return call


class Registry:
    """A registry with programs FOO and BAR and users of every kind."""

    def __init__(self, db, **options):
        self.db_path = str(db)
        # WebTest says neither how many threads it has nor that it starts one per
        # request, where the app holds no long poll unless told it may.
        options.setdefault("max_waiting", 8)
        self.app = eventstore.make_app(db, **options)
        self.storage = self.app.storage
        self.session = self.storage.session()
        self.sql = raw_sql(self.session)
        now = eventstore.now_us()
        self.keys = {"admin": eventstore.bootstrap_admin(self.session, now)}
        with self.session.transaction(now) as tx:
            for program_id in ("FOO", "BAR"):
                tx.put_program(program_id, f"Program {program_id}")
        self.add_user("writer", grants={"FOO": "write"})
        self.add_user("reader", grants={"FOO": "read"})
        self.add_user("nobody")
        self.anonymous = webtest.TestApp(self.app, extra_environ=THREADED_HOST)

    def add_user(self, user_id, is_system=False, grants=None):
        with self.session.transaction(eventstore.now_us()) as tx:
            self.keys[user_id] = eventstore.add_user(tx, user_id, is_system, grants or {})
        return self.keys[user_id]

    def transaction(self, now=None, seqs=100):
        """``with registry.transaction() as tx:`` a write transaction of its own."""
        return self.session.transaction(eventstore.now_us() if now is None else now, seqs)

    def client(self, user_id):
        return Caller(self.app, basic(user_id, self.keys[user_id]))

    def row(self, event_id):
        """The raw stored row, to check what really is in the database."""
        cursor = self.sql.execute("SELECT * FROM events WHERE event_id = ?", (event_id,))
        names = [d[0] for d in cursor.description]
        row = cursor.fetchone()
        if row is None:
            return None
        row = dict(zip(names, row))
        if isinstance(row["member_id"], bytes):  # PostgreSQL keeps it as UTF-8 bytes
            row["member_id"] = row["member_id"].decode("utf-8")
        return row

    def close(self):
        self.app.close()
        if self.storage.backend != "sqlite":
            self.sql.close()
        self.session.close()

    def dump(self):
        """Every stored row of every table, as text."""
        if self.storage.backend == "sqlite":
            return "\n".join(self.sql.iterdump())
        tables = [row[0] for row in self.sql.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return "\n".join(str(row[0]) for table in tables
                         for row in self.sql.execute(f"SELECT t::text FROM {table} AS t"))

    def count_events(self):
        return self.sql.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def record_commits(self):
        """-> a list that gets the number of changes of each group commit from now on."""
        commits = []
        self.app.writer.observers.append(lambda changes, seconds: commits.append(changes))
        return commits


def raw_sql(session):
    """What tests use to look at (and tamper with) the stored rows directly:
    the session's sqlite3 connection, or for PostgreSQL an autocommit
    connection whose execute takes SQLite's "?" placeholders."""
    return session.conn if session.storage.backend == "sqlite" else PostgresSQL(session.storage.url)


class PostgresSQL:
    """A connection for the tests' own SQL on PostgreSQL, in SQLite's dialect
    as far as these tests use it: "?" placeholders."""

    def __init__(self, url):
        import psycopg
        self.conn = psycopg.connect(url, autocommit=True)

    def execute(self, sql, params=()):
        return self.conn.execute(sql.replace("?", "%s"), params)

    def close(self):
        self.conn.close()


def open_sqlite(path):
    """A plain sqlite3 connection to an eventstore database file, its schema
    applied: for the tests of what only SQLite has."""
    eventstore_sqlite.SQLiteStorage(path).close()
    return eventstore_sqlite.connect(str(path))


def create_user(db, user_id, grants, is_system=False):
    """Create a user on the database ``db`` -> its key."""
    with opened(db) as session, session.transaction(eventstore.now_us()) as tx:
        return eventstore.add_user(tx, user_id, is_system, grants)


@contextlib.contextmanager
def opened(db):
    """``with opened(db) as session:`` a storage session on ``db``, closed after."""
    storage = eventstore.open_storage(db)
    session = storage.session()
    try:
        yield session
    finally:
        session.close()
        storage.close()


def eventually(predicate, what, timeout=10.0):
    """Poll ``predicate`` until it is true; fail the test if it is not within
    ``timeout`` seconds (every wait in these tests is bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.01)


def run_in_thread(function, *args):
    """Start ``function(*args)`` in a thread -> a callable that waits for it (at
    most ``timeout`` seconds, failing the test past that) and returns its result
    or raises its exception in the test's own thread."""
    outcome = {}

    def run():
        try:
            outcome["result"] = function(*args)
        except BaseException as exc:  # handed to the test's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result(timeout=20.0):
        thread.join(timeout)
        assert not thread.is_alive(), f"{getattr(function, '__name__', function)} did not finish in {timeout} s"
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    return result


def require_tool(name):
    """The path of a system tool a test needs (the Makefile's ``tools`` installs
    them where it can), or skip; where EVENTSTORE_REQUIRE_TOOLS is set (.ci/run
    sets it), fail instead: in CI such a test must run."""
    import shutil
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (make tools installs it as root)"
        if os.environ.get("EVENTSTORE_REQUIRE_TOOLS"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def postgres_url(pg_cluster):
    """A fresh PostgreSQL database's URL, or skip (fail where it is required)."""
    if pg_cluster is None:
        message = ("PostgreSQL server binaries not found (install Debian's postgresql package, or set "
                   "EVENTSTORE_PG_BIN): the PostgreSQL half of the suite did not run")
        if os.environ.get("EVENTSTORE_REQUIRE_POSTGRES"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        if os.environ.get("EVENTSTORE_REQUIRE_POSTGRES"):
            pytest.fail("psycopg is not installed (requirements-postgres.txt)")
        pytest.skip("psycopg is not installed: the PostgreSQL half of the suite did not run")
    return pg_cluster.new_database()

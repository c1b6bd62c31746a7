"""Fixtures: a fresh registry on a temporary database, and WebTest clients
authenticated as each kind of user."""

import base64
import sys
import threading
import time
from pathlib import Path

import pytest
import webtest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import eventstore  # noqa: E402


def basic(user_id, api_key):
    token = base64.b64encode(f"{user_id}:{api_key}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class Client:
    """A WebTest app that sends one user's credentials with every request."""

    def __init__(self, app, headers):
        self.app = webtest.TestApp(app)
        self.headers = headers

    def __getattr__(self, verb):
        method = getattr(self.app, verb)

        def call(url, *args, headers=None, **kwargs):
            return method(url, *args, headers={**self.headers, **(headers or {})}, **kwargs)

        return call


class Registry:
    """A registry with programs FOO and BAR and users of every kind."""

    def __init__(self, db_path, **options):
        self.db_path = str(db_path)
        self.app = eventstore.make_app(self.db_path, **options)
        self.db = eventstore.open_database(self.db_path)
        now = eventstore.now_us()
        self.keys = {"admin": eventstore.bootstrap_admin(self.db, now)}
        for program_id in ("FOO", "BAR"):
            with eventstore.write_transaction(self.db):
                eventstore.put_program(self.db, program_id, f"Program {program_id}", now)
        self.add_user("writer", grants={"FOO": "write"})
        self.add_user("reader", grants={"FOO": "read"})
        self.add_user("nobody")
        self.anonymous = webtest.TestApp(self.app)

    def add_user(self, user_id, is_system=False, grants=None):
        self.keys[user_id] = eventstore.add_user(self.db, user_id, is_system, grants or {},
                                                 eventstore.now_us())
        return self.keys[user_id]

    def client(self, user_id):
        return Client(self.app, basic(user_id, self.keys[user_id]))

    def row(self, event_id):
        """The raw stored row, to check what really is in the database."""
        cursor = self.db.execute("SELECT * FROM events WHERE event_id = ?", (event_id,))
        names = [d[0] for d in cursor.description]
        row = cursor.fetchone()
        return dict(zip(names, row)) if row else None

    def close(self):
        self.app.close()
        self.db.close()

    def count_events(self):
        return self.db.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def record_commits(self):
        """-> a list that gets the number of changes of each group commit from now on."""
        commits, original = [], self.app.writer._commit

        def counting_commit(conn, batch):
            commits.append(len(batch))
            original(conn, batch)

        self.app.writer._commit = counting_commit
        return commits


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


@pytest.fixture
def registry(tmp_path):
    registry = Registry(tmp_path / "events.db")
    yield registry
    registry.close()


@pytest.fixture
def admin(registry):
    return registry.client("admin")


@pytest.fixture
def writer(registry):
    return registry.client("writer")


@pytest.fixture
def reader(registry):
    return registry.client("reader")


def event_body(program_id="FOO", **fields):
    body = {
        "ProgramId": program_id,
        "ProgramMemberId": "joebob@example.com",
        "EventType": "CourseCompleted",
        "EventStartUTC": "2026-03-01T09:30:00Z",
        "EventEndUTC": "2026-03-01T11:00:00.250000Z",
        "EventData": {"course": "CPR-101", "score": 97},
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


@pytest.fixture
def body():
    return event_body


@pytest.fixture
def cli(tmp_path, capsys):
    """``cli(*argv, status=0)`` runs the admin command line on a fresh database
    file (``cli.db``) and checks its exit status -> (stdout, stderr)."""
    db = str(tmp_path / "cli.db")

    def run(*argv, status=0):
        code = eventstore.main(["--db", db, *argv])
        out, err = capsys.readouterr()
        assert code == status, err
        return out, err

    run.db = db
    return run

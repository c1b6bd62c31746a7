"""Fixtures only (pytest treats this file as a plugin); what the tests share
besides fixtures is in helpers.py."""

import pytest

from helpers import Registry, event_body, opened, postgres_url  # first: it puts the project on sys.path

import eventstore  # noqa: E402
import eventstore_admin  # noqa: E402


# --- The backends: every test that takes ``db`` (or ``registry``, or ``cli``)
# runs on SQLite and on PostgreSQL. PostgreSQL is a throwaway cluster started
# once per test session (tests/pg_cluster.py); where its binaries are missing
# those tests skip and the summary says so, unless EVENTSTORE_REQUIRE_POSTGRES
# is set (as .ci/run sets it): then they fail.

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def pg_cluster():
    from pg_cluster import Cluster, find_binaries
    if find_binaries() is None:
        yield None
        return
    cluster = Cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def db(backend, tmp_path, request):
    """A new, empty database of each backend: a SQLite file or a PostgreSQL URL."""
    if backend == "sqlite":
        yield str(tmp_path / "events.db")
        return
    cluster = request.getfixturevalue("pg_cluster")
    url = postgres_url(cluster)
    yield url
    cluster.release(url)


def pytest_collection_modifyitems(config, items):
    """Tests marked sqlite_only (what only SQLite has: its files, PRAGMAs,
    the flock between processes) run on SQLite alone; postgresql_only ones on
    PostgreSQL alone."""
    kept, dropped = [], []
    for item in items:
        backend = getattr(item, "callspec", None) and item.callspec.params.get("backend")
        other = {"sqlite": "postgresql_only", "postgresql": "sqlite_only"}.get(backend)
        (dropped if other and item.get_closest_marker(other) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
def registry(db):
    registry = Registry(db)
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


@pytest.fixture
def body():
    return event_body


@pytest.fixture
def cli(db, capsys):
    """``cli(*argv, status=0)`` runs the admin command line on a fresh database
    (``cli.db``) and checks its exit status -> (stdout, stderr)."""

    def run(*argv, status=0):
        code = eventstore_admin.main(["--db", db, "--create", *argv])
        out, err = capsys.readouterr()
        assert code == status, err
        return out, err

    def authenticate(user_id, api_key):
        with opened(db) as session:
            return eventstore.authenticate(session, user_id, api_key, eventstore.now_us(), touch=lambda *_: None)

    run.db = db
    run.authenticate = authenticate
    return run

"""Storage properties: schema application, durability settings, connections."""

import sqlite3
import threading

import pytest

import eventstore
import eventstore_sqlite
import eventstore_storage
from helpers import open_sqlite


def test_schema_applies_idempotently_and_records_its_version(tmp_path):
    db = tmp_path / "s.db"
    for _ in range(3):
        conn = open_sqlite(db)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == eventstore.SCHEMA_VERSION
        conn.close()
    conn = open_sqlite(db)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"programs", "users", "grants", "api_keys", "events"} <= tables


def test_schema_keeps_existing_data(registry):
    registry.client("admin").put_json("/events/FOO-1", {
        "ProgramId": "FOO", "ProgramMemberId": "m", "EventType": "T", "EventStartUTC": "2026-01-01T00:00:00Z"})
    eventstore.open_storage(registry.db_path).close()  # applies the schema again
    assert registry.count_events() == 1


def test_schema_sql_never_drops():
    import re
    assert not re.search(r"\bDROP\s+(TABLE|INDEX|VIEW|TRIGGER)", eventstore_sqlite.SCHEMA_PATH.read_text(), re.I)


def test_a_newer_schema_is_refused(tmp_path):
    conn = sqlite3.connect(tmp_path / "new.db")
    conn.execute(f"PRAGMA user_version = {eventstore.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(eventstore_storage.StorageOpenError, match="Upgrade eventstore"):
        eventstore.make_app(tmp_path / "new.db")


@pytest.mark.sqlite_only
def test_every_connection_is_wal_and_synchronous_full(registry):
    # The request threads' connections, the group-commit writer's, the command line's.
    conns = [registry.app.storage.reads().conn, registry.app.writer.open_session().conn, open_sqlite(registry.db_path)]
    for conn in conns:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1


@pytest.mark.sqlite_only
def test_each_thread_gets_its_own_connection(registry):
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(registry.app.storage.reads().conn)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), 'a thread did not finish in 30 s'
    assert len({id(conn) for conn in seen}) == 3
    assert registry.app.storage.reads() is registry.app.storage.reads()


def test_a_failed_write_leaves_nothing_behind(registry):
    event = eventstore.validate_event("FOO-1", {
        "ProgramId": "FOO", "ProgramMemberId": "m", "EventType": "T", "EventStartUTC": "2026-01-01T00:00:00Z"})
    with pytest.raises(RuntimeError):
        with registry.transaction(1) as tx:
            eventstore.put_event(tx, event)
            raise RuntimeError("crash in the middle")
    assert registry.count_events() == 0 and not registry.session.conn.info.transaction_status \
        if registry.storage.backend == "postgresql" else not registry.sql.in_transaction


def test_sql_sees_input_only_as_parameters(registry):
    client = registry.client("admin")
    nasty = "x'); DROP TABLE events; --"
    client.put_json("/events/FOO-1", {"ProgramId": "FOO", "ProgramMemberId": nasty, "EventType": nasty,
                                      "EventStartUTC": "2026-01-01T00:00:00Z"})
    page = client.get("/events", params={"ProgramMemberId": nasty, "EventType": nasty}).json
    assert [e["ProgramMemberId"] for e in page["Events"]] == [nasty]

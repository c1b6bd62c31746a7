"""Group commit. Writes from many threads share transactions, fail
alone, and are acknowledged only after the commit."""

import concurrent.futures
import sqlite3
import threading
import time

import pytest

import eventstore_errors
import eventstore_sqlite
import eventstore_writer
from helpers import Registry, event_body, eventually, open_sqlite, run_in_thread


def test_concurrent_writes_share_commits_and_all_succeed(registry):
    registry.client("writer").get("/events")  # the key's last use is recorded now, not among the PUTs
    eventually(lambda: registry.sql.execute("SELECT last_used_us FROM api_keys WHERE user_id = 'writer'")
               .fetchone()[0], "the key's last use recorded")
    commits = registry.record_commits()
    barrier = threading.Barrier(16)

    def publish(n):
        client = registry.client("writer")
        barrier.wait()
        for i in range(10):
            client.put_json(f"/events/FOO-{n}-{i}", event_body())

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), 'a thread did not finish in 30 s'
    assert registry.count_events() == 160
    assert sum(commits) == 160
    assert len(commits) < 160  # some commits carried several writes
    sequences = [row[0] for row in registry.sql.execute("SELECT seq FROM events ORDER BY seq")]
    assert sequences == list(range(1, 161))


def test_a_failing_change_fails_alone(registry):
    """One bad item (a 412) among concurrent good ones, all in one group commit."""
    writer = registry.app.writer
    registry.client("writer").put_json("/events/FOO-cond", event_body())
    gate, blocking = threading.Event(), threading.Event()
    blocker = threading.Thread(target=writer.submit, args=(lambda tx: (blocking.set(), gate.wait(10)),))
    blocker.start()
    assert blocking.wait(10)  # the writer is busy with this until the gate opens
    outcomes = {}

    def publish(event_id, headers):
        response = registry.client("writer").put_json(f"/events/{event_id}", event_body(EventType="B"),
                                                      headers=headers, expect_errors=True)
        outcomes[event_id] = response.status_int

    threads = [threading.Thread(target=publish, args=(f"FOO-ok{n}", {})) for n in range(5)]
    threads.append(threading.Thread(target=publish, args=("FOO-cond", {"If-Match": '"9"'})))
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while writer.waiting < 6:  # all six queue behind the blocker: one batch
        assert time.monotonic() < deadline, "the writes did not queue"
        time.sleep(0.01)
    commits = []
    writer.observers.append(lambda changes, seconds: commits.append(changes))
    gate.set()
    for thread in threads + [blocker]:
        thread.join(30)
        assert not thread.is_alive(), 'a thread did not finish in 30 s'
    assert commits == [1, 6]  # the blocker, then the six in one group
    assert outcomes.pop("FOO-cond") == 412
    assert set(outcomes.values()) == {200}
    assert registry.row("FOO-cond")["event_type"] == "CourseCompleted"
    assert registry.count_events() == 6


def test_an_exception_inside_a_change_rolls_back_only_that_change(tmp_path):
    writer = eventstore_writer.GroupCommitWriter(lambda: eventstore_sqlite.SQLiteStorage(tmp_path / "w.db").session(), lambda: 1)

    def good(n):
        return lambda tx: tx.conn.execute("INSERT INTO programs (program_id, name, created_us) VALUES (?, 'x', ?)", (f"P{n}", tx.now)).rowcount

    def half_then_fail(tx):
        tx.conn.execute("INSERT INTO programs (program_id, name, created_us) VALUES ('HALF', 'x', 1)")
        raise ValueError("boom")

    results = {}

    def run(name, change):
        try:
            results[name] = writer.submit(change)
        except ValueError as exc:
            results[name] = str(exc)

    threads = [threading.Thread(target=run, args=(n, good(n))) for n in range(5)]
    threads.append(threading.Thread(target=run, args=("bad", half_then_fail)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), 'a thread did not finish in 30 s'
    writer.stop()
    conn = open_sqlite(tmp_path / "w.db")
    names = {row[0] for row in conn.execute("SELECT program_id FROM programs")}
    assert names == {f"P{n}" for n in range(5)} and results["bad"] == "boom"


def test_a_failed_commit_fails_every_change_in_it(tmp_path):
    """When the COMMIT itself fails (here: the database is locked by another
    connection), no change of the batch is acknowledged and nothing is written."""
    db = tmp_path / "locked.db"
    writer = eventstore_writer.GroupCommitWriter(eventstore_sqlite.SQLiteStorage(db, busy_timeout_ms=100).session, lambda: 1)
    blocker = eventstore_sqlite.connect(db)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(Exception) as caught:
        writer.submit(lambda tx: tx.conn.execute("INSERT INTO programs (program_id, name, created_us) VALUES ('P', 'x', 1)"))
    assert getattr(caught.value, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
    blocker.execute("ROLLBACK")
    assert writer.submit(lambda tx: tx.conn.execute("SELECT COUNT(*) FROM programs").fetchone()[0]) == 0
    writer.stop()


def test_a_busy_database_is_503_with_retry_after(tmp_path):
    from helpers import Registry
    registry = Registry(tmp_path / "busy.db", busy_timeout_ms=100)
    blocker = eventstore_sqlite.connect(registry.db_path)
    blocker.execute("BEGIN IMMEDIATE")
    response = registry.client("writer").put_json("/events/FOO-1", event_body(), status=503)
    assert response.headers["Retry-After"] == "1"
    assert response.content_type == "application/problem+json"
    blocker.execute("ROLLBACK")
    registry.client("writer").put_json("/events/FOO-1", event_body(), status=200)
    registry.close()


# --- a writer that dies, and a COMMIT that fails --------------------------------------

def test_a_writer_that_cannot_connect_fails_writes_fast_with_503_and_comes_back(registry):
    """The writer thread dies (here: its connection cannot be opened). Writes
    answer 503 at once instead of waiting forever, /health says so, and the next
    write after the cause is gone starts a new writer."""
    writer = registry.app.writer
    writer.stop()  # a fresh start, so that the next write opens a new connection
    writer._stopping = False
    real_connect, attempts = writer.open_session, []

    def broken_connect():
        attempts.append(1)
        raise sqlite3.OperationalError("unable to open database file")

    writer.open_session = broken_connect
    client = registry.client("writer")
    answer = run_in_thread(lambda: client.put_json("/events/FOO-1", event_body(), expect_errors=True))
    response = answer(timeout=10)
    assert response.status_int == 503 and response.headers["Retry-After"]
    assert response.content_type == "application/problem+json"
    health = registry.anonymous.get("/health", status=503)
    assert "writer" in health.json["detail"]
    writer.open_session = real_connect
    eventually(lambda: registry.anonymous.get("/health", expect_errors=True).status_int == 200,
               "health recovers once the writer can connect")
    client.put_json("/events/FOO-1", event_body(), status=200)
    assert registry.count_events() == 1 and len(attempts) >= 1


def test_a_writer_killed_by_an_unexpected_error_fails_what_it_held_and_is_replaced(registry):
    writer = registry.app.writer
    registry.client("writer").put_json("/events/FOO-0", event_body())
    original = writer._commit

    def crash(conn, batch):
        writer._commit = original
        raise SystemExit("the writer's loop died")  # escapes every `except Exception`

    writer._commit = crash
    response = run_in_thread(lambda: registry.client("writer").put_json(
        "/events/FOO-1", event_body(), expect_errors=True))(timeout=10)
    assert response.status_int == 503
    assert registry.row("FOO-1") is None
    registry.client("writer").put_json("/events/FOO-2", event_body(), status=200)
    assert registry.row("FOO-2") is not None


def violating_change(tx):
    """A change whose COMMIT fails: on SQLite a grant for a user that does not
    exist, with the foreign key check deferred to COMMIT; on PostgreSQL a grant
    that a deferred constraint trigger (fail_at_commit) refuses at COMMIT."""
    if isinstance(tx, eventstore_sqlite.SQLiteTransaction):
        tx.conn.execute("PRAGMA defer_foreign_keys = ON")
        tx.conn.execute("INSERT INTO grants (user_id, program_id, access) VALUES ('ghost', 'FOO', 'read')")
    else:
        tx.conn.execute("INSERT INTO grants (user_id, program_id, access) VALUES ('nobody', 'BAR', 'read')")


def fail_at_commit(registry):
    """-> the exception a violating_change's COMMIT raises on this backend."""
    if registry.storage.backend == "sqlite":
        return sqlite3.IntegrityError
    import psycopg
    registry.sql.execute("CREATE FUNCTION fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$"
                        " BEGIN RAISE EXCEPTION 'refused at COMMIT'; END $$")
    registry.sql.execute("CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON grants"
                        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.user_id = 'nobody')"
                        " EXECUTE FUNCTION fail_at_commit()")
    return psycopg.errors.RaiseException


def test_a_commit_that_fails_is_never_acknowledged(registry):
    """A real failing COMMIT (a deferred foreign key violation) in the same group
    commit as a PUT: neither is acknowledged and neither is written."""
    writer = registry.app.writer
    refused = fail_at_commit(registry)
    registry.client("writer").get("/events")  # its key's last use is recorded now, not in the batch
    eventually(lambda: not writer.waiting, "the last use recorded")
    gate, blocking = threading.Event(), threading.Event()
    blocker = run_in_thread(writer.submit, lambda tx: (blocking.set(), gate.wait(10)))
    assert blocking.wait(10)
    bad = run_in_thread(writer.submit, violating_change)
    eventually(lambda: writer.waiting == 1, "the bad change queued")
    put = run_in_thread(lambda: registry.client("writer").put_json("/events/FOO-1", event_body(),
                                                                    expect_errors=True))
    eventually(lambda: writer.waiting == 2, "the PUT queued behind it")
    gate.set()
    blocker()
    with pytest.raises(refused):
        bad()
    assert put().status_int >= 500
    assert registry.row("FOO-1") is None
    assert registry.sql.execute("SELECT COUNT(*) FROM grants WHERE user_id IN ('ghost', 'nobody')").fetchone()[0] == 0
    registry.client("writer").put_json("/events/FOO-1", event_body(), status=200)


def held_writer(registry):
    """Hold the registry's writer in one transaction until the returned gate is
    set -> (gate, the held change's outcome: a callable that waits for it)."""
    for user_id in ("writer", "admin"):  # their keys' last use is recorded now, not behind the held change
        registry.client(user_id).get("/programs")
    eventually(lambda: not registry.app.writer.waiting, "the last uses recorded")
    gate, blocking = threading.Event(), threading.Event()
    outcome = run_in_thread(lambda: registry.app.write(lambda tx: (blocking.set(), gate.wait(60)),
                                                       touched=lambda result: False, seqs=0))
    assert blocking.wait(10), "the writer took the holding change"
    return gate, outcome


def test_a_write_answered_nothing_was_written_is_never_written(db):
    """Writes that waited out their time limit in the queue behind a held
    transaction get 503 "nothing was written" and are withdrawn: when the
    transaction ends, not one of them is committed."""
    registry = Registry(db, write_timeout=2, max_waiting_writes=100)
    gate, held = held_writer(registry)
    try:
        writer = registry.client("writer")
        puts = [run_in_thread(lambda n=n: writer.put_json(f"/events/FOO-q{n}", event_body(), expect_errors=True))
                for n in range(5)]
        eventually(lambda: registry.app.writer.waiting == 5, "the five writes queue behind the held one")
        answers = [put(timeout=30) for put in puts]
        assert [answer.status_int for answer in answers] == [503] * 5
        assert all("nothing was written" in answer.json["detail"] for answer in answers)
        gate.set()
        with pytest.raises(eventstore_errors.Problem, match="may or may not"):
            held()
        eventually(lambda: not registry.app.writer.stuck(), "the held transaction ends")
        writer.put_json("/events/FOO-after", event_body(), status=200)  # committed after the held one
        assert [registry.row(f"FOO-q{n}") for n in range(5)] == [None] * 5
    finally:
        gate.set()
        registry.close()


def test_writes_waiting_on_a_held_transaction_leave_threads_to_reads_and_health(db):
    """A host with 8 threads and a transaction held (a long proof, a stalled
    disk): 12 writes arrive. Once the transaction has run past a second, only
    max_waiting_writes of them keep waiting; the others are answered 503 at once
    ("nothing was written"), so /health and GETs find a thread while the
    transaction is still held (before, every thread waited write_timeout)."""
    registry = Registry(db, write_timeout=60, max_waiting_writes=2)
    host = concurrent.futures.ThreadPoolExecutor(max_workers=8)  # the host's threads
    gate, held = held_writer(registry)
    try:
        writer = registry.client("writer")
        puts = [host.submit(writer.put_json, f"/events/FOO-w{n}", event_body(), expect_errors=True)
                for n in range(12)]
        health = host.submit(registry.anonymous.get, "/health")
        read = host.submit(writer.get, "/events?ProgramId=FOO")
        eventually(lambda: sum(put.done() for put in puts) == 10, "all but two writes answered at once")
        eventually(lambda: health.done() and read.done(), "/health and a read answered while the writer is held")
        assert health.result().status_int == 200 and read.result().status_int == 200
        refused = [put.result() for put in puts if put.done()]
        assert len(refused) == 10 and {answer.status_int for answer in refused} == {503}
        assert all("nothing was written" in answer.json["detail"] for answer in refused)
        gate.set()
        held()
        written = sorted(put.result(timeout=30).status_int for put in puts)
        assert written == [200, 200] + [503] * 10
    finally:
        gate.set()
        host.shutdown(wait=False, cancel_futures=True)
        registry.close()

"""What only PostgreSQL has to show: several servers on one database keeping
the sync guarantee, a server killed under load losing nothing acknowledged,
long polls woken by another server's commits, migration from SQLite and back,
the durability check, and the one line a missing driver gets. (The rest of the
contract runs on PostgreSQL through the ``backend`` parameter of every test.)"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import eventstore
import eventstore_errors
import eventstore_storage
import eventstore_writer
from helpers import eventually, line_within, postgres_url
from server import ROOT, PutLoad, Server, assert_seen_every_change_once_in_order, missing_from, publish_while_following, event


@pytest.fixture
def url(pg_cluster):
    url = postgres_url(pg_cluster)
    yield url
    pg_cluster.release(url)



@pytest.fixture
def pair(url):
    """Two separate serve.py on one PostgreSQL database, as behind a load balancer."""
    first = Server(url)
    second = Server(url)
    first.register("FOO")
    yield first, second
    first.stop()
    second.stop()


def test_two_servers_keep_the_sync_guarantee_for_a_follower_on_each(pair):
    first, second = pair
    assert second.admin_key is None  # the first admin was created once, by the first server
    acknowledged, seens = publish_while_following([first, second], first, first.admin_key, workers=8, puts=40,
                                                  ids=10, followers=[second])
    for seen in seens:
        assert_seen_every_change_once_in_order(seen, acknowledged)


def test_a_server_killed_under_load_loses_nothing_acknowledged(pair):
    first, second = pair
    doomed = PutLoad(first, first.admin_key, "a", workers=4, ids=20)
    steady = PutLoad(second, first.admin_key, "b", workers=4, ids=20)
    eventually(lambda: len(doomed.acknowledged) >= 20 and len(steady.acknowledged) >= 20, "publishing under way",
               timeout=30)
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait(10)
    time.sleep(0.5)  # the other server goes on
    acknowledged = {**doomed.stop(), **steady.stop()}
    assert missing_from(first.db_path, acknowledged) == {}
    assert len(steady.acknowledged) >= 20
    follower = second.request("GET", "/events?limit=1000", user="admin", key=first.admin_key)[2]
    served = {e["EventId"]: e["Revision"] for e in follower["Events"]}
    assert all(served.get(event_id, 0) >= revision for event_id, revision in acknowledged.items())


def test_a_long_poll_wakes_on_a_commit_made_by_another_server_or_the_command_line(pair, tmp_path):
    first, second = pair
    key = first.admin_key
    for poller, publisher, n in ((first, second, 1), (second, first, 2), (second, "cli", 3)):
        after = poller.request("GET", "/events?limit=1000", user="admin", key=key)[2]["Next"].split("after=")[1]
        result = {}

        def consume():
            started = time.monotonic()
            result["page"] = poller.request("GET", f"/events?wait=20&after={after}", user="admin", key=key)[2]
            result["elapsed"] = time.monotonic() - started

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        eventually(lambda: poller.request("GET", "/health")[2]["longPolls"] == 1, "the poll waits")
        if publisher == "cli":
            line = tmp_path / "one.jsonl"
            line.write_text(json.dumps({"EventId": f"FOO-{n}", **event(n)}) + "\n")
            subprocess.run([sys.executable, str(ROOT / "eventstore.py"), "--db", first.db_path, "import", str(line)],
                           check=True, capture_output=True, timeout=30)
        else:
            assert publisher.request("PUT", f"/events/FOO-{n}", event(n), user="admin", key=key)[0] == 200
        consumer.join(25)
        assert not consumer.is_alive()
        assert [e["EventId"] for e in result["page"]["Events"]] == [f"FOO-{n}"]
        assert result["elapsed"] < 10  # woken, not timed out (speed is make bench's job)


def test_a_commit_elsewhere_wakes_a_long_poll_through_its_notification(url):
    """With the periodic re-check a minute apart, only the NOTIFY sent with the
    other session's commit can wake the poll within its 20 s."""
    from helpers import Registry, opened, run_in_thread
    registry = Registry(url, poll_interval=60)
    try:
        admin = registry.client("admin")
        answer = run_in_thread(lambda: admin.get("/events?wait=20").json)
        eventually(lambda: registry.app.long_polls == 1 and registry.app.news._watcher is not None, "the poll waits")
        time.sleep(0.3)  # the watcher is listening
        with opened(url) as other, other.transaction(eventstore.now_us(), seqs=1) as tx:
            eventstore.put_event(tx, eventstore.validate_event("FOO-x", event()))
        assert [e["EventId"] for e in answer(timeout=30)["Events"]] == ["FOO-x"]
    finally:
        registry.close()


def test_an_open_transaction_holds_the_feed_back_until_it_ends(url):
    """The cost of the barrier, as the README says: a change committed after
    another transaction began is not served until that transaction ends; then
    it is, and /health reports how long the feed was held back."""
    import psycopg
    import webtest
    from helpers import Registry
    registry = Registry(url)
    try:
        admin = registry.client("admin")
        admin.put_json("/events/FOO-1", event(1))
        idle = psycopg.connect(url)
        idle.execute("SELECT pg_current_xact_id()")  # an open transaction with an xid
        time.sleep(0.2)
        admin.put_json("/events/FOO-2", event(2))
        assert [e["EventId"] for e in admin.get("/events").json["Events"]] == ["FOO-1"]
        assert admin.get("/events/FOO-2").json["EventId"] == "FOO-2"  # a read by id is not held back
        assert webtest.TestApp(registry.app).get("/health").json["feedHeldBackSeconds"] >= 0.2
        idle.rollback()
        idle.close()
        assert [e["EventId"] for e in admin.get("/events").json["Events"]] == ["FOO-1", "FOO-2"]
    finally:
        registry.close()


def test_a_cursor_between_the_head_and_the_largest_committed_sequence_is_valid(url):
    """While an open transaction holds the feed back, the head (the largest
    Sequence the feed may serve) lags the largest committed one, and dips when
    the row at the head moves to a Sequence held back. No cursor the registry
    handed out is refused: one between the head and the largest committed
    Sequence is an empty page whose Next keeps it; only one past that limit is
    the 400, and it names the head served."""
    import psycopg
    from helpers import Registry
    registry = Registry(url)
    try:
        admin = registry.client("admin")
        admin.put_json("/events/FOO-1", event(1))
        first = admin.get("/events").json
        handed_out = int(first["Next"].split("after=")[1])
        assert handed_out == first["Events"][0]["Sequence"]
        idle = psycopg.connect(url)
        idle.execute("SELECT pg_current_xact_id()")  # an open transaction with an xid: the feed is held back
        try:
            admin.put_json("/events/FOO-1", event(2))  # the row at the head moves up, out of sight
            admin.put_json("/events/FOO-2", event(3))
            committed = admin.get("/events/FOO-2").json["Sequence"]
            assert admin.get("/events?after=now").json["Next"] == "/events?after=0"  # the head dipped
            for cursor in (handed_out, committed):
                page = admin.get(f"/events?after={cursor}&limit=5").json
                assert page == {"Events": [], "Next": f"/events?limit=5&after={cursor}", "HasMore": False}
            problem = admin.get(f"/events?after={committed + 1}", status=400).json
            assert problem["Head"] == 0
        finally:
            idle.rollback()
            idle.close()
        page = admin.get(f"/events?after={handed_out}").json
        assert [(e["EventId"], e["Revision"]) for e in page["Events"]] == [("FOO-1", 2), ("FOO-2", 1)]
        assert page["Next"] == f"/events?after={committed}"
        assert admin.get("/events?after=now").json["Next"] == f"/events?after={committed}"
    finally:
        registry.close()


def test_a_transaction_that_took_smaller_sequences_holds_back_a_later_one_that_committed_first(url):
    """The ordering itself, step by step: A takes its Sequences, B takes larger
    ones, writes and commits, then A writes. While A is open the feed must not
    serve B's change (a follower would move past A's smaller Sequence); once A
    commits, both come, A's first. This holds only because A's xid was assigned
    with its Sequences, under the lock, before B's."""
    from helpers import Registry, opened
    registry = Registry(url)
    reads = registry.storage.reads()
    try:
        with opened(url) as a, opened(url) as b:
            # A first Sequence, taken and not used: nextval WAL-logs (and so gives its
            # transaction an xid) only every 32 values, and the test must not depend
            # on that side effect: only on eventstore_take_sequences giving the xid.
            with b.transaction(eventstore.now_us(), seqs=1):
                pass
            with a.transaction(eventstore.now_us(), seqs=1) as tx_a:
                with b.transaction(eventstore.now_us(), seqs=1) as tx_b:
                    eventstore.put_event(tx_b, eventstore.validate_event("FOO-b", event(2)))
                eventstore.put_event(tx_a, eventstore.validate_event("FOO-a", event(1)))
                assert reads.read_feed(None, eventstore_storage.FeedQuery()) == []
            rows = reads.read_feed(None, eventstore_storage.FeedQuery())
        assert [row[1] for row in rows] == ["FOO-a", "FOO-b"] and rows[0][0] < rows[1][0]
    finally:
        registry.close()


def test_sequences_follow_commit_order_across_concurrent_writers(url):
    """Many sessions writing at once (as many servers would): a follower reading
    all the while sees Sequences only increase, and in the end every change."""
    from helpers import Registry
    registry = Registry(url)
    storages = [eventstore.open_storage(url) for _ in range(4)]
    stop, seen, errors = threading.Event(), [], []

    def write(storage, w):
        session = storage.session()
        try:
            for n in range(60):
                with session.transaction(eventstore.now_us(), seqs=3) as tx:
                    for k in range(3):
                        eventstore.put_event(tx, eventstore.validate_event(f"FOO-s{w}-{(n + k) % 7}", event(n)))
                    time.sleep(0.001 * (n % 3))  # commit at different moments than the Sequences were taken
        except Exception as exc:
            errors.append(exc)
        finally:
            session.close()

    def follow():
        after = 0
        reads = registry.storage.reads()
        while True:
            done = stop.is_set()
            rows = reads.read_feed(None, eventstore_storage.FeedQuery(after=after, limit=50))
            seen.extend((row[0], row[1], row[5]) for row in rows)
            if rows:
                after = rows[-1][0]
            elif done:
                return

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    writers = [threading.Thread(target=write, args=(storage, w), daemon=True) for w, storage in enumerate(storages)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join(60)
        assert not thread.is_alive()
    stop.set()
    follower.join(30)
    assert not follower.is_alive() and errors == []
    for storage in storages:
        storage.close()
    final = dict(registry.sql.execute("SELECT event_id, revision FROM events").fetchall())
    registry.close()
    sequences = [s for s, _, _ in seen]
    assert sequences == sorted(set(sequences))
    last = {}
    for _, event_id, revision in seen:
        last[event_id] = revision
    assert last == final and len(final) == 4 * 7


def cli(db, *argv):
    result = subprocess.run([sys.executable, str(ROOT / "eventstore.py"), "--db", str(db), *argv],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_export_from_sqlite_import_into_postgresql_and_back(tmp_path, url):
    from helpers import Registry
    source = Registry(tmp_path / "source.db")
    try:
        writer = source.client("writer")
        for n in range(30):
            writer.put_json(f"/events/FOO-{n}", event(n, member=f"m{n % 4}\u0000é"))
        writer.put_json("/events/FOO-3", event(333))
        writer.delete("/events/FOO-4")
        writer.delete(f"/programs/FOO/members/{'m1%00%C3%A9'}")
        exported = cli(source.db_path, "export")
    finally:
        source.close()
    dump = tmp_path / "dump.jsonl"
    dump.write_text(exported)
    target = Registry(url)
    target.close()
    cli(url, "import", str(dump))

    def content(text):
        """Each event's content and whether it is a tombstone (what an import keeps)."""
        kept = {}
        for line in text.splitlines():
            event = json.loads(line)
            kept[event["EventId"]] = {k: v for k, v in event.items()
                                      if k not in ("Revision", "Sequence", "CreatedUTC", "UpdatedUTC")}
        return kept

    again = cli(url, "export")
    assert content(again) == content(exported) and len(content(again)) == 30
    assert sum(1 for e in content(again).values() if e["Deleted"]) == 1 + 8  # FOO-4, and m1 erased
    # And back: PostgreSQL's export into a new SQLite file.
    (tmp_path / "again.jsonl").write_text(again)
    Registry(tmp_path / "back.db").close()
    cli(tmp_path / "back.db", "import", str(tmp_path / "again.jsonl"))
    assert content(cli(tmp_path / "back.db", "export")) == content(exported)


def test_startup_says_whether_a_200_is_durable(url):
    server = Server(url)
    try:
        # The test cluster runs with fsync=off (tests only), and the server says so.
        assert "fsync=off" in server.banner and "WARNING: a 200 is not durable" in server.banner
        assert server.request("GET", "/health")[2]["backend"] == "postgresql"
    finally:
        server.stop()


def test_without_psycopg_one_line_says_what_to_install(url):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['psycopg'] = None; import eventstore_admin;"
                               f" sys.exit(eventstore_admin.main(['--db', {url!r}, 'program', 'list']))"],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "requirements-postgres.txt" in result.stderr, result.stderr


def test_statements_deallocated_behind_its_back_are_prepared_again(url):
    """PUT's upsert runs as a statement prepared through libpq; psycopg
    deallocates every prepared statement of a connection when it rolls back a
    transaction of its own (so may a pooler). A write may not fail for that."""
    from helpers import Registry
    registry = Registry(url)
    try:
        admin = registry.client("admin")
        admin.put_json("/events/FOO-1", event(1))
        registry.app.write(lambda tx: tx.conn.execute("DEALLOCATE ALL"), touched=lambda _: False, seqs=0)
        admin.put_json("/events/FOO-1", event(2), status=200)
        assert admin.get("/events/FOO-1").json["EventData"] == {"n": 2}
    finally:
        registry.close()


def test_a_transaction_whose_statement_failed_is_not_reported_committed(url):
    """COMMIT after a failed statement is a ROLLBACK: the writer must say the
    change failed, not answer 200 for what was not written."""
    from helpers import Registry

    def swallow_a_failure(tx):
        tx.put_program("NEW", "New")
        try:
            tx.conn.execute("SELECT 1 / 0")
        except eventstore_pg().psycopg.errors.DivisionByZero:
            pass
    registry = Registry(url)
    try:
        with pytest.raises(Exception, match="rolled back"):
            registry.app.write(swallow_a_failure, touched=lambda _: False, seqs=1)
        assert registry.storage.reads().find_program("NEW") is None
    finally:
        registry.close()


def eventstore_pg():
    import eventstore_pg
    return eventstore_pg


def test_a_program_registered_earlier_in_the_same_transaction_takes_events(url):
    """A write transaction reads the programs at BEGIN; one it registers itself
    must then be seen, as on SQLite (a batch can hold both changes)."""
    from helpers import opened
    with opened(url) as session, session.transaction(eventstore.now_us(), seqs=2) as tx:
        assert tx._programs == {}  # read at BEGIN (none yet)
        tx.put_program("NEW", "New")
        assert eventstore.put_event(tx, eventstore.validate_event("NEW-1", {**event(), "ProgramId": "NEW"}))[0] == \
            "created"
        with pytest.raises(eventstore_errors.Problem, match="not registered"):
            eventstore.put_event(tx, eventstore.validate_event("NOPE-1", {**event(), "ProgramId": "NOPE"}))


def test_with_more_programs_than_read_at_begin_each_is_looked_up(url):
    """Past PROGRAMS_READ_AT_BEGIN programs a transaction looks each one up: the
    rules still hold (a registered program takes events, an unknown one is a 404,
    a strict one refuses an unregistered type)."""
    from helpers import opened
    count = eventstore_pg().PROGRAMS_READ_AT_BEGIN + 1
    with opened(url) as session:
        with session.transaction(eventstore.now_us()) as tx:
            tx.conn.execute("INSERT INTO programs (program_id, name, created_us, registered_types_only)"
                            " SELECT 'P' || n, 'Program ' || n, 0, n = 1 FROM generate_series(1, %s) AS n", (count,))
        with session.transaction(eventstore.now_us(), seqs=3) as tx:
            assert tx._programs is None  # the branch under test
            assert eventstore.put_event(tx, eventstore.validate_event("P2-1", {**event(), "ProgramId": "P2"}))[0] == \
                "created"
            with pytest.raises(eventstore_errors.Problem, match="not registered"):
                eventstore.put_event(tx, eventstore.validate_event("NOPE-1", {**event(), "ProgramId": "NOPE"}))
            with pytest.raises(eventstore_errors.Problem) as refused:
                eventstore.put_event(tx, eventstore.validate_event("P1-1", {**event(), "ProgramId": "P1"}))
            assert "takes registered types only" in str(refused.value.errors)


def _event(event_id, n=0):
    return eventstore.validate_event(event_id, event(n))


def test_a_transactions_upserts_reach_postgresql_together_and_each_gets_its_own_answer(url, tmp_path):
    """PUT's upserts go in libpq's pipeline mode: a group's statements are all
    sent before the first answer comes back (libpq's own trace of the protocol
    shows it), and each still gets its own outcome."""
    from psycopg import pq
    from helpers import opened
    with opened(url) as session:
        with session.transaction(eventstore.now_us(), seqs=2) as tx:
            tx.put_program("FOO", "Foo")
            eventstore.put_event(tx, _event("FOO-old"))
            eventstore.put_event(tx, _event("FOO-same"))
        trace = tmp_path / "libpq.trace"
        with open(trace, "w") as file:
            pgconn = session.conn.pgconn
            pgconn.trace(file.fileno())
            pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
            with session.transaction(eventstore.now_us(), seqs=4) as tx:
                later = [eventstore.put_event_later(tx, _event(event_id, n))
                         for event_id, n in (("FOO-new1", 1), ("FOO-old", 5), ("FOO-same", 0), ("FOO-new2", 2))]
                outcomes = [outcome.get() for outcome in later]
            pgconn.untrace()
    assert outcomes == [("created", 1), ("updated", 2), ("unchanged", 1), ("created", 1)]
    messages = [line.split("\t")[:3:2] for line in trace.read_text().splitlines()]  # [direction, message type]
    first_upsert = messages.index(["F", "Execute"])  # after BEGIN, the Sequences and the type's state
    begun = max(index for index, message in enumerate(messages[:first_upsert]) if message == ["B", "ReadyForQuery"])
    upserts = messages[begun + 1:messages.index(["B", "ReadyForQuery"], begun + 1) + 1]
    assert upserts.count(["F", "Execute"]) == 4
    first_answer = next(index for index, (direction, _) in enumerate(upserts) if direction == "B")
    assert all(direction == "B" for direction, _ in upserts[first_answer:]), upserts


def test_more_upserts_than_one_pipeline_holds_are_each_answered_in_order(url):
    from helpers import opened
    count = 2 * eventstore_pg().PostgresTransaction.PIPELINE_MAX + 7
    with opened(url) as session:
        with session.transaction(eventstore.now_us(), seqs=count + 1) as tx:
            tx.put_program("FOO", "Foo")
            later = [eventstore.put_event_later(tx, _event(f"FOO-{n}", n)) for n in range(count)]
            later.append(eventstore.put_event_later(tx, _event("FOO-3", 3)))  # a replay
            outcomes = [outcome.get() for outcome in later]
        rows = session.conn.execute("SELECT event_id FROM events ORDER BY seq").fetchall()
    assert outcomes == [("created", 1)] * count + [("unchanged", 1)]
    assert [row[0] for row in rows] == [f"FOO-{n}" for n in range(count)]


def test_an_upsert_held_by_a_row_lock_leaves_the_other_threads_running(url):
    """libpq's get_result() waits holding the GIL: an upsert that waits for a
    row lock (another server's transaction) must wait outside it, or every
    thread of the process stops (reads, health checks, the very commit that
    would release the lock). In a process of its own, whose main thread must
    still say it is alive while the write waits."""
    import psycopg
    from helpers import opened
    with opened(url) as session, session.transaction(eventstore.now_us(), seqs=1) as tx:
        tx.put_program("FOO", "Foo")
        eventstore.put_event(tx, _event("FOO-1"))
    holder = psycopg.connect(url)
    holder.execute("SELECT 1 FROM events WHERE event_id = 'FOO-1' FOR UPDATE")  # held until rollback
    script = (f"import sys, threading, time; sys.path.insert(0, {str(ROOT)!r}); import eventstore\n"
              f"session = eventstore.open_storage({url!r}).session()\n"
              "def put():\n"
              "    with session.transaction(eventstore.now_us(), seqs=1) as tx:\n"
              f"        print(eventstore.put_event(tx, eventstore.validate_event('FOO-1', {event(1)!r}))[0], flush=True)\n"
              "writer = threading.Thread(target=put); writer.start(); time.sleep(1)\n"
              "print('alive', flush=True); writer.join()\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert line_within(process.stdout, 20) == "alive\n"  # while the upsert waits for the lock
        holder.rollback()
        assert line_within(process.stdout, 20) == "updated\n"
        assert process.wait(20) == 0
    finally:
        process.kill()
        holder.close()


def test_an_upsert_that_fails_in_a_group_fails_alone_and_the_connection_goes_on(url):
    """A statement that fails inside the pipeline aborts the ones after it and
    the transaction: the writer runs each change again on its own, so only the
    failing one fails; a change that fails after sending its upsert rolls back
    with it. The writer's connection takes the next writes either way."""
    import psycopg
    from helpers import opened
    with opened(url) as session, session.transaction(eventstore.now_us()) as tx:
        tx.put_program("FOO", "Foo")
        tx.conn.execute("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                        " IF NEW.event_id = 'FOO-bad' THEN RAISE EXCEPTION 'refused here'; END IF; RETURN NEW;"
                        " END $$")
        tx.conn.execute("CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON events FOR EACH ROW EXECUTE FUNCTION refuse()")
    storage = eventstore.open_storage(url)
    writer = eventstore_writer.GroupCommitWriter(storage.session, eventstore.now_us)
    try:
        gate, blocking = threading.Event(), threading.Event()
        blocker = threading.Thread(target=writer.submit, args=(lambda tx: (blocking.set(), gate.wait(10)),))
        blocker.start()
        assert blocking.wait(10)
        outcomes = {}

        def put(event_id):
            try:
                outcomes[event_id] = writer.submit(lambda tx: eventstore.put_event_later(tx, _event(event_id)))
            except psycopg.Error as exc:
                outcomes[event_id] = type(exc).__name__

        threads = [threading.Thread(target=put, args=(event_id,)) for event_id in ("FOO-ok1", "FOO-bad", "FOO-ok2")]
        for thread in threads:
            thread.start()
        eventually(lambda: writer.waiting == 3, "the three writes queue behind the blocker")
        batches = []
        transaction = writer._transaction
        writer._transaction = lambda session, batch: (batches.append(len(batch)), transaction(session, batch))[1]
        gate.set()
        for thread in threads + [blocker]:
            thread.join(30)
            assert not thread.is_alive(), "a write did not finish in 30 s"
        assert batches == [3, 1, 1, 1]  # together, then each alone
        assert outcomes == {"FOO-ok1": ("created", 1), "FOO-ok2": ("created", 1), "FOO-bad": "RaiseException"}

        def upsert_then_fail(tx):
            eventstore.put_event_later(tx, _event("FOO-half"))
            raise ValueError("boom")
        with pytest.raises(ValueError, match="boom"):
            writer.submit(upsert_then_fail)
        assert writer.submit(lambda tx: eventstore.put_event_later(tx, _event("FOO-after"))) == ("created", 1)
        with opened(url) as session:
            stored = {row[0] for row in session.conn.execute("SELECT event_id FROM events").fetchall()}
        assert stored == {"FOO-ok1", "FOO-ok2", "FOO-after"}
    finally:
        writer.stop()
        storage.close()


def _reads_backend_pid(conn, name):
    """The pid of the PostgreSQL backend serving the GET pipeline of database ``name``'s servers."""
    row = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'eventstore reads'"
                       " AND datname = %s", (name,)).fetchone()
    return row and row[0]


def test_concurrent_gets_each_get_their_own_event(url):
    """GETs of many threads go to PostgreSQL together (ReadPipeline): each
    thread must get its own event, or a 404 for one that does not exist."""
    from helpers import Registry, run_in_thread
    registry = Registry(url)
    try:
        admin = registry.client("admin")
        for n in range(40):
            admin.put_json(f"/events/FOO-{n}", event(n))

        def get_many(thread):
            seen = []
            for i in range(60):
                n = (thread * 7 + i) % 50  # 40-49 do not exist
                response = admin.get(f"/events/FOO-{n}", status=(200, 404))
                seen.append((n, response.status_int, response.json.get("EventData")))
            return seen
        waits = [run_in_thread(get_many, thread) for thread in range(16)]
        for wait in waits:
            for n, status, data in wait(timeout=60):
                assert (status, data) == ((200, {"n": n}) if n < 40 else (404, None)), n
    finally:
        registry.close()


def test_gets_survive_a_lost_connection_a_hung_one_and_an_unreachable_database(url):
    """The GET pipeline's connection terminated: the next GET is read again on a
    new one. Its backend stopped (SIGSTOP, as a network that drops everything):
    the pipeline gives that connection up after the storage's timeout and the
    GET is answered on a new one. The database refusing connections: a 503
    problem, and GETs answer again once it takes them."""
    import psycopg
    from helpers import Registry
    registry = Registry(url, busy_timeout_ms=1000)
    server, name = url.rsplit("/", 1)
    try:
        admin = registry.client("admin")
        admin.put_json("/events/FOO-1", event(1))
        assert admin.get("/events/FOO-1").json["EventData"] == {"n": 1}
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            first = _reads_backend_pid(conn, name)
            assert conn.execute("SELECT pg_terminate_backend(%s)", (first,)).fetchone()[0]
            assert admin.get("/events/FOO-1").json["EventData"] == {"n": 1}
            second = _reads_backend_pid(conn, name)
            assert second not in (None, first)
            os.kill(second, signal.SIGSTOP)
            try:
                started = time.monotonic()
                assert admin.get("/events/FOO-1").json["EventData"] == {"n": 1}
                assert 1 <= time.monotonic() - started < 10
            finally:
                os.kill(second, signal.SIGCONT)
            conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            try:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE application_name = 'eventstore reads' AND datname = %s", (name,))
                problem = admin.get("/events/FOO-1", status=503)
                assert problem.content_type == "application/problem+json" and "Traceback" not in problem.text
            finally:
                conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        assert admin.get("/events/FOO-1").json["EventData"] == {"n": 1}
    finally:
        registry.close()


def test_closing_the_storage_closes_every_connection_it_opened(url):
    """Its GET pipeline stops, and the pool connections threads still hold
    (the pool itself closes only those it has) are closed too."""
    import psycopg
    from helpers import run_in_thread
    storage = eventstore.open_storage(url)
    assert storage.reads().read_event("FOO-1") is None
    assert storage.reads().find_program("FOO") is None  # this thread now holds a connection
    holding, hold = threading.Event(), threading.Event()
    holder = run_in_thread(lambda: (storage.reads().find_program("FOO"), holding.set(), hold.wait(30)))
    assert holding.wait(30), "that thread holds a connection too"  # before close: it would take one after
    pipeline_thread = storage.reads().pipeline._thread
    assert pipeline_thread.is_alive()
    server, name = url.rsplit("/", 1)
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        def sessions():
            return conn.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s", (name,)).fetchone()[0]
        eventually(lambda: sessions() >= 3, "the pipeline's and two held connections are open")
        storage.close()
        assert not pipeline_thread.is_alive()
        eventually(lambda: sessions() == 0, "every connection of the storage is closed")
    hold.set()
    holder(timeout=30)


def test_event_ids_reach_postgresql_as_the_same_text(url):
    """The pipeline's text[] literal keeps quotes, backslashes, commas, braces,
    spaces, "NULL" and the empty string as they are."""
    import psycopg
    values = ['a"b', "c\\d", "e,f", "{g}", "h i", "NULL", "", "é"]
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT %s::text[]", (eventstore_pg()._text_array(values).decode(),)).fetchone()[0] \
            == values


def test_the_pipelines_statement_is_planned_once_not_at_every_read(url):
    """On the pipeline's connection, ``event_id = ANY($1)`` gets PostgreSQL's
    generic plan (an index scan whatever the array) instead of a plan made anew
    for every execution, PostgreSQL's own choice for it, which cost twice the lookup."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as filler:  # a table the size of a real one, analyzed
        filler.execute("INSERT INTO programs (program_id, name, created_us) VALUES ('FOO', 'Foo', 0)")
        filler.execute("INSERT INTO events (seq, xid, event_id, program_id, event_type, doc, revision, created_us,"
                       " updated_us) SELECT n, pg_current_xact_id(), 'FOO-' || n, 'FOO', 'T', '{}', 1, 0, 0"
                       " FROM generate_series(1, 5000) AS n")
        filler.execute("ANALYZE events")
    storage = eventstore.open_storage(url)
    try:
        conn = storage.connect_read_only()
        pipeline = eventstore_pg().ReadPipeline
        conn.pgconn.prepare(pipeline.STATEMENT, pipeline.SQL)
        for n in range(12):  # PostgreSQL weighs the generic plan after 5 custom ones
            conn.pgconn.exec_prepared(pipeline.STATEMENT, [eventstore_pg()._text_array([f"FOO-{n}", "FOO-x"])])
        plans = conn.execute("SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = %s",
                             (pipeline.STATEMENT.decode(),)).fetchone()
        assert plans == (12, 0)
        plan = "\n".join(row[0] for row in conn.execute(
            f"EXPLAIN EXECUTE {pipeline.STATEMENT.decode()}('{{FOO-1}}')"))
        assert "Index" in plan and "Seq Scan" not in plan, plan
        conn.close()
    finally:
        storage.close()


@pytest.mark.parametrize("required", [False, True])
def test_without_postgresql_the_summary_says_so_or_ci_fails(tmp_path, required):
    """Where PostgreSQL's binaries are missing, its half of the suite skips with a
    plain reason in pytest's summary; with EVENTSTORE_REQUIRE_POSTGRES (.ci/run)
    it fails instead."""
    env = {**os.environ, "EVENTSTORE_PG_BIN": str(tmp_path / "nowhere")}
    env.pop("EVENTSTORE_REQUIRE_POSTGRES", None)
    if required:
        env["EVENTSTORE_REQUIRE_POSTGRES"] = "1"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                             "tests/test_programs.py", "-k", "health_needs_no_credentials"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    if required:
        assert result.returncode == 1 and re.search(r"1 passed, \d+ deselected, 1 error", result.stdout), result.stdout
    else:
        assert result.returncode == 0 and re.search(r"1 passed, 1 skipped, \d+ deselected", result.stdout), result.stdout
    assert "PostgreSQL server binaries not found" in result.stdout


# --- The writer after a failure (outside checks of 2026-12-02) --------------------

def _writer_pid(registry):
    """The backend of the app's writer, asked through the writer itself."""
    return registry.app.write(lambda tx: tx.conn.info.backend_pid, touched=lambda result: False, seqs=0)


def test_a_cancelled_begin_rolls_back_and_the_next_write_commits(url):
    """The writer's first statement (BEGIN and the Sequences) cancelled while it
    waits: that write gets a 503, and the connection is not left in an aborted
    transaction: /health and the next writes succeed (they got 500 for good)."""
    import psycopg
    import webtest
    from helpers import Registry, run_in_thread
    registry = Registry(url)
    try:
        admin, anonymous = registry.client("admin"), webtest.TestApp(registry.app)
        admin.put_json("/events/FOO-1", event(1))
        pid = _writer_pid(registry)
        with psycopg.connect(url, autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(7310582)")  # what eventstore_take_sequences waits for
            answer = run_in_thread(lambda: admin.put_json("/events/FOO-2", event(2), status="*"))
            eventually(lambda: other.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                                             (pid,)).fetchone()[0] == "Lock", "the writer waits in BEGIN")
            assert other.execute("SELECT pg_cancel_backend(%s)", (pid,)).fetchone()[0]
            cancelled = answer()
            assert cancelled.status_int == 503 and cancelled.content_type == "application/problem+json"
            other.execute("SELECT pg_advisory_unlock(7310582)")
        assert anonymous.get("/health").status_int == 200
        assert admin.put_json("/events/FOO-2", event(2)).headers["ETag"] == '"1"'
        assert admin.put_json("/events/FOO-3", event(3)).headers["ETag"] == '"1"'
        assert [e["EventId"] for e in admin.get("/events").json["Events"]] == ["FOO-1", "FOO-2", "FOO-3"]
    finally:
        registry.close()


def test_a_write_waits_a_bounded_time_and_reads_and_health_go_on(url):
    """The writer held in one transaction (here by a lock it waits for): a PUT
    waits write_timeout, then 503 with Retry-After; further writes are refused at
    once (they must not take every request thread), /health says 503, GETs are
    served; once the writer is free, writes commit again."""
    import psycopg
    import webtest
    from helpers import Registry, run_in_thread
    registry = Registry(url, write_timeout=1)
    try:
        admin, anonymous = registry.client("admin"), webtest.TestApp(registry.app)
        admin.put_json("/events/FOO-1", event(1))
        with psycopg.connect(url, autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(7310582)")
            try:
                held = admin.put_json("/events/FOO-2", event(2), status=503)  # waited write_timeout
                assert held.headers["Retry-After"] and "may or may not" in held.json["detail"]
                refused = admin.put_json("/events/FOO-3", event(3), status=503)  # refused at once: stuck
                assert "nothing was written" in refused.json["detail"]
                assert refused.headers["Retry-After"] == "5"
                assert "in one transaction" in anonymous.get("/health", status=503).json["detail"]
                assert admin.get("/events/FOO-1").json["EventData"] == {"n": 1}
                assert [e["EventId"] for e in admin.get("/events").json["Events"]] == ["FOO-1"]
                queued = run_in_thread(lambda: registry.app.writer.stuck())
                assert queued() > 1
            finally:
                other.execute("SELECT pg_advisory_unlock(7310582)")
        eventually(lambda: not registry.app.writer.stuck(), "the held transaction ends")
        assert admin.put_json("/events/FOO-3", event(3)).headers["ETag"] == '"1"'
        assert anonymous.get("/health").status_int == 200
        # The write that got "may or may not" did commit once the lock was free: its outcome was unknown.
        assert admin.get("/events/FOO-2").json["Revision"] == 1
    finally:
        registry.close()


def test_a_lost_writer_connection_is_503_while_it_lasts_and_nothing_lingers(url):
    """The writer's backend terminated while the database refuses connections:
    writes get 503 (not 500), /health says the writer cannot write; once the
    database takes connections again, /health and writes succeed at once."""
    import psycopg
    import webtest
    from helpers import Registry
    registry = Registry(url, busy_timeout_ms=1000)
    server, name = url.rsplit("/", 1)
    try:
        admin, anonymous = registry.client("admin"), webtest.TestApp(registry.app)
        admin.put_json("/events/FOO-1", event(1))
        pid = _writer_pid(registry)
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            try:
                assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
                for n in (2, 3):
                    problem = admin.put_json(f"/events/FOO-{n}", event(n), status=503)
                    assert problem.content_type == "application/problem+json"
                assert "cannot take writes" in anonymous.get("/health", status=503).json["detail"]
            finally:
                conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        assert anonymous.get("/health").status_int == 200
        assert admin.put_json("/events/FOO-2", event(2)).headers["ETag"] == '"1"'
    finally:
        registry.close()


def test_long_polls_waiting_when_the_watchers_connection_drops_still_wake_on_other_commits(url):
    """The commit watcher's connection terminated while a long poll waits: it
    connects and LISTENs again, and the poll wakes on another session's commit
    (with the re-check a minute apart, only that can wake it in time)."""
    import psycopg
    from helpers import Registry, opened, run_in_thread
    registry = Registry(url, poll_interval=60)
    try:
        admin = registry.client("admin")
        answer = run_in_thread(lambda: admin.get("/events?wait=20").json)
        eventually(lambda: registry.app.long_polls == 1 and registry.app.news._watcher is not None, "the poll waits")
        with psycopg.connect(url, autocommit=True) as conn:
            def watchers():
                return [pid for pid, in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'eventstore watcher'")]
            eventually(lambda: len(watchers()) == 1, "the watcher listens")
            first = watchers()[0]
            assert conn.execute("SELECT pg_terminate_backend(%s)", (first,)).fetchone()[0]
            eventually(lambda: watchers() not in ([], [first]), "the watcher listens again")
        time.sleep(0.3)
        started = time.monotonic()
        with opened(url) as other, other.transaction(eventstore.now_us(), seqs=1) as tx:
            eventstore.put_event(tx, eventstore.validate_event("FOO-x", event()))
        assert [e["EventId"] for e in answer(timeout=30)["Events"]] == ["FOO-x"]
        assert time.monotonic() - started < 10
    finally:
        registry.close()


def test_a_commit_made_while_the_watcher_reconnects_wakes_the_poll_it_matches(url):
    """The watcher's connection terminated while a long poll waits, and a matching
    change committed before the watcher is back (its NOTIFY went nowhere): once
    connected again, the watcher reports what was committed since its last look,
    and the poll answers with that change (it started its last Sequence afresh,
    and the poll waited its 20 s out)."""
    import psycopg
    from helpers import Registry, opened, run_in_thread
    registry = Registry(url, poll_interval=60)  # only a notification, or the catch-up, can wake it in time
    storage, committed = registry.app.storage, threading.Event()
    connect_again = storage.watch_commits

    def once_the_change_is_committed(after=None):
        if after is not None:  # connecting again
            assert committed.wait(20), "the change was committed"
        return connect_again(after=after)
    storage.watch_commits = once_the_change_is_committed
    try:
        admin = registry.client("admin")
        answer = run_in_thread(lambda: admin.get("/events?ProgramId=FOO&wait=20").json)
        eventually(lambda: registry.app.long_polls == 1 and registry.app.news._watcher is not None, "the poll waits")
        with psycopg.connect(url, autocommit=True) as conn:
            watcher = "SELECT pid FROM pg_stat_activity WHERE application_name = 'eventstore watcher'"
            eventually(lambda: conn.execute(watcher).fetchone() is not None, "the watcher listens")
            conn.execute(f"SELECT pg_terminate_backend(pid) FROM ({watcher}) AS w")
            eventually(lambda: conn.execute(watcher).fetchone() is None, "the watcher is gone")
        with opened(url) as other, other.transaction(eventstore.now_us(), seqs=1) as tx:
            eventstore.put_event(tx, eventstore.validate_event("FOO-meanwhile", event()))
        committed.set()
        assert [e["EventId"] for e in answer(timeout=30)["Events"]] == ["FOO-meanwhile"]
    finally:
        committed.set()
        registry.close()


def test_the_first_reads_after_the_database_dropped_every_connection_are_answered(url):
    """Every backend terminated (a restart, a failover): the connections the
    request threads hold are dead, and the first statement on each failed (503s
    for seconds). A read that finds its connection broken runs once more on a
    fresh one, so the first answers are the right ones."""
    import psycopg
    from helpers import Registry
    registry = Registry(url)
    try:
        admin = registry.client("admin")
        admin.put_json("/events/FOO-1", event(1))
        assert admin.get("/events").json["Events"][0]["EventId"] == "FOO-1"  # this thread holds a connection
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                " WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0] >= 2
        registry.app._auth_cache.clear()  # authenticate again: a read too
        assert admin.get("/events").json["Events"][0]["EventId"] == "FOO-1"
        assert admin.get("/programs").status_int == 200
        assert admin.get("/events/FOO-1").json["EventId"] == "FOO-1"
        eventually(lambda: registry.anonymous.get("/health", expect_errors=True).status_int == 200,
                   "the writer takes writes again")
    finally:
        registry.close()


def test_removing_a_type_waits_for_a_write_of_it_in_progress_and_then_refuses(url):
    """A write of type T into a program that takes registered types only, not yet
    committed, while another session removes T: the removal waits for it and then
    answers 409, as SQLite's write lock makes it; both committing left an event of
    an unregistered type in that program. A removal first, then the write: the
    write sees T gone."""
    from helpers import opened, run_in_thread
    with opened(url) as setup, setup.transaction(eventstore.now_us()) as tx:
        tx.register_event_type("T", "a type")
        tx.put_program("STRICT", "Strict", registered_types_only=True)
    strict = {**event(), "ProgramId": "STRICT"}
    with opened(url) as writing, opened(url) as removing:
        with writing.transaction(eventstore.now_us(), seqs=1) as tx:
            eventstore.put_event(tx, eventstore.validate_event("STRICT-1", strict))
            removal = run_in_thread(lambda: _remove_type(removing, "T"))
            time.sleep(0.5)  # the removal waits for this transaction now
        with pytest.raises(eventstore_errors.Problem) as refused:
            removal()
        assert refused.value.status == 409
        assert writing.type_registered("T") and writing.read_event("STRICT-1") is not None
        # The other order: the type removed first, then a write of it is refused.
        with writing.transaction(eventstore.now_us(), seqs=1) as tx:
            eventstore.delete_event(tx, "STRICT-1")
        _remove_type(removing, "T")
        with pytest.raises(eventstore_errors.Problem) as unregistered:
            with writing.transaction(eventstore.now_us(), seqs=1) as tx:
                eventstore.put_event(tx, eventstore.validate_event("STRICT-2", strict))
        assert unregistered.value.status == 400


def _remove_type(session, event_type):
    with session.transaction(eventstore.now_us()) as tx:
        eventstore.unregister_event_type(tx, event_type)


def test_a_role_that_cannot_see_other_roles_transactions_is_told_at_start_and_health_says_so(url):
    """pg_stat_activity hides other roles' transactions from a role without
    pg_read_all_stats, and feedHeldBackSeconds read 0 while one held the feed
    back: the banner says so and names the GRANT; /health says what it saw;
    with the GRANT it sees them."""
    import psycopg
    server, name = url.rsplit("/", 1)
    with psycopg.connect(url, autocommit=True) as owner:
        owner.execute("DROP ROLE IF EXISTS limited")
        owner.execute("CREATE ROLE limited LOGIN")
        owner.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO limited")
        owner.execute("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO limited")
        limited_url = url.replace("eventstore@", "limited@")
        try:
            blind = Server(limited_url)
            try:
                assert "cannot see other roles' transactions" in blind.banner
                assert "GRANT pg_read_all_stats TO \"limited\";" in blind.banner
                owner.execute("BEGIN")
                owner.execute("SELECT pg_current_xact_id()")  # the owner's transaction holds the feed back
                time.sleep(0.3)
                health = blind.request("GET", "/health")[2]
                assert (health["feedHeldBackSeconds"], health["feedHeldBackSeesAllSessions"]) == (0, False)
                owner.execute("ROLLBACK")
            finally:
                blind.stop()
            owner.execute("GRANT pg_read_all_stats TO limited")
            seeing = Server(limited_url)
            try:
                assert "cannot see" not in seeing.banner
                owner.execute("BEGIN")
                owner.execute("SELECT pg_current_xact_id()")
                time.sleep(0.3)
                health = seeing.request("GET", "/health")[2]
                assert health["feedHeldBackSeconds"] >= 0.3 and health["feedHeldBackSeesAllSessions"] is True
                owner.execute("ROLLBACK")
            finally:
                seeing.stop()
        finally:
            owner.execute("REASSIGN OWNED BY limited TO eventstore")
            owner.execute("DROP OWNED BY limited")
            owner.execute("DROP ROLE limited")


def test_a_password_in_the_url_is_never_printed(url, tmp_path):
    """In the user part or as ?password=: the banner, the command line's
    errors and serve.py's errors show *** in its place."""
    server_url, name = url.rsplit("/", 1)
    with_password = url.replace("eventstore@", "eventstore:userinfo-secret@") + "?password=query-secret"
    served = Server(with_password)
    try:
        assert "***" in served.banner
        assert "secret" not in served.banner and "secret" not in "".join(served.log)
    finally:
        served.stop()
    missing = f"{server_url}/no_such_database?password=query-secret".replace("eventstore@", "eventstore:userinfo-secret@")
    for argv in ([sys.executable, "serve.py", "--db", missing, "--port", "0"],
                 [sys.executable, "eventstore.py", "--db", missing, "program", "list"]):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
        # PostgreSQL's own message comes through, only its passwords masked
        assert result.returncode == 1 and 'database "no_such_database" does not exist' in result.stderr, result.stderr
        assert "secret" not in result.stdout + result.stderr


def test_make_pg_starts_a_throwaway_cluster_that_make_run_can_use_and_no_one_else(url, tmp_path):
    """The README's PostgreSQL recipe: `make pg`, then `make run DB=...`. It once
    trusted every local user over TCP with a superuser role: `runuser -u nobody --
    psql -h 127.0.0.1 ...` could run programs as postgres (COPY ... TO PROGRAM).
    Now it has no TCP port, its socket is in a private folder, and the app's role
    is no superuser. A failed start names its log. (``url`` only makes this test
    need PostgreSQL's binaries as the others do.)"""
    import psycopg
    import shutil
    import socket
    import tempfile
    import urllib.parse
    from server import free_port
    port = free_port()
    folder = tempfile.mkdtemp(prefix="eventstore-trial-pg-")
    os.chmod(folder, 0o755)  # as root, the server runs as postgres, which must reach its folder
    cluster = f"{folder}/cluster"
    make = ["make", "-s", "-C", str(ROOT), f"PGPORT={port}", f"PGDIR={cluster}"]
    trial = f"postgresql://eventstore@{urllib.parse.quote(cluster, safe='')}:{port}/eventstore"
    try:
        for _ in range(2):  # a second `make pg` finds it running and says the same
            started = subprocess.run([*make, "pg"], capture_output=True, text=True, timeout=180)
            assert started.returncode == 0, started.stdout + started.stderr
            assert f"make run DB={trial}" in started.stdout
        assert oct(os.stat(cluster).st_mode & 0o777) == "0o700"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        with psycopg.connect(trial, autocommit=True) as conn:
            assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("COPY (SELECT 1) TO PROGRAM 'true'")
        if os.geteuid() == 0:  # another local user cannot even reach the socket
            psql = os.path.join(_pg_bin(), "psql")
            other = subprocess.run(["runuser", "-u", "nobody", "--", psql, "-h", cluster, "-p", str(port), "-U",
                                    "eventstore", "-d", "eventstore", "-c", "SELECT 1"],
                                   capture_output=True, text=True, timeout=60)
            assert other.returncode != 0 and "Permission denied" in other.stderr, other.stdout + other.stderr
        server = Server(trial)
        try:
            server.register("FOO")
        finally:
            server.stop()
        subprocess.run([*make, "pg-stop"], capture_output=True, text=True, timeout=120, check=True)
        with open(f"{cluster}/data/postgresql.conf", "a") as conf:
            conf.write("no_such_setting = 1\n")
        failed = subprocess.run([*make, "pg"], capture_output=True, text=True, timeout=180)
        assert failed.returncode != 0 and f"its log: {cluster}/log" in failed.stdout, failed.stdout + failed.stderr
        assert "no_such_setting" in failed.stdout  # the log's last lines say why
    finally:
        stopped = subprocess.run([*make, "pg-stop"], capture_output=True, text=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def test_the_tests_cluster_takes_no_one_else(url, pg_cluster):
    """The suite's cluster trusted every local user over TCP, as make pg's did: it
    listens on no TCP port, and its socket is in a private folder."""
    import socket
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", pg_cluster.port), timeout=10).close()
    assert oct(os.stat(pg_cluster.folder).st_mode & 0o777) == "0o700"
    if os.geteuid() == 0:
        other = subprocess.run(["runuser", "-u", "nobody", "--", os.path.join(_pg_bin(), "psql"), "-h",
                                str(pg_cluster.folder), "-p", str(pg_cluster.port), "-U", "eventstore", "-d",
                                "postgres", "-c", "SELECT 1"], capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and "Permission denied" in other.stderr, other.stdout + other.stderr


def _pg_bin():
    from pg_cluster import find_binaries
    return find_binaries()


def test_events_restored_from_a_cluster_older_than_this_one_are_in_the_feed(url):
    """A dump restored into a younger cluster keeps the rows' transaction ids,
    ahead of the new cluster's: the feed's barrier hid every one of them until
    this cluster's ids caught up. On opening, such rows take the oldest id."""
    import psycopg
    from helpers import Caller, Registry, basic
    registry = Registry(url)
    try:
        key = registry.keys["admin"]
        for n in range(3):
            registry.client("admin").put_json(f"/events/FOO-{n}", event(n))
    finally:
        registry.close()
    with psycopg.connect(url, autocommit=True) as conn:  # as a restore into a younger cluster leaves them
        conn.execute("UPDATE events SET xid = (pg_current_xact_id()::text::bigint + 1000000)::text::xid8")
    app = eventstore.make_app(url)
    try:
        admin = Caller(app, basic("admin", key))
        assert [e["EventId"] for e in admin.get("/events").json["Events"]] == ["FOO-0", "FOO-1", "FOO-2"]
        admin.put_json("/events/FOO-3", event(3))
        assert [e["EventId"] for e in admin.get("/events").json["Events"]] == ["FOO-0", "FOO-1", "FOO-2", "FOO-3"]
    finally:
        app.close()


"""docs/API.md §5b: RetainDays and the retention sweeper (an engine of its own,
under a lease in the database), the leases themselves, and the engines' life."""

import threading

import pytest
import webtest

import eventstore
import serve
from eventstore_leases import Lease, LeaseLost
from eventstore_retention import RetentionSweeper
from helpers import THREADED_HOST, Registry, basic, event_body, eventually, opened, run_in_thread

DAY = 86_400_000_000


class Clock:
    """now_us() shifted by ``offset`` microseconds: events written 'days ago'."""

    def __init__(self):
        self.offset = 0

    def __call__(self):
        return eventstore.now_us() + self.offset


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def retained(db, clock):
    """A registry whose app sweeps every second, on a clock the test moves."""
    registry = Registry(db, clock=clock, retention_interval=1)
    yield registry
    registry.close()


def put_many(client, prefix, count, event_type="PageViewed", program="FOO", member="joebob@example.com"):
    for start in range(0, count, 1000):
        items = [{"EventId": f"{program}-{prefix}{n}", **event_body(program, EventType=event_type,
                                                                      ProgramMemberId=member, EventData={"n": n})}
                 for n in range(start, min(count, start + 1000))]
        client.post_json("/events", {"Events": items})


def live(client, event_id):
    return client.get(f"/events/{event_id}", expect_errors=True).status_int == 200


def test_expired_events_are_erased_as_an_erasure_erases_them_and_fresh_ones_stay(retained, clock):
    admin = retained.client("admin")
    clock.offset = -3 * DAY  # written three days ago
    put_many(admin, "old", 3)
    put_many(admin, "oldother", 2, event_type="CourseCompleted")  # a type without RetainDays
    clock.offset = -DAY // 2
    put_many(admin, "young", 2)
    clock.offset = 0
    before = admin.get("/events?after=0&limit=1000").json["Events"][-1]["Sequence"]
    admin.put_json("/event-types/PageViewed", {"Description": "A page was viewed.", "RetainDays": 2})
    eventually(lambda: not any(live(admin, f"FOO-old{n}") for n in range(3)), "the expired events erased")
    eventually(lambda: retained.anonymous.get("/health").json["retention"]["erased"] == 3, "the sweep recorded")
    assert all(live(admin, f"FOO-young{n}") for n in range(2))  # not yet expired
    assert all(live(admin, f"FOO-oldother{n}") for n in range(2))  # no RetainDays
    row = retained.row("FOO-old0")
    assert (row["member_id"], row["doc"], row["start_us"], row["content_hash"]) == (None, None, None, None)
    changes = admin.get(f"/events?after={before}").json["Events"]
    assert sorted(e["EventId"] for e in changes) == ["FOO-old0", "FOO-old1", "FOO-old2"]
    assert all(e["Deleted"] and e["Revision"] == 2 for e in changes)
    assert len({e["Sequence"] for e in changes}) == 3  # each its own Sequence
    health = retained.anonymous.get("/health").json["retention"]
    assert health["intervalSeconds"] == 1 and health["erased"] == 3 and health["lastSweepUTC"].endswith("Z")
    # Removing RetainDays keeps the rest for ever.
    admin.put_json("/event-types/PageViewed", {"RetainDays": None})
    clock.offset = 10 * DAY
    assert retained.app.engines[0].sweep_if_due() is None  # no type has a RetainDays: no sweep
    assert all(live(admin, f"FOO-young{n}") for n in range(2))


def test_a_sweep_erases_at_most_1000_events_a_transaction_and_wakes_long_polls(retained, clock):
    admin = retained.client("admin")
    clock.offset = -10 * DAY
    put_many(admin, "e", 2500)
    clock.offset = 0
    head = admin.get("/events?after=0&limit=1000").json
    while head["HasMore"]:
        head = admin.get(head["Next"]).json
    after = head["Events"][-1]["Sequence"]
    waiting = run_in_thread(lambda: admin.get(f"/events?ProgramId=FOO&after={after}&wait=20").json["Events"])
    admin.put_json("/event-types/PageViewed", {"Description": "A page was viewed.", "RetainDays": 1})
    woken = waiting(timeout=30)
    assert woken and all(e["Deleted"] for e in woken)
    eventually(lambda: retained.count_events() == 2500 and not retained.sql.execute(
        "SELECT COUNT(*) FROM events WHERE deleted = FALSE").fetchone()[0], "every event erased", timeout=30)
    # One clock reading per transaction: tombstones grouped by UpdatedUTC are the transactions.
    groups = [n for _, n in retained.sql.execute("SELECT updated_us, COUNT(*) FROM events GROUP BY updated_us")]
    assert sum(groups) == 2500 and max(groups) <= 1000 and len(groups) >= 3, groups  # the contract's bound
    eventually(lambda: retained.anonymous.get("/health").json["retention"]["erased"] == 2500,
               "the sweep recorded (after its last transaction)")


def test_a_sweep_waits_while_another_holds_the_lease_and_goes_on_when_it_expires(registry):
    admin = registry.client("admin")
    admin.put_json("/event-types/PageViewed", {"Description": "A page was viewed.", "RetainDays": 1})
    old = eventstore.make_app(registry.db_path, clock=lambda: eventstore.now_us() - 5 * DAY)
    try:
        webtest.TestApp(old, extra_environ=THREADED_HOST).put_json(
            "/events/FOO-1", event_body(EventType="PageViewed"), headers=basic("admin", registry.keys["admin"]))
    finally:
        old.close()
    sweeper = registry.app.engines[0]
    with registry.transaction() as tx:  # another process holds it, for 2 s
        assert tx.take_lease(RetentionSweeper.NAME, "another process", 2)
    assert sweeper.sweep_if_due() is None
    assert live(admin, "FOO-1")
    # It never gives it up (killed, say): once it expires, a sweep goes on.
    eventually(lambda: sweeper.sweep_if_due() is not None or not live(admin, "FOO-1"), "the sweep")
    assert not live(admin, "FOO-1")
    # The lease was given up after the sweep: anyone may take it now.
    with registry.transaction() as tx:
        assert tx.take_lease(RetentionSweeper.NAME, "yet another", 20)


def test_a_process_sweeps_only_when_no_other_swept_in_the_last_half_interval(registry):
    admin = registry.client("admin")
    admin.put_json("/event-types/PageViewed", {"Description": "A page was viewed.", "RetainDays": 1})
    first = RetentionSweeper(registry.storage, registry.app.writer, interval=3600)
    assert first.sweep_if_due() == 0  # nothing expired, but a sweep ran and was recorded
    assert registry.anonymous.get("/health").json["retention"]["erased"] == 0
    other = RetentionSweeper(registry.storage, registry.app.writer, interval=3600)
    assert other.sweep_if_due() is None


def test_without_retained_types_a_sweep_writes_nothing(registry):
    commits = registry.record_commits()
    assert RetentionSweeper(registry.storage, registry.app.writer, interval=1).sweep_if_due() is None
    assert commits == []


# --- Leases ---------------------------------------------------------------------------------

def test_a_lease_is_one_holders_until_it_expires_or_is_given_up(db):
    now = eventstore.now_us()
    with opened(db) as session:
        def tx(at):
            return session.transaction(now + at * 1_000_000)
        with tx(0) as t:
            assert t.take_lease("work", "A", 30)
            assert not t.take_lease("work", "B", 30)  # one conditional statement: refused while A holds it
            assert t.holds_lease("work", "A") and not t.holds_lease("work", "B")
            assert t.take_lease("other", "B", 30)  # leases are by name
        with tx(20) as t:
            assert t.take_lease("work", "A", 30)  # renewed: now until 50
        with tx(40) as t:
            assert not t.take_lease("work", "B", 30) and t.holds_lease("work", "A")
        with tx(51) as t:
            assert not t.holds_lease("work", "A")  # expired
            assert t.take_lease("work", "B", 30)  # ... so another takes it
            assert not t.holds_lease("work", "A")
        with tx(52) as t:
            t.release_lease("work", "A")  # not A's: nothing happens
            assert t.holds_lease("work", "B")
            t.release_lease("work", "B")
            assert t.take_lease("work", "C", 30)


def test_work_under_a_lease_lost_meanwhile_writes_nothing(registry):
    """A holder that stalled past its lease's expiry cannot record over its successor."""
    lease = Lease(registry.app.writer, "work", seconds=1)
    assert lease.take()
    with registry.transaction(now=eventstore.now_us() + 2_000_000) as tx:
        assert tx.take_lease("work", "successor", 30)

    def stale_work(tx):
        lease.check(tx)
        tx.put_program("LATE", "written under a lost lease")
    with pytest.raises(LeaseLost):
        registry.app.write(stale_work, touched=lambda result: False, seqs=0)
    assert registry.storage.reads().find_program("LATE") is None and not lease.held


def test_a_renewal_answered_after_the_release_leaves_the_lease_released(registry):
    """The webhook deliverer's manager renews a delivery's lease while the delivery's
    thread gives it up. A renewal committed first and answered late must not leave
    the holder believing it holds the lease it has released since (it delivered
    again without one, beside the next holder)."""
    writer, renewed, answer, released = registry.app.writer, threading.Event(), threading.Event(), threading.Event()

    class LateAnswers:
        """The app's writer; the renewal's answer comes once ``answer`` is set."""
        renewing = False

        def submit(self, change, **kwargs):
            result = writer.submit(change, **kwargs)
            if self.renewing:
                self.renewing = False
                renewed.set()
                answer.wait(10)
            elif renewed.is_set():
                released.set()
            return result

    late = LateAnswers()
    lease = Lease(late, "work", seconds=30)
    assert lease.take()
    late.renewing = True
    renewal = run_in_thread(lease.take)
    assert renewed.wait(10)
    giving_up = run_in_thread(lease.give_up)
    released.wait(2)  # a chance to release before the renewal's answer (not taken when the lease has a lock)
    answer.set()
    renewal(), giving_up()
    assert not lease.held
    with registry.transaction() as tx:
        assert not tx.holds_lease("work", lease.holder)


def test_a_lease_lasts_at_most_30_seconds(registry):
    with pytest.raises(ValueError):
        Lease(registry.app.writer, "work", seconds=31)


# --- The engines' life -------------------------------------------------------------------------

def test_engines_start_on_the_first_request_or_start_and_stop_on_close(db):
    app = eventstore.make_app(db, retention_interval=5)
    sweeper = app.engines[0]
    assert sweeper._thread is None  # made, not started
    webtest.TestApp(app).get("/health")
    assert sweeper._thread.is_alive()
    app.close()
    assert not sweeper._thread.is_alive()
    started = eventstore.make_app(db)
    started.start()  # as serve.py does at start-up
    assert started.engines[0]._thread.is_alive()
    started.close()
    assert not started.engines[0]._thread.is_alive()


@pytest.mark.parametrize("interval", [0, -1, 1.5, True, "60"])
def test_the_retention_interval_is_whole_seconds_of_at_least_1(db, interval):
    with pytest.raises(ValueError):
        eventstore.make_app(db, retention_interval=interval)


@pytest.mark.parametrize("argument", ["0", "-5", "1.5", "x"])
def test_serve_takes_retention_interval_in_whole_seconds(argument, capsys):
    with pytest.raises(SystemExit):
        serve.parse_args(["--retention-interval", argument])
    assert serve.parse_args(["--retention-interval", "7"]).retention_interval == 7
    assert serve.parse_args([]).retention_interval == 3600


def test_a_forked_childs_engines_are_its_own(db):
    """_start_process (which a forked child runs) makes new engines: the parent's
    threads are not in the child."""
    app = eventstore.make_app(db)
    try:
        parent = app.engines
        app.start()
        app._pid = -1  # as a child sees it
        app.__call__({"REQUEST_METHOD": "GET", "PATH_INFO": "/health", "wsgi.input": None}, lambda *args: None)
        assert app.engines is not parent and app.engines[0]._thread.is_alive()
        for engine in parent:
            engine.stop()
    finally:
        app.close()


def test_a_stop_in_the_middle_of_a_sweep_ends_it_soon(registry, clock):
    admin = registry.client("admin")
    admin.put_json("/event-types/PageViewed", {"Description": "A page was viewed.", "RetainDays": 1})
    sweeper = RetentionSweeper(registry.storage, registry.app.writer, interval=3600,
                               clock=lambda: eventstore.now_us() + 5 * DAY)
    sweeper._stop.set()  # stopping: a sweep that starts ends at once, unrecorded
    assert sweeper.sweep_if_due() == 0
    assert registry.anonymous.get("/health").json["retention"]["lastSweepUTC"] is None

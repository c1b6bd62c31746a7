"""docs/API.md §4: GET /events, the change feed."""

import time
import urllib.parse

import pytest

from helpers import Registry, event_body, eventually, opened, run_in_thread


def publish(client, event_id, **fields):
    program_id = event_id.split("-")[0]
    client.put_json(f"/events/{event_id}", event_body(program_id, **fields))


def ids(response):
    return [e["EventId"] for e in response.json["Events"]]


def follow(client, url="/events?limit=2"):
    """Follow Next until HasMore is false; every page's events, in order."""
    events = []
    while True:
        page = client.get(url).json
        events.extend(page["Events"])
        url = page["Next"]
        if not page["HasMore"]:
            return events, url


def test_empty_feed(writer):
    page = writer.get("/events").json
    assert page == {"Events": [], "Next": "/events?after=0", "HasMore": False}


def test_events_come_in_sequence_order_with_latest_state_once(admin):
    for event_id in ("FOO-1", "FOO-2", "BAR-1"):
        publish(admin, event_id)
    publish(admin, "FOO-1", EventType="Again")
    events = admin.get("/events").json["Events"]
    assert [e["EventId"] for e in events] == ["FOO-2", "BAR-1", "FOO-1"]
    assert [e["Sequence"] for e in events] == [2, 3, 4]
    assert events[-1]["EventType"] == "Again" and events[-1]["Revision"] == 2


def test_following_next_pages_through_everything(admin):
    for n in range(7):
        publish(admin, f"FOO-{n}")
    events, last_url = follow(admin)
    assert [e["EventId"] for e in events] == [f"FOO-{n}" for n in range(7)]
    assert dict(urllib.parse.parse_qsl(last_url.split("?")[1])) == {"limit": "2", "after": "7"}
    publish(admin, "FOO-new")
    assert ids(admin.get(last_url)) == ["FOO-new"]


def test_next_keeps_filters_and_limit_but_not_wait(admin):
    publish(admin, "FOO-1")
    page = admin.get("/events?EventType=CourseCompleted&ProgramId=FOO&ProgramId=BAR&limit=5&wait=0&after=0").json
    query = urllib.parse.parse_qsl(page["Next"].split("?", 1)[1])
    assert query == [("EventType", "CourseCompleted"), ("ProgramId", "FOO"), ("ProgramId", "BAR"),
                     ("limit", "5"), ("after", "1")]


def test_has_more_and_link_header(admin):
    for n in range(3):
        publish(admin, f"FOO-{n}")
    first = admin.get("/events?limit=2")
    assert first.json["HasMore"] is True
    assert first.headers["Link"] == f'<{first.json["Next"]}>; rel="next"'
    last = admin.get("/events?limit=3")
    assert last.json["HasMore"] is False and "Link" not in last.headers


def test_next_when_nothing_returned_keeps_the_requests_after(admin):
    for n in range(3):
        publish(admin, f"FOO-{n}")
    assert admin.get("/events?after=3&limit=5").json["Next"] == "/events?limit=5&after=3"
    assert admin.get("/events?ProgramId=BAR&after=2").json["Next"] == "/events?ProgramId=BAR&after=2"


def test_tombstones_are_in_the_feed(admin):
    publish(admin, "FOO-1")
    admin.delete("/events/FOO-1")
    events = admin.get("/events?ProgramId=FOO&EventType=CourseCompleted").json["Events"]
    assert [(e["EventId"], e["Deleted"], e["Sequence"]) for e in events] == [("FOO-1", True, 2)]


@pytest.mark.parametrize("query", [
    "ProgramMemberId=joebob@example.com", "ReferenceEventId=FOO-9",
    "EventStartFromUTC=2000-01-01T00:00:00Z", "EventStartBeforeUTC=2100-01-01T00:00:00Z",
])
def test_member_reference_and_time_filters_exclude_tombstones(admin, query):
    publish(admin, "FOO-1", ReferenceEventId="FOO-9")
    publish(admin, "FOO-2", ReferenceEventId="FOO-9")
    admin.delete("/events/FOO-1")
    assert ids(admin.get("/events?" + urllib.parse.quote(query, safe="=@"))) == ["FOO-2"]


def test_filters(admin):
    publish(admin, "FOO-a", EventType="Started", ProgramMemberId="ann", EventStartUTC="2026-01-01T00:00:00Z",
            EventEndUTC=None)
    publish(admin, "FOO-b", EventType="Done", ProgramMemberId="bob", EventStartUTC="2026-02-01T00:00:00Z",
            EventEndUTC=None, ReferenceEventId="FOO-a")
    publish(admin, "BAR-c", EventType="Done", ProgramMemberId="ann", EventStartUTC="2026-03-01T00:00:00Z",
            EventEndUTC=None, ReferenceEventId="FOO-a")
    cases = {
        "ProgramId=FOO": ["FOO-a", "FOO-b"],
        "ProgramId=BAR&ProgramId=FOO": ["FOO-a", "FOO-b", "BAR-c"],
        "EventType=Done": ["FOO-b", "BAR-c"],
        "EventType=Done&EventType=Started": ["FOO-a", "FOO-b", "BAR-c"],
        "ProgramMemberId=ann": ["FOO-a", "BAR-c"],
        "ProgramMemberId=ann&ProgramId=BAR": ["BAR-c"],
        "ReferenceEventId=FOO-a": ["FOO-b", "BAR-c"],
        "EventStartFromUTC=2026-02-01T00:00:00Z": ["FOO-b", "BAR-c"],
        "EventStartBeforeUTC=2026-02-01T00:00:00Z": ["FOO-a"],
        "EventStartFromUTC=2026-01-15T00:00:00Z&EventStartBeforeUTC=2026-02-15T00:00:00Z": ["FOO-b"],
        "EventStartFromUTC=2026-01-31T19:00:00-05:00": ["FOO-b", "BAR-c"],
        "ProgramId=ZZZ": [],
        "EventType=": [],
        "EventType=&EventType=Done": ["FOO-b", "BAR-c"],
        "ProgramMemberId=": [],
        "EventType=Done&ProgramMemberId=bob&ReferenceEventId=FOO-a&ProgramId=FOO": ["FOO-b"],
        "after=1": ["FOO-b", "BAR-c"],
        "after=2&limit=1": ["BAR-c"],
    }
    for query, expected in cases.items():
        assert ids(admin.get("/events?" + query.replace("+", "%2B"))) == expected, query


def test_a_user_sees_only_programs_it_may_read(registry, admin, reader):
    publish(admin, "FOO-1")
    publish(admin, "BAR-1")
    assert ids(reader.get("/events")) == ["FOO-1"]
    assert ids(registry.client("nobody").get("/events")) == []
    reader.get("/events?ProgramId=BAR", status=403)
    reader.get("/events?ProgramId=FOO&ProgramId=BAR", status=403)
    reader.get("/events?ProgramId=ZZZ", status=403)


def test_403_comes_before_parameter_validation(reader):
    reader.get("/events?ProgramId=BAR&limit=banana", status=403)


@pytest.mark.parametrize("query, field", [
    ("programid=FOO", "programid"), ("Limit=5", "Limit"), ("limit=0", "limit"), ("limit=1001", "limit"),
    ("limit=x", "limit"), ("after=-1", "after"), ("after=1.5", "after"), ("wait=31", "wait"),
    ("wait=-1", "wait"), ("EventStartFromUTC=soon", "EventStartFromUTC"), ("ProgramId=A-B", "ProgramId"),
    ("after=1&after=2", "after"), ("after=" + "9" * 30, "after"), ("limit=%EF%BC%95", "limit"),
])
def test_bad_parameters_are_400_naming_the_parameter(admin, query, field):
    problem = admin.get("/events?" + query, status=400).json
    assert field in [e["field"] for e in problem["errors"]]


def test_an_unknown_parameter_lists_the_accepted_names(admin):
    message = admin.get("/events?colour=red", status=400).json["errors"][0]["message"]
    for name in ("ProgramId", "EventType", "ProgramMemberId", "ReferenceEventId", "EventStartFromUTC",
                 "EventStartBeforeUTC", "after", "limit", "wait"):
        assert name in message


def test_limit_bounds_are_inclusive(admin):
    admin.get("/events?limit=1")
    admin.get("/events?limit=1000")
    admin.get("/events?wait=0")


@pytest.mark.sqlite_only
def test_feed_queries_walk_an_index_in_sequence_order(registry):
    from eventstore_storage import EVENT_COLUMNS
    plans = {
        "": "program_id=?",
        " AND event_type = ?": "event_type=?",
        " AND member_id = ?": "member_id=?",
        " AND ref_event_id = ?": "ref_event_id=?",
    }
    for extra, column in plans.items():
        sql = (f"EXPLAIN QUERY PLAN SELECT {EVENT_COLUMNS} FROM events WHERE program_id = ?{extra}"
               " AND seq > ? ORDER BY seq LIMIT ?")
        plan = " ".join(row[3] for row in registry.sql.execute(sql, (1,) * sql.count("?")))
        assert "USING" in plan and column in plan and "rowid>?" in plan, plan
        assert "TEMP B-TREE" not in plan, plan


def wait_until_polling(registry, count=1):
    """Bounded wait until ``count`` long polls are waiting in the app: a long-poll
    test must exercise the wait, not race past it."""
    eventually(lambda: registry.app.long_polls == count, f"{count} long poll(s) waiting")


def test_long_poll_returns_on_a_matching_commit(admin, registry):
    answer = run_in_thread(lambda: admin.get("/events?ProgramId=FOO&wait=20").json)
    wait_until_polling(registry)
    publish(registry.client("admin"), "BAR-ignored")  # wakes it, matches nothing: it waits on
    time.sleep(0.2)
    assert registry.app.long_polls == 1
    publish(registry.client("admin"), "FOO-wanted")
    page = answer()
    assert [e["EventId"] for e in page["Events"]] == ["FOO-wanted"]
    assert registry.app.long_polls == 0


def test_a_commit_in_the_same_process_wakes_a_long_poll_without_polling(tmp_path):
    """With the cross-process check pushed out to a minute, only the in-process
    wake-up on commit can answer the long poll before its 60 s are up."""
    registry = Registry(tmp_path / "wake.db", poll_interval=60)
    try:
        admin = registry.client("admin")
        answer = run_in_thread(lambda: admin.get("/events?wait=30").json)
        wait_until_polling(registry)
        publish(admin, "FOO-now")
        assert [e["EventId"] for e in answer(timeout=15)["Events"]] == ["FOO-now"]
    finally:
        registry.close()


def test_long_poll_times_out_empty(admin):
    started = time.monotonic()
    page = admin.get("/events?wait=1").json
    assert page["Events"] == [] and page["HasMore"] is False
    assert time.monotonic() - started >= 1


@pytest.mark.parametrize("max_waiting", [0, 1])
def test_at_most_max_waiting_long_polls_wait_and_the_rest_answer_at_once(db, max_waiting):
    registry = Registry(db, max_waiting=max_waiting)
    try:
        admin = registry.client("admin")
        waiting = [run_in_thread(lambda: admin.get("/events?wait=20").json) for _ in range(max_waiting)]
        wait_until_polling(registry, max_waiting)
        answer = run_in_thread(lambda: admin.get("/events?wait=20").json)
        assert answer(timeout=10)["Events"] == []  # past the limit: at once, empty
        assert registry.app.long_polls == max_waiting
        publish(admin, "FOO-1")
        for poll in waiting:
            assert [e["EventId"] for e in poll()["Events"]] == ["FOO-1"]
    finally:
        registry.close()


def test_a_host_serving_one_request_at_a_time_answers_a_long_poll_at_once(registry):
    """wsgiref serves one request at a time (wsgi.multithread and multiprocess
    false): a waiting poll would hold it, so nothing, not even the commit the poll
    waits for, could be served; the app answers wait= at once there."""
    import json
    import urllib.request
    import wsgiref.simple_server
    from helpers import basic

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = wsgiref.simple_server.make_server("127.0.0.1", 0, registry.app, handler_class=Quiet)
    serving = run_in_thread(server.serve_forever)
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{server.server_port}/events?wait=30",
                                         headers=basic("admin", registry.keys["admin"]))
        with urllib.request.urlopen(request, timeout=10) as response:  # a wait of 30 s fails here
            assert json.load(response)["Events"] == []
        assert registry.app.long_polls == 0
    finally:
        server.shutdown()
        serving()
        server.server_close()


def test_long_poll_notices_commits_from_another_connection(admin, registry):
    import eventstore

    answer = run_in_thread(lambda: admin.get("/events?wait=20").json)
    wait_until_polling(registry)
    event = eventstore.validate_event("FOO-x", event_body())
    with opened(registry.db_path) as other, other.transaction(eventstore.now_us(), seqs=1) as tx:
        eventstore.put_event(tx, event)
    assert [e["EventId"] for e in answer()["Events"]] == ["FOO-x"]


@pytest.mark.parametrize("name", ["ProgramId", "EventType"])
def test_a_repeatable_parameter_takes_at_most_100_values(admin, name):
    values = "&".join(f"{name}=P{n}" for n in range(101))
    problem = admin.get(f"/events?{values}", status=400).json
    assert [e["field"] for e in problem["errors"]] == [name]
    assert "at most 100" in problem["errors"][0]["message"]
    admin.get("/events?" + "&".join(f"{name}=P{n}" for n in range(100)), status=200)


def test_a_long_poll_does_not_re_read_for_commits_it_cannot_match(registry, monkeypatch):
    """Commits to BAR wake nothing that waits on FOO: the waiter looks at what
    each commit touched before it re-reads the feed."""
    reader_class = type(registry.storage.reads())
    reads, real_read_feed = [], reader_class.read_feed
    monkeypatch.setattr(reader_class, "read_feed", lambda *args, **kw: reads.append(1) or real_read_feed(*args, **kw))
    admin = registry.client("admin")
    answer = run_in_thread(lambda: admin.get("/events?ProgramId=FOO&wait=20").json)
    wait_until_polling(registry)
    eventually(lambda: registry.app.news._watcher is not None and len(reads) >= 1, "the watcher started")
    time.sleep(0.1)  # the watcher's first look (a re-read, to be sure) is over
    before = len(reads)
    for n in range(5):
        publish(admin, f"BAR-{n}")
    time.sleep(0.2)
    assert len(reads) == before and registry.app.long_polls == 1
    publish(admin, "FOO-1")
    assert [e["EventId"] for e in answer()["Events"]] == ["FOO-1"]
    assert len(reads) == before + 1


# --- Cursor hygiene: after=now, and no cursor past the largest Sequence committed -----------

@pytest.mark.parametrize("after", [2, 3, 999_999_999, 2**63 - 1000, 2**63 - 1])
def test_an_after_past_the_largest_committed_sequence_is_a_400_naming_the_head(admin, after):
    publish(admin, "FOO-1")
    problem = admin.get(f"/events?after={after}", status=400).json
    assert problem["Head"] == 1 and "head, 1" in problem["detail"]
    assert [e["field"] for e in problem["errors"]] == ["after"]
    admin.get("/events?after=1", status=200)


def test_on_an_empty_registry_only_after_0_is_a_cursor(admin, registry):
    assert admin.get("/events?after=0").json["Events"] == []
    assert admin.get("/events?after=1", status=400).json["Head"] == 0
    assert registry.client("nobody").get("/events?after=1", status=400).json["Head"] == 0  # the whole feed's head


def test_the_400_past_the_head_comes_at_once_whatever_wait_says(admin, registry):
    publish(admin, "FOO-1")
    answer = run_in_thread(lambda: admin.get("/events?after=2&wait=30&ProgramId=FOO", status=400).json)
    assert answer(timeout=20)["Head"] == 1
    assert registry.app.long_polls == 0


def test_the_400_past_the_head_comes_after_the_403_and_the_other_400s(reader):
    reader.get("/events?ProgramId=BAR&after=99", status=403)
    problem = reader.get("/events?after=99&limit=0", status=400).json
    assert [e["field"] for e in problem["errors"]] == ["limit"] and "Head" not in problem


def test_after_now_is_an_empty_page_whose_next_is_at_the_head(admin, reader):
    for event_id in ("FOO-1", "BAR-1", "FOO-2"):
        publish(admin, event_id)
    page = reader.get("/events?ProgramId=FOO&after=now&limit=5").json
    assert page == {"Events": [], "Next": "/events?ProgramId=FOO&limit=5&after=3", "HasMore": False}
    assert reader.get("/events?after=now").json["Next"] == "/events?after=3"  # the whole feed's head, not FOO's
    publish(admin, "FOO-3")
    assert ids(reader.get(page["Next"])) == ["FOO-3"]


@pytest.mark.parametrize("after", ["NOW", "Now", "now ", "latest", "head"])
def test_now_is_lower_case_and_exact(admin, after):
    problem = admin.get("/events?" + urllib.parse.urlencode({"after": after}), status=400).json
    assert [e["field"] for e in problem["errors"]] == ["after"]


def test_after_now_with_wait_waits_for_the_first_change_after_the_head(admin, registry):
    publish(admin, "FOO-old")
    answer = run_in_thread(lambda: admin.get("/events?ProgramId=FOO&after=now&wait=20").json)
    wait_until_polling(registry)
    publish(admin, "FOO-new")
    page = answer()
    assert ids_of(page) == ["FOO-new"]
    assert page["Next"] == "/events?ProgramId=FOO&after=2"


def ids_of(page):
    return [e["EventId"] for e in page["Events"]]

"""docs/API.md §4a: subscriptions, cursors the registry keeps: creating and
changing them, who sees them, reading (which moves nothing), acknowledging (in
commit order, durably), Behind and its kin, long polls, and the upgrade of a
version-2 database."""

import shutil
import threading
import time
from pathlib import Path

import pytest
import webtest

import eventstore
from helpers import basic, create_user, event_body, eventually, run_in_thread

DATA = Path(__file__).resolve().parent / "data"


def publish(client, event_id, **fields):
    client.put_json(f"/events/{event_id}", event_body(event_id.split("-")[0], **fields))


def ids(page):
    return [e["EventId"] for e in page["Events"]]


def stored(registry):
    """Every stored subscription row, to see that a refused change changed nothing."""
    return [tuple(row) for row in registry.sql.execute("SELECT * FROM subscriptions ORDER BY name").fetchall()]


@pytest.fixture
def other(registry):
    """A second ordinary user, with read on FOO and BAR."""
    registry.add_user("other", grants={"FOO": "read", "BAR": "read"})
    return registry.client("other")


# --- Creating and changing -------------------------------------------------------------------

def test_a_put_creates_a_subscription_with_the_defaults(registry, reader):
    created = reader.put_json("/subscriptions/lms-sync", {}, status=201)
    assert created.headers["Location"] == "/subscriptions/lms-sync"
    subscription = created.json
    assert subscription.pop("CreatedUTC").endswith("Z")
    assert subscription == {"Name": "lms-sync", "Owner": "reader", "Description": None,
                            "Filter": {"ProgramId": [], "EventType": []}, "Position": 0, "Head": 0, "Behind": 0,
                            "BehindIsExact": True, "PendingSinceUTC": None, "LastAckUTC": None, "Webhook": None}
    assert reader.get("/subscriptions/lms-sync").json == created.json
    assert list(created.json) == ["Name", "Owner", "Description", "Filter", "Position", "Head", "Behind",
                                  "BehindIsExact", "PendingSinceUTC", "CreatedUTC", "LastAckUTC", "Webhook"]


def test_a_put_on_an_existing_subscription_changes_only_what_it_gives(admin, reader):
    for n in range(3):
        publish(admin, f"FOO-{n}")
    reader.put_json("/subscriptions/s", {"Filter": {"ProgramId": ["FOO"], "EventType": ["CourseCompleted"]},
                                         "StartFrom": {"Sequence": 2}, "Description": "The LMS."}, status=201)
    changed = reader.put_json("/subscriptions/s", {"Description": "The LMS, nightly."}, status=200).json
    assert changed["Filter"] == {"ProgramId": ["FOO"], "EventType": ["CourseCompleted"]}
    assert (changed["Position"], changed["Description"]) == (2, "The LMS, nightly.")
    changed = reader.put_json("/subscriptions/s", {"Filter": {"EventType": ["T"]}, "StartFrom": "beginning"}).json
    assert changed["Filter"] == {"ProgramId": [], "EventType": ["T"]} and changed["Position"] == 0
    changed = reader.put_json("/subscriptions/s", {"Filter": None, "Description": None, "StartFrom": None,
                                                   "Webhook": None}).json
    assert changed["Filter"] == {"ProgramId": [], "EventType": []}
    assert (changed["Description"], changed["Position"], changed["Webhook"]) == (None, 0, None)


def test_filter_lists_drop_repeats_and_keep_their_order(admin):
    filter_ = admin.put_json("/subscriptions/s", {"Filter": {"ProgramId": ["BAR", "FOO", "BAR"],
                                                             "EventType": ["b", "a", "b", "a"]}}).json["Filter"]
    assert filter_ == {"ProgramId": ["BAR", "FOO"], "EventType": ["b", "a"]}


@pytest.mark.parametrize("start_from, position", [("beginning", 0), ("now", 4), ({"Sequence": 2}, 2),
                                                  ({"Sequence": 4}, 4), ({"Sequence": 0}, 0),
                                                  ({"Sequence": 3.0}, 3)])  # a whole number, as JSON Schema says
def test_start_from_sets_the_position(admin, start_from, position):
    for n in range(4):
        publish(admin, f"FOO-{n}")
    assert admin.put_json("/subscriptions/s", {"StartFrom": start_from}, status=201).json["Position"] == position


def test_start_from_a_sequence_past_the_largest_committed_is_a_400_naming_the_head(admin):
    publish(admin, "FOO-1")
    problem = admin.put_json("/subscriptions/s", {"StartFrom": {"Sequence": 2}}, status=400).json
    assert problem["Head"] == 1 and [e["field"] for e in problem["errors"]] == ["StartFrom/Sequence"]
    admin.get("/subscriptions/s", status=404)


def test_start_from_now_delivers_nothing_older(admin, reader):
    publish(admin, "FOO-old")
    publish(admin, "FOO-older-changed")
    reader.put_json("/subscriptions/s", {"StartFrom": "now"})
    assert reader.get("/subscriptions/s/events").json["Events"] == []
    publish(admin, "FOO-older-changed", EventType="Again")  # a change of an old event is new
    publish(admin, "FOO-new")
    assert ids(reader.get("/subscriptions/s/events").json) == ["FOO-older-changed", "FOO-new"]


def test_start_from_a_time_starts_at_the_first_change_at_or_after_it(registry, admin):
    for n in range(3):
        registry.app.writer.clock = lambda n=n: (n + 1) * 1_000_000
        publish(admin, f"FOO-{n}")  # updated 1 s, 2 s and 3 s after the epoch
    registry.app.writer.clock = eventstore.now_us
    cases = {"1970-01-01T00:00:02Z": 1, "1970-01-01T00:00:02.000001Z": 2, "1970-01-01T01:00:02+01:00": 1,
             "1970-01-01T00:00:00.5Z": 0, "1970-01-01T00:00:01Z": 0, "2999-01-01T00:00:00Z": 3}
    for time_utc, position in cases.items():
        answer = admin.put_json("/subscriptions/s", {"StartFrom": {"TimeUTC": time_utc}}).json
        assert answer["Position"] == position, time_utc
        assert ids(admin.get("/subscriptions/s/events").json) == [f"FOO-{n}" for n in range(position, 3)]


@pytest.mark.parametrize("start_from, field", [
    ("later", "StartFrom"), ("NOW", "StartFrom"), (5, "StartFrom"), ([], "StartFrom"), ({}, "StartFrom"),
    ({"Sequence": 1, "TimeUTC": "2026-01-01T00:00:00Z"}, "StartFrom"), ({"Position": 1}, "StartFrom"),
    ({"Sequence": -1}, "StartFrom/Sequence"), ({"Sequence": "1"}, "StartFrom/Sequence"),
    ({"Sequence": True}, "StartFrom/Sequence"), ({"Sequence": 1.5}, "StartFrom/Sequence"),
    ({"Sequence": 2**63}, "StartFrom/Sequence"), ({"TimeUTC": "yesterday"}, "StartFrom/TimeUTC"),
    ({"TimeUTC": 1700000000}, "StartFrom/TimeUTC"), ({"TimeUTC": "2026-02-30T00:00:00Z"}, "StartFrom/TimeUTC"),
])
def test_a_start_from_of_the_wrong_shape_is_a_400_naming_it(admin, start_from, field):
    problem = admin.put_json("/subscriptions/s", {"StartFrom": start_from}, status=400).json
    assert [e["field"] for e in problem["errors"]] == [field]


@pytest.mark.parametrize("body, field", [
    ({"Colour": "red"}, "Colour"), ({"Filter": ["FOO"]}, "Filter"), ({"Filter": {"Programs": ["FOO"]}},
                                                                     "Filter/Programs"),
    ({"Filter": {"ProgramId": "FOO"}}, "Filter/ProgramId"), ({"Filter": {"ProgramId": ["FOO-1"]}}, "Filter/ProgramId"),
    ({"Filter": {"ProgramId": [1]}}, "Filter/ProgramId"), ({"Filter": {"EventType": [""]}}, "Filter/EventType"),
    ({"Filter": {"EventType": ["a\u0000b"]}}, "Filter/EventType"), ({"Filter": {"EventType": ["x" * 101]}},
                                                                     "Filter/EventType"),
    ({"Filter": {"EventType": [f"T{n}" for n in range(101)]}}, "Filter/EventType"),
    ({"Filter": {"ProgramId": [f"P{n}" for n in range(101)]}}, "Filter/ProgramId"),
    ({"Description": ""}, "Description"), ({"Description": "x" * 2001}, "Description"),
    ({"Description": "bell\u0007"}, "Description"), ({"Description": 5}, "Description"),
    ({"Webhook": "https://example.com/hook"}, "Webhook"), ({"Webhook": {}}, "Webhook/Url"),
])
def test_bad_subscription_bodies_are_400s_naming_the_field(admin, body, field):
    problem = admin.put_json("/subscriptions/s", body, status=400).json
    assert field in [e["field"] for e in problem["errors"]]
    admin.get("/subscriptions/s", status=404)


def test_a_description_may_hold_line_feeds_and_tabs_and_every_list_100_values(admin):
    body = {"Description": "line one\n\tline two", "Filter": {"EventType": [f"T{n}" for n in range(100)],
                                                                "ProgramId": [f"P{n}" for n in range(100)]}}
    assert admin.put_json("/subscriptions/s", body, status=201).json["Description"] == "line one\n\tline two"


@pytest.mark.parametrize("body", [b"[]", b'"s"', b"{not json", b'{"Filter": {}, "Filter": {}}'])
def test_a_body_that_is_not_one_json_object_is_a_400(admin, body):
    admin.put("/subscriptions/s", body, headers={"Content-Type": "application/json"}, status=400)


@pytest.mark.parametrize("name", ["a b", "a.b", "x" * 65, "é", "a:b"])
def test_a_name_outside_the_rule_is_a_400_on_every_method_after_authentication(registry, admin, name):
    path = "/subscriptions/" + name.replace(" ", "%20").replace("é", "%C3%A9")
    for call in (lambda: admin.put_json(path, {}, status=400), lambda: admin.get(path, status=400),
                 lambda: admin.delete(path, status=400), lambda: admin.post_json(path + "/ack", {"Through": 0}, status=400),
                 lambda: admin.get(path + "/events", status=400)):
        problem = call().json
        assert [e["field"] for e in problem["errors"]] == ["Name"], problem
    registry.anonymous.get(path, status=401)
    registry.anonymous.get(path + "/events", status=401)


def test_a_slash_sent_in_a_name_is_part_of_the_name_never_a_path_of_another(admin):
    admin.put_json("/subscriptions/a", {})
    for path in ("/subscriptions/a%2Fevents", "/subscriptions/a%2Fack"):
        problem = admin.get(path, extra_environ={"REQUEST_URI": path}, status=400).json
        assert [e["field"] for e in problem["errors"]] == ["Name"] and "'a/" in problem["errors"][0]["message"]
    path = "/subscriptions/x%2Fy/events"
    assert admin.get(path, extra_environ={"REQUEST_URI": path}, status=400).json["errors"][0]["field"] == "Name"


def test_the_longest_name_and_every_allowed_character(admin):
    for name in ("x" * 64, "A-z_0-9", "-", "_"):
        admin.put_json(f"/subscriptions/{name}", {}, status=201)


# --- Who sees what -----------------------------------------------------------------------

def test_another_users_subscription_is_a_404_for_every_method_and_its_name_a_409(registry, reader, other):
    reader.put_json("/subscriptions/mine", {"Description": "reader's"}, status=201)
    before = stored(registry)
    other.get("/subscriptions/mine", status=404)
    other.get("/subscriptions/mine/events", status=404)
    other.post_json("/subscriptions/mine/ack", {"Through": 0}, status=404)
    other.delete("/subscriptions/mine", status=404)
    other.put_json("/subscriptions/mine", {"Description": "mine now"}, status=409)
    assert stored(registry) == before
    assert other.get("/subscriptions").json == {"Subscriptions": []}
    assert reader.get("/subscriptions/mine").json["Description"] == "reader's"


def test_a_missing_subscription_is_a_404_like_another_users(reader):
    problem = reader.get("/subscriptions/none", status=404).json
    assert problem["detail"] == "There is no subscription 'none'."
    reader.get("/subscriptions/none/events", status=404)
    reader.post_json("/subscriptions/none/ack", {"Through": 0}, status=404)
    reader.delete("/subscriptions/none", status=404)


def test_system_users_see_change_and_delete_every_subscription(registry, admin, reader, other):
    registry.add_user("root2", is_system=True)
    for client, name in ((reader, "b-reader"), (other, "B-other"), (admin, "a-admin"), (other, "_other")):
        client.put_json(f"/subscriptions/{name}", {}, status=201)
    listed = admin.get("/subscriptions").json["Subscriptions"]
    assert [(s["Name"], s["Owner"]) for s in listed] == [("B-other", "other"), ("_other", "other"),
                                                         ("a-admin", "admin"), ("b-reader", "reader")]
    assert [s["Name"] for s in other.get("/subscriptions").json["Subscriptions"]] == ["B-other", "_other"]
    root2 = registry.client("root2")
    changed = root2.put_json("/subscriptions/b-reader", {"Description": "set by root2"}, status=200).json
    assert (changed["Owner"], changed["Description"]) == ("reader", "set by root2")
    assert root2.get("/subscriptions/a-admin").json["Owner"] == "admin"
    root2.delete("/subscriptions/b-reader", status=204)
    reader.get("/subscriptions/b-reader", status=404)


def test_the_filter_needs_read_on_every_program_it_names(registry, admin, reader):
    before = stored(registry)
    reader.put_json("/subscriptions/s", {"Filter": {"ProgramId": ["FOO", "BAR"]}}, status=403)
    reader.put_json("/subscriptions/s", {"Filter": {"ProgramId": ["ZZZ"]}}, status=403)
    reader.put_json("/subscriptions/s", {"Filter": {"ProgramId": ["BAR"]}, "Colour": 1}, status=403)  # 403 first
    registry.client("nobody").put_json("/subscriptions/s", {"Filter": {"ProgramId": ["FOO"]}}, status=403)
    assert stored(registry) == before
    reader.put_json("/subscriptions/s", {"Filter": {"ProgramId": ["FOO"]}}, status=201)
    # A SYSTEM user changing another user's subscription is held to the owner's grants.
    admin.put_json("/subscriptions/s", {"Filter": {"ProgramId": ["BAR"]}}, status=403)
    assert reader.get("/subscriptions/s").json["Filter"]["ProgramId"] == ["FOO"]
    # A SYSTEM owner may name any program, registered or not: an unregistered one matches nothing.
    publish(admin, "FOO-1")
    admin.put_json("/subscriptions/mine", {"Filter": {"ProgramId": ["NOTYET"]}}, status=201)
    assert admin.get("/subscriptions/mine/events").json == {"Events": [], "HasMore": False, "Through": 0}
    assert admin.get("/subscriptions/mine").json["Behind"] == 0


# --- Reading ----------------------------------------------------------------------------

def test_reading_gives_the_page_after_the_position_and_moves_nothing(registry, admin, reader):
    for n in range(5):
        publish(admin, f"FOO-{n}")
    publish(admin, "BAR-1")
    reader.put_json("/subscriptions/s", {}, status=201)
    first = reader.get("/subscriptions/s/events?limit=3").json
    assert ids(first) == ["FOO-0", "FOO-1", "FOO-2"] and first["HasMore"] is True and first["Through"] == 3
    assert list(first) == ["Events", "HasMore", "Through"]
    assert first["Events"][0] == admin.get("/events?limit=1").json["Events"][0]  # the feed's representation
    for _ in range(2):  # the same page again, until it is acknowledged
        assert reader.get("/subscriptions/s/events?limit=3").json == first
    assert reader.get("/subscriptions/s").json["Position"] == 0
    reader.post_json("/subscriptions/s/ack", {"Through": first["Through"]})
    rest = reader.get("/subscriptions/s/events").json
    assert ids(rest) == ["FOO-3", "FOO-4"] and rest["HasMore"] is False and rest["Through"] == 5
    reader.post_json("/subscriptions/s/ack", {"Through": 5})
    assert reader.get("/subscriptions/s/events").json == {"Events": [], "HasMore": False, "Through": 5}


def test_reading_follows_the_filter_and_gives_each_event_once_at_its_latest_change(admin):
    publish(admin, "FOO-1")
    publish(admin, "FOO-2", EventType="Other")
    publish(admin, "BAR-1")
    publish(admin, "FOO-1", EventType="CourseCompleted", ProgramMemberId="changed")
    admin.delete("/events/FOO-2")
    admin.put_json("/subscriptions/s", {"Filter": {"ProgramId": ["FOO"], "EventType": ["CourseCompleted", "Other"]}})
    page = admin.get("/subscriptions/s/events").json
    assert [(e["EventId"], e["Sequence"], e["Deleted"]) for e in page["Events"]] == [("FOO-1", 4, False),
                                                                                   ("FOO-2", 5, True)]
    assert admin.get("/subscriptions/s").json["Behind"] == 2


@pytest.mark.parametrize("query, field", [("after=0", "after"), ("ProgramId=FOO", "ProgramId"), ("limit=0", "limit"),
                                          ("limit=1001", "limit"), ("wait=31", "wait"), ("wait=x", "wait"),
                                          ("limit=1&limit=2", "limit")])
def test_reading_takes_limit_and_wait_only(admin, query, field):
    admin.put_json("/subscriptions/s", {})
    problem = admin.get(f"/subscriptions/s/events?{query}", status=400).json
    assert field in [e["field"] for e in problem["errors"]]
    admin.get("/subscriptions/s/events?limit=1000&wait=0")


def test_the_owners_grants_are_checked_at_every_read(registry, admin, other):
    publish(admin, "FOO-1")
    publish(admin, "BAR-1")
    other.put_json("/subscriptions/named", {"Filter": {"ProgramId": ["FOO", "BAR"]}})
    other.put_json("/subscriptions/every", {})
    assert ids(other.get("/subscriptions/every/events").json) == ["FOO-1", "BAR-1"]
    with registry.transaction() as tx:
        tx.revoke_grant("other", "BAR")
    problem = other.get("/subscriptions/named/events", status=403).json
    assert "BAR" in problem["detail"]
    admin.get("/subscriptions/named/events", status=403)  # the owner's grants, whoever reads
    assert ids(other.get("/subscriptions/every/events").json) == ["FOO-1"]  # what it can read now
    named, every = (other.get(f"/subscriptions/{name}").json for name in ("named", "every"))
    assert (named["Behind"], every["Behind"]) == (1, 1)  # a program it can no longer read counts nothing


def test_a_disabled_owners_subscription_reads_as_that_owner_would(registry, admin, other):
    publish(admin, "FOO-1")
    other.put_json("/subscriptions/s", {"Filter": {"ProgramId": ["FOO"]}})
    with registry.transaction() as tx:
        tx.set_user_disabled("other", True)
    registry.app._auth_cache.clear()
    other.get("/subscriptions/s", status=401)
    assert ids(admin.get("/subscriptions/s/events").json) == ["FOO-1"]  # its grants still hold
    with registry.transaction() as tx:
        tx.revoke_grant("other", "FOO")
        tx.revoke_grant("other", "BAR")
    admin.get("/subscriptions/s/events", status=403)
    admin.put_json("/subscriptions/s", {"Filter": None}, status=200)
    admin.get("/subscriptions/s/events", status=403)  # it holds no grants at all
    assert admin.get("/subscriptions/s").json["Behind"] == 0
    admin.delete("/subscriptions/s", status=204)


# --- Behind, BehindIsExact, PendingSinceUTC, Head ------------------------------------------

def test_behind_counts_what_the_next_reads_would_return(admin, reader):
    reader.put_json("/subscriptions/s", {}, status=201)
    for n in range(50):
        publish(admin, f"FOO-{n}")
        publish(admin, f"BAR-{n}")  # not readable by the owner
    state = reader.get("/subscriptions/s").json
    first = admin.get("/events/FOO-0").json
    assert (state["Behind"], state["BehindIsExact"], state["Head"]) == (50, True, 100)
    assert state["PendingSinceUTC"] == first["UpdatedUTC"]
    publish(admin, "FOO-0", EventType="Changed")  # each event once, at its latest change
    state = reader.get("/subscriptions/s").json
    assert state["Behind"] == 50 and state["PendingSinceUTC"] == admin.get("/events/FOO-1").json["UpdatedUTC"]
    acked = reader.post_json("/subscriptions/s/ack", {"Through": 101}).json
    assert (acked["Behind"], acked["PendingSinceUTC"], acked["Position"], acked["Head"]) == (0, None, 101, 101)


@pytest.mark.parametrize("events, behind, exact", [(1000, 1000, True), (1001, 1000, False), (1500, 1000, False)])
def test_behind_is_exact_up_to_1000(admin, events, behind, exact):
    for start in range(0, events, 1000):
        admin.post_json("/events", {"Events": [dict(event_body(), EventId=f"FOO-{n}")
                                               for n in range(start, min(events, start + 1000))]})
    state = admin.put_json("/subscriptions/s", {"Filter": {"ProgramId": ["FOO"]}}).json
    assert (state["Behind"], state["BehindIsExact"]) == (behind, exact)
    page = admin.get("/subscriptions/s/events").json  # 100 a page unless limit says otherwise
    assert (len(page["Events"]), page["HasMore"], page["Through"]) == (100, True, page["Events"][-1]["Sequence"])
    state = admin.put_json("/subscriptions/s", {"StartFrom": {"Sequence": events - 3}}).json
    assert (state["Behind"], state["BehindIsExact"]) == (3, True)


# --- Acknowledging -----------------------------------------------------------------------

def test_an_ack_moves_the_position_and_answers_the_representation(admin, reader):
    for n in range(3):
        publish(admin, f"FOO-{n}")
    reader.put_json("/subscriptions/s", {})
    acked = reader.post_json("/subscriptions/s/ack", {"Through": 2}).json
    assert (acked["Position"], acked["Behind"], acked["Name"]) == (2, 1, "s")
    assert acked["LastAckUTC"] is not None and acked == reader.get("/subscriptions/s").json
    assert reader.post_json("/subscriptions/s/ack", {"Through": 3.0}).json["Position"] == 3  # a whole number


def test_an_ack_of_the_position_only_sets_last_ack(admin, reader):
    publish(admin, "FOO-1")
    reader.put_json("/subscriptions/s", {"StartFrom": "now"})
    first = reader.post_json("/subscriptions/s/ack", {"Through": 1}).json
    time.sleep(0.002)
    second = reader.post_json("/subscriptions/s/ack", {"Through": 1}).json
    assert first["Position"] == second["Position"] == 1 and first["Behind"] == second["Behind"] == 0
    assert eventstore.parse_datetime(first["LastAckUTC"]) < eventstore.parse_datetime(second["LastAckUTC"])


def test_an_ack_below_the_position_is_a_409_unless_it_rewinds(registry, admin, reader):
    for n in range(4):
        publish(admin, f"FOO-{n}")
    reader.put_json("/subscriptions/s", {"StartFrom": {"Sequence": 3}})
    before = stored(registry)
    problem = reader.post_json("/subscriptions/s/ack", {"Through": 1}, status=409).json
    assert "Rewind" in problem["detail"]
    reader.post_json("/subscriptions/s/ack", {"Through": 1, "Rewind": False}, status=409)
    assert stored(registry) == before
    assert reader.post_json("/subscriptions/s/ack", {"Through": 1, "Rewind": True}).json["Position"] == 1
    assert ids(reader.get("/subscriptions/s/events").json) == ["FOO-1", "FOO-2", "FOO-3"]
    assert reader.post_json("/subscriptions/s/ack", {"Through": 4, "Rewind": True}).json["Position"] == 4
    assert reader.post_json("/subscriptions/s/ack", {"Through": 0, "Rewind": True}).json["Position"] == 0


def test_an_ack_past_the_largest_committed_sequence_is_a_400_naming_the_head(registry, reader, admin):
    publish(admin, "FOO-1")
    reader.put_json("/subscriptions/s", {})
    before = stored(registry)
    for body in ({"Through": 2}, {"Through": 2, "Rewind": True}):
        problem = reader.post_json("/subscriptions/s/ack", body, status=400).json
        assert problem["Head"] == 1 and [e["field"] for e in problem["errors"]] == ["Through"]
    assert stored(registry) == before


@pytest.mark.parametrize("body, field", [({}, "Through"), ({"Through": None}, "Through"), ({"Through": "1"}, "Through"),
                                         ({"Through": -1}, "Through"), ({"Through": 1.5}, "Through"),
                                         ({"Through": True}, "Through"), ({"Through": 2**63}, "Through"),
                                         ({"Through": 0, "Rewind": "yes"}, "Rewind"),
                                         ({"Through": 0, "Rewind": 1}, "Rewind"), ({"Through": 0, "Extra": 1}, "Extra")])
def test_a_bad_ack_is_a_400_naming_the_field(admin, body, field):
    admin.put_json("/subscriptions/s", {})
    problem = admin.post_json("/subscriptions/s/ack", body, status=400).json
    assert field in [e["field"] for e in problem["errors"]]
    admin.post("/subscriptions/s/ack", b"[0]", headers={"Content-Type": "application/json"}, status=400)


class HeldWriter:
    """Holds the group-commit writer in a transaction of its own until released,
    so that the changes submitted meanwhile are committed together, in the order
    they were submitted."""

    def __init__(self, registry):
        self.registry, self.release, self.held = registry, threading.Event(), threading.Event()

        def hold(tx):
            self.held.set()
            assert self.release.wait(20)
        self.done = run_in_thread(lambda: registry.app.write(hold, touched=lambda _: False, seqs=0))
        assert self.held.wait(10)

    def queued(self, count):
        eventually(lambda: self.registry.app.writer.waiting == count, f"{count} changes queued")


def test_two_forward_acks_at_once_leave_the_greater(registry, admin, reader):
    """Each ack is decided in its transaction: the smaller one, committed after
    the greater, finds the Position past it and is a 409; the Position stays the
    greater (deciding against a Position read before would leave the smaller)."""
    for n in range(10):
        publish(admin, f"FOO-{n}")
    reader.put_json("/subscriptions/s", {})
    held = HeldWriter(registry)
    greater = run_in_thread(lambda: reader.post_json("/subscriptions/s/ack", {"Through": 8}, expect_errors=True))
    held.queued(1)
    smaller = run_in_thread(lambda: reader.post_json("/subscriptions/s/ack", {"Through": 5}, expect_errors=True))
    held.queued(2)
    held.release.set()
    held.done()
    assert (greater().status_int, smaller().status_int) == (200, 409)
    assert reader.get("/subscriptions/s").json["Position"] == 8


def test_a_rewind_and_a_forward_ack_at_once_whichever_commits_last_decides(registry, admin, reader):
    for n in range(10):
        publish(admin, f"FOO-{n}")
    reader.put_json("/subscriptions/s", {"StartFrom": {"Sequence": 6}})
    for first, second, position in (({"Through": 2, "Rewind": True}, {"Through": 7}, 7),
                                    ({"Through": 9}, {"Through": 4, "Rewind": True}, 4)):
        held = HeldWriter(registry)
        answers = [run_in_thread(lambda: reader.post_json("/subscriptions/s/ack", first))]
        held.queued(1)
        answers.append(run_in_thread(lambda: reader.post_json("/subscriptions/s/ack", second)))
        held.queued(2)
        held.release.set()
        held.done()
        assert [answer().json["Position"] for answer in answers] == [first["Through"], second["Through"]]
        assert reader.get("/subscriptions/s").json["Position"] == position


@pytest.mark.postgresql_only
def test_acks_from_two_servers_at_once_leave_the_greater(registry, admin, reader):
    """On PostgreSQL two servers' writers commit at once: the ack that comes
    second waits for the first one's row lock, then decides on what it left."""
    from helpers import opened
    for n in range(10):
        publish(admin, f"FOO-{n}")
    reader.put_json("/subscriptions/s", {})
    caller = eventstore.Principal("reader", False, {"FOO": "read"})
    with opened(registry.db_path) as first, opened(registry.db_path) as second:
        with first.transaction(eventstore.now_us()) as tx:
            eventstore.acknowledge_subscription(tx, "s", caller, 8, False)

            def smaller():
                with second.transaction(eventstore.now_us()) as other:
                    eventstore.acknowledge_subscription(other, "s", caller, 5, False)
            later = run_in_thread(smaller)
            eventually(lambda: registry.sql.execute("SELECT COUNT(*) FROM pg_stat_activity"
                                                    " WHERE wait_event_type = 'Lock'").fetchone()[0] == 1,
                       "the second ack waiting for the row")
        with pytest.raises(eventstore.Problem) as refused:
            later()
    assert refused.value.status == 409
    assert reader.get("/subscriptions/s").json["Position"] == 8


@pytest.mark.postgresql_only
def test_a_name_two_users_create_at_once_on_two_servers_is_the_first_ones(registry, reader, other):
    """The second creation waits for the first one's row, then writes nothing: a 409."""
    from helpers import opened
    change = eventstore.validate_subscription_body({"Description": "mine"})
    with opened(registry.db_path) as first, opened(registry.db_path) as second:
        with first.transaction(eventstore.now_us()) as tx:
            eventstore.put_subscription(tx, "s", eventstore.Principal("reader", False, {"FOO": "read"}), change)

            def theirs():
                with second.transaction(eventstore.now_us()) as other_tx:
                    eventstore.put_subscription(other_tx, "s", eventstore.Principal("other", False, {}), change)
            later = run_in_thread(theirs)
            eventually(lambda: registry.sql.execute("SELECT COUNT(*) FROM pg_stat_activity"
                                                    " WHERE wait_event_type = 'Lock'").fetchone()[0] == 1,
                       "the second creation waiting for the first")
        with pytest.raises(eventstore.Problem) as refused:
            later()
    assert refused.value.status == 409
    assert reader.get("/subscriptions/s").json["Owner"] == "reader"
    other.get("/subscriptions/s", status=404)


def test_an_ack_goes_through_group_commit(registry, admin, reader):
    publish(admin, "FOO-1")
    reader.put_json("/subscriptions/s", {})
    commits = registry.record_commits()
    held = HeldWriter(registry)
    ack = run_in_thread(lambda: reader.post_json("/subscriptions/s/ack", {"Through": 1}).json)
    put = run_in_thread(lambda: publish(admin, "FOO-2"))
    held.queued(2)
    held.release.set()
    held.done()
    assert ack()["Position"] == 1 and put() is None
    assert commits[-1] == 2  # the ack and the PUT, in one durable transaction


# --- Deleting ----------------------------------------------------------------------------

def test_delete_removes_the_subscription(registry, reader):
    reader.put_json("/subscriptions/s", {})
    reader.delete("/subscriptions/s", status=204)
    reader.get("/subscriptions/s", status=404)
    reader.delete("/subscriptions/s", status=404)
    assert reader.put_json("/subscriptions/s", {}, status=201).json["Position"] == 0


# --- Long polls ---------------------------------------------------------------------------

def test_a_long_poll_on_a_subscription_wakes_on_a_matching_commit_only(registry, admin, reader):
    reader.put_json("/subscriptions/s", {"Filter": {"EventType": ["Wanted"]}})
    answer = run_in_thread(lambda: reader.get("/subscriptions/s/events?wait=20").json)
    eventually(lambda: registry.app.long_polls == 1, "the poll waits")
    publish(admin, "BAR-1", EventType="Wanted")  # a program the owner cannot read
    publish(admin, "FOO-1", EventType="Other")
    time.sleep(0.2)
    assert registry.app.long_polls == 1
    publish(admin, "FOO-2", EventType="Wanted")
    page = answer()
    assert ids(page) == ["FOO-2"] and page["Through"] == 3
    assert reader.get("/subscriptions/s").json["Position"] == 0


def test_a_long_poll_on_a_subscription_wakes_on_another_apps_commit(db, registry, reader):
    """Another app on the same database (another process, or on PostgreSQL another
    server): its commit reaches the poll through the commit watcher."""
    reader.put_json("/subscriptions/s", {})
    answer = run_in_thread(lambda: reader.get("/subscriptions/s/events?wait=20").json)
    eventually(lambda: registry.app.long_polls == 1, "the poll waits")
    elsewhere = eventstore.make_app(db)
    try:
        webtest.TestApp(elsewhere).put_json("/events/FOO-x", event_body(), headers=basic("admin", registry.keys["admin"]))
        assert ids(answer()) == ["FOO-x"]
    finally:
        elsewhere.close()


def test_a_long_poll_on_a_subscription_its_host_cannot_hold_says_when_to_ask_again(reader):
    reader.put_json("/subscriptions/s", {})
    answer = reader.get("/subscriptions/s/events?wait=5", extra_environ={"wsgi.multithread": False})
    assert answer.json["Events"] == [] and answer.headers["Eventstore-Poll-After"] == "1"
    assert "Eventstore-Poll-After" not in reader.get("/subscriptions/s/events?wait=0").headers


def test_a_wait_on_a_subscription_times_out_empty_at_its_position(admin):
    publish(admin, "FOO-1")
    admin.put_json("/subscriptions/s", {"StartFrom": "now"})
    started = time.monotonic()
    assert admin.get("/subscriptions/s/events?wait=1").json == {"Events": [], "HasMore": False, "Through": 1}
    assert time.monotonic() - started >= 1


# --- The schema upgrade from version 2 -------------------------------------------------------

V2_EVENTS = ["FOO-0", "FOO-3", "FOO-4", "FOO-5", "STRICT-1", "FOO-1", "FOO-2", "BAR-1", "BAR-b0", "BAR-b1", "BAR-b2"]


def check_upgraded(app, key):
    auth = basic("upgrader", key)
    client = webtest.TestApp(app, extra_environ={"wsgi.multithread": True})
    assert client.get("/health").json["schemaVersion"] == eventstore.SCHEMA_VERSION
    feed = client.get("/events", headers=auth).json["Events"]
    assert [e["EventId"] for e in feed] == V2_EVENTS
    assert {e["EventType"]: e["Programs"] for e in client.get("/event-types", headers=auth).json["EventTypes"]} == {
        "Badge": [{"ProgramId": "BAR", "Events": 3}], "CertificateIssued": [{"ProgramId": "FOO", "Events": 1}],
        "CourseCompleted": [{"ProgramId": "FOO", "Events": 4}, {"ProgramId": "STRICT", "Events": 1}]}
    created = client.put_json("/subscriptions/after-upgrade", {"Filter": {"ProgramId": ["FOO"]}}, headers=auth).json
    assert (created["Behind"], created["Head"]) == (6, feed[-1]["Sequence"])
    page = client.get("/subscriptions/after-upgrade/events?limit=2", headers=auth).json
    acked = client.post_json("/subscriptions/after-upgrade/ack", {"Through": page["Through"]}, headers=auth).json
    assert acked["Behind"] == 4


@pytest.mark.sqlite_only
def test_a_version_2_sqlite_database_is_upgraded_idempotently(tmp_path):
    import eventstore_sqlite
    path = tmp_path / "v2.db"
    shutil.copy(DATA / "schema-v2.db", path)
    app = eventstore.make_app(path)
    try:
        check_upgraded(app, create_user(path, "upgrader", {}, is_system=True))
    finally:
        app.close()
    for _ in range(2):  # again, on an upgraded database: nothing changes
        conn = eventstore_sqlite.connect(str(path))
        conn.execute("PRAGMA user_version = 2")
        eventstore_sqlite.apply_schema(conn)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == eventstore.SCHEMA_VERSION
        assert conn.execute("SELECT name FROM subscriptions").fetchall() == [("after-upgrade",)]
        conn.close()


@pytest.mark.postgresql_only
def test_a_version_2_postgresql_database_is_upgraded_idempotently(db):
    """tests/data/schema-v2-postgres.sql, pg_dump of a database the version-2 code
    made, loaded into an empty database and opened."""
    import psycopg
    import eventstore_pg
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute((DATA / "schema-v2-postgres.sql").read_text())
    with psycopg.connect(db, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM eventstore_schema").fetchone() == (2,)
        # The rows carry the transaction ids of the cluster that made them; this
        # cluster's may be younger, and would hold them back from the feed.
        conn.execute("UPDATE events SET xid = '3'")
    app = eventstore.make_app(db)
    try:
        check_upgraded(app, create_user(db, "upgrader", {}, is_system=True))
    finally:
        app.close()
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("UPDATE eventstore_schema SET version = 2")
    eventstore_pg.PostgresStorage(db, threads=1).close()
    with psycopg.connect(db, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM eventstore_schema").fetchall() == [(eventstore.SCHEMA_VERSION,)]
        assert conn.execute("SELECT name FROM subscriptions").fetchall() == [("after-upgrade",)]


# --- Durability end to end ------------------------------------------------------------------

def test_an_acknowledged_position_survives_sigkill(db):
    """SIGKILL the server the moment an ack's 200 arrives, start it again: the
    Position is the one acknowledged. Several times."""
    import os
    import signal
    from server import Server, event
    server = Server(db)
    key = server.admin_key
    admin = {"user": "admin", "key": key}
    server.register("FOO")
    for n in range(5):
        assert server.request("PUT", f"/events/FOO-{n}", event(n), **admin)[0] == 200
    sequences = [e["Sequence"] for e in server.request("GET", "/events", **admin)[2]["Events"]]
    assert server.request("PUT", "/subscriptions/lms", {}, **admin)[0] == 201
    for through in sequences[1:4]:
        status, _, acked = server.request("POST", "/subscriptions/lms/ack", {"Through": through}, **admin)
        os.killpg(server.process.pid, signal.SIGKILL)
        assert (status, acked["Position"]) == (200, through)
        server.process.wait(10)
        server.stop()
        server = Server(db)
        state = server.request("GET", "/subscriptions/lms", **admin)[2]
        assert (state["Position"], state["Behind"]) == (through, 5 - sequences.index(through) - 1)
    server.stop()


# --- The command line ------------------------------------------------------------------------

def test_subscription_list_and_remove_on_the_command_line(registry, admin, reader, capsys):
    import eventstore_admin

    def cli(*argv, status=0):
        code = eventstore_admin.main(["--db", registry.db_path, *argv])
        out, err = capsys.readouterr()
        assert code == status, err
        return out, err

    def event(n):
        return admin.get(f"/events/FOO-{n}").json

    assert cli("subscription", "list")[0] == ""
    admin.post_json("/events", {"Events": [dict(event_body(), EventId=f"FOO-{n}") for n in range(1000)]})
    publish(admin, "FOO-1000")
    reader.put_json("/subscriptions/lms", {})
    admin.put_json("/subscriptions/all-caught-up", {"StartFrom": "now"})
    acked = reader.post_json("/subscriptions/lms/ack", {"Through": event(2)["Sequence"]}).json
    admin.put_json("/subscriptions/last", {"StartFrom": {"Sequence": event(998)["Sequence"]}})
    assert acked["PendingSinceUTC"] == event(3)["UpdatedUTC"]
    out, _ = cli("subscription", "list")
    assert out == (f"all-caught-up\tadmin\t{event(1000)['Sequence']}\t0\t-\n"
                   f"last\tadmin\t{event(998)['Sequence']}\t2\t{event(999)['UpdatedUTC']}\n"
                   f"lms\treader\t{event(2)['Sequence']}\t998\t{event(3)['UpdatedUTC']}\n")
    reader.post_json("/subscriptions/lms/ack", {"Through": 0, "Rewind": True})
    assert cli("subscription", "list")[0].splitlines()[2].startswith("lms\treader\t0\t1000+\t")
    assert "removed" in cli("subscription", "remove", "lms")[1]
    reader.get("/subscriptions/lms", status=404)
    assert "no such subscription: lms" in cli("subscription", "remove", "lms", status=1)[1]
    assert [line.split("\t")[0] for line in cli("subscription", "list")[0].splitlines()] == ["all-caught-up", "last"]

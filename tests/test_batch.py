"""docs/API.md §3 POST /events: batches, all or nothing."""

import json

import pytest

from helpers import event_body


def item(event_id, **fields):
    return {"EventId": event_id, **event_body(event_id.split("-")[0], **fields)}


def test_a_batch_creates_updates_and_replays_in_request_order(admin, registry):
    admin.put_json("/events/FOO-old", event_body())
    admin.put_json("/events/FOO-gone", event_body())
    admin.delete("/events/FOO-gone")
    response = admin.post_json("/events", {"Events": [
        item("FOO-new"), item("FOO-old", EventType="Changed"), item("BAR-1"), item("FOO-gone"),
        item("FOO-same", EventType="X")]})
    assert response.json == {"Results": [
        {"EventId": "FOO-new", "Revision": 1, "Status": "created"},
        {"EventId": "FOO-old", "Revision": 2, "Status": "updated"},
        {"EventId": "BAR-1", "Revision": 1, "Status": "created"},
        {"EventId": "FOO-gone", "Revision": 3, "Status": "updated"},
        {"EventId": "FOO-same", "Revision": 1, "Status": "created"}]}
    replay = admin.post_json("/events", {"Events": [item("FOO-same", EventType="X"), item("FOO-new")]})
    assert [r["Status"] for r in replay.json["Results"]] == ["unchanged", "unchanged"]
    sequences = [e["Sequence"] for e in admin.get("/events?after=3").json["Events"]]
    assert sequences == [4, 5, 6, 7, 8]


def test_an_invalid_item_writes_nothing_and_every_failure_is_listed(writer, registry):
    response = writer.post_json("/events", {"Events": [
        item("FOO-1"), item("FOO-2", EventStartUTC="nope"), item("FOO-3"),
        item("FOO-4", ProgramMemberId="", Colour=1), item("FOO-1")]}, status=400)
    errors = response.json["errors"]
    assert {(e["index"], e["EventId"], e["field"]) for e in errors} == {
        (1, "FOO-2", "EventStartUTC"), (3, "FOO-4", "ProgramMemberId"), (3, "FOO-4", "Colour"), (4, "FOO-1", "EventId")}
    assert "3 of 5 events" in response.json["detail"]
    assert registry.count_events() == 0


def test_a_forbidden_item_writes_nothing_and_is_listed(writer, registry):
    response = writer.post_json("/events", {"Events": [item("FOO-1"), item("BAR-1"), item("FOO-2", EventType="")]},
                                status=403)
    assert [(e["index"], e["EventId"]) for e in response.json["errors"]] == [(1, "BAR-1")]
    assert registry.count_events() == 0


def test_an_unregistered_program_is_404_listing_the_items(admin, registry):
    response = admin.post_json("/events", {"Events": [item("FOO-1"), item("ZZZ-1"), item("YYY-2")]}, status=404)
    assert [(e["index"], e["EventId"]) for e in response.json["errors"]] == [(1, "ZZZ-1"), (2, "YYY-2")]
    assert registry.count_events() == 0


@pytest.mark.parametrize("body", [
    [], {}, {"Events": []}, {"Events": {}}, {"Events": [1]}, {"Events": [{"ProgramId": "FOO"}]},
    {"Events": [{"EventId": 5}]}, {"Events": [item("FOO-1")], "More": 1},
    {"Events": [item(f"FOO-{n}") for n in range(1001)]},
])
def test_a_body_of_the_wrong_shape_is_400_before_authorization(registry, body):
    nobody = registry.client("nobody")  # may write nothing: still a 400, not a 403
    response = nobody.post_json("/events", body, status=400)
    assert response.content_type == "application/problem+json"
    assert registry.count_events() == 0


def test_malformed_json_is_400_before_authorization(registry):
    registry.client("nobody").post("/events", b'{"Events": [', headers={"Content-Type": "application/json"}, status=400)


def test_a_batch_of_1000_is_accepted(admin, registry):
    response = admin.post_json("/events", {"Events": [item(f"FOO-{n}") for n in range(1000)]})
    assert len(response.json["Results"]) == 1000
    assert registry.count_events() == 1000


def test_a_batch_needs_authentication(registry):
    registry.anonymous.post_json("/events", {"Events": [item("FOO-1")]}, status=401)


def test_a_batch_over_the_body_limit_is_413(admin):
    big = {"Events": [item(f"FOO-{n}", EventData={"pad": "x" * 2000}) for n in range(600)]}
    admin.post("/events", json.dumps(big), headers={"Content-Type": "application/json"}, status=413)

"""docs/API.md §3: PUT, GET and DELETE /events/{eventId}."""

import io
import json
from datetime import datetime

import pytest

from helpers import basic, event_body


def utc(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def put(client, event_id="FOO-ABC123", body=None, **kwargs):
    return client.put_json(f"/events/{event_id}", body if body is not None else event_body(), **kwargs)


# --- create, read, update ------------------------------------------------------------

def test_create_answers_200_with_location_etag_and_empty_body(writer):
    response = put(writer)
    assert response.status_int == 200
    assert response.headers["Location"] == "/events/FOO-ABC123"
    assert response.headers["ETag"] == '"1"'
    assert response.body == b""


def test_get_returns_the_representation(writer):
    put(writer)
    response = writer.get("/events/FOO-ABC123")
    assert response.headers["ETag"] == '"1"'
    event = response.json
    created = event.pop("CreatedUTC")
    assert event.pop("UpdatedUTC") == created
    assert created.endswith("Z")
    assert event == {
        "EventId": "FOO-ABC123", "ProgramId": "FOO", "ProgramMemberId": "joebob@example.com",
        "EventType": "CourseCompleted", "EventStartUTC": "2026-03-01T09:30:00Z",
        "EventEndUTC": "2026-03-01T11:00:00.250000Z",
        "EventData": {"course": "CPR-101", "score": 97}, "ReferenceEventId": None,
        "Deleted": False, "Revision": 1, "Sequence": 1,
    }


def test_update_bumps_revision_and_sequence(writer):
    put(writer)
    put(writer, "FOO-OTHER")
    response = put(writer, body=event_body(EventType="CourseFailed"))
    assert response.headers["ETag"] == '"2"' and response.headers["Location"] == "/events/FOO-ABC123"
    event = writer.get("/events/FOO-ABC123").json
    assert (event["Revision"], event["Sequence"], event["EventType"]) == (2, 3, "CourseFailed")
    assert utc(event["UpdatedUTC"]) > utc(event["CreatedUTC"])


def test_replay_changes_nothing(writer, registry):
    put(writer)
    before = registry.row("FOO-ABC123")
    # Same content, other spellings: key order, whitespace, time offsets.
    replay = {"EventData": {"score": 97, "course": "CPR-101"}, "ProgramId": "FOO",
              "ProgramMemberId": "joebob@example.com", "EventType": "CourseCompleted",
              "EventStartUTC": "2026-03-01T10:30:00+01:00", "EventEndUTC": "2026-03-01T11:00:00.2500009Z"}
    response = put(writer, body=replay)
    assert response.status_int == 200 and response.body == b""
    assert response.headers["ETag"] == '"1"' and response.headers["Location"] == "/events/FOO-ABC123"
    assert registry.row("FOO-ABC123") == before


@pytest.mark.parametrize("score", [97.0, True, "97"])
def test_replay_compares_json_values_exactly(writer, score):
    put(writer, body=event_body(EventData={"score": 97}))
    assert put(writer, body=event_body(EventData={"score": score})).headers["ETag"] == '"2"'


@pytest.mark.parametrize("first, second", [
    ({"a": {"b": 1}}, {"a": {"b": 1.0}}),
    ({"a": {"b": 1}}, {"a": {"b": True}}),
    ({"a": [1, {"c": 0}]}, {"a": [1, {"c": False}]}),
    ({"a": [1]}, {"a": [1.0]}),
    ({"a": {"b": None}}, {"a": {}}),
    ({"a": {"b": "1"}}, {"a": {"b": 1}}),
])
def test_replay_compares_nested_json_values_exactly(writer, first, second):
    """1, 1.0 and true differ at every depth of EventData, not just the top."""
    put(writer, body=event_body(EventData=first))
    assert put(writer, body=event_body(EventData=second)).headers["ETag"] == '"2"'
    assert put(writer, body=event_body(EventData=second)).headers["ETag"] == '"2"'  # and that is a replay
    assert writer.get("/events/FOO-ABC123").json["EventData"] == second


def test_omitted_end_defaults_to_start_and_data_to_empty(writer):
    put(writer, body=event_body(EventEndUTC=..., EventData=None, ReferenceEventId=None))
    event = writer.get("/events/FOO-ABC123").json
    assert event["EventEndUTC"] == event["EventStartUTC"] == "2026-03-01T09:30:00Z"
    assert event["EventData"] == {}
    assert event["ReferenceEventId"] is None


def test_times_are_normalized_to_utc(writer):
    put(writer, body=event_body(EventStartUTC="2026-03-01T09:30:00.123456789-05:00",
                                EventEndUTC="2026-03-01 15:00"))
    event = writer.get("/events/FOO-ABC123").json
    assert event["EventStartUTC"] == "2026-03-01T14:30:00.123456Z"
    assert event["EventEndUTC"] == "2026-03-01T15:00:00Z"


def test_reference_to_any_program_is_kept(writer):
    put(writer, body=event_body(ReferenceEventId="BAR-does-not-exist"))
    assert writer.get("/events/FOO-ABC123").json["ReferenceEventId"] == "BAR-does-not-exist"


def test_event_data_keeps_its_key_order(writer):
    put(writer, body=event_body(EventData={"z": 1, "a": {"y": [1.5, None], "b": "ü"}}))
    raw = writer.get("/events/FOO-ABC123").text
    assert '"EventData":{"z":1,"a":{"y":[1.5,null],"b":"ü"}}' in raw


@pytest.mark.parametrize("method, path", [
    ("PUT", "/events/FOO-1"), ("GET", "/events/FOO-1"), ("DELETE", "/events/FOO-1"), ("POST", "/events"),
    ("GET", "/programs"), ("PUT", "/programs/FOO"), ("DELETE", "/programs/FOO/members/m"),
    ("GET", "/event-types/T"), ("DELETE", "/event-types/T"),  # PUT takes dryRun (tests/test_schemas.py)
])
def test_a_query_parameter_where_the_resource_takes_none_is_a_400_naming_it(admin, registry, method, path):
    """`PUT /events/FOO-1?dryRun=1` wrote, silently: a client's misunderstanding
    must not go unnoticed, least of all on a write."""
    admin.put_json("/events/FOO-1", event_body())
    changes = registry.sql.execute("SELECT MAX(seq) FROM events").fetchone()
    bodies = {"/events/FOO-1": event_body(EventData={"n": 2}), "/events": {"Events": []},
              "/programs/FOO": {"Name": "Renamed"}, "/event-types/T": {"Description": "t"}}
    problem = admin.request(f"{path}?dryRun=1&dryRun=2&verbose", method=method, status=400,
                            **({"json": bodies[path]} if method in ("PUT", "POST") else {})).json
    assert [e["field"] for e in problem["errors"]] == ["dryRun", "verbose"]
    assert "takes none" in problem["errors"][0]["message"]
    assert registry.sql.execute("SELECT MAX(seq) FROM events").fetchone() == changes
    assert admin.get("/events/FOO-1").json["EventData"] == event_body()["EventData"]


def test_health_and_the_openapi_document_ignore_their_query(registry):
    """Probes and browsers add cache-busters: these two answer as without them."""
    assert registry.anonymous.get("/health?nocache=123").json["status"] == "ok"
    assert registry.anonymous.get("/openapi.json?v=2").json["openapi"].startswith("3.1")


def test_get_missing_event_is_404(writer):
    response = writer.get("/events/FOO-nope", status=404)
    assert response.content_type == "application/problem+json"


def test_unregistered_program_is_404_for_system(admin, registry):
    admin.put_json("/events/ZZZ-1", event_body("ZZZ"), status=404)
    assert registry.count_events() == 0


def test_eventid_suffix_may_use_every_allowed_character(writer):
    event_id = "FOO-aZ09._~:@-" + "x" * 186
    put(writer, event_id)
    assert writer.get(f"/events/{event_id}").json["EventId"] == event_id


# --- deletion and tombstones --------------------------------------------------------

def test_delete_leaves_a_tombstone_that_erases_the_data(writer, registry):
    put(writer, body=event_body(ReferenceEventId="FOO-2"))
    response = writer.delete("/events/FOO-ABC123", status=204)
    assert response.headers["ETag"] == '"2"'
    writer.get("/events/FOO-ABC123", status=404)
    row = registry.row("FOO-ABC123")
    assert row["deleted"] == 1 and row["revision"] == 2 and row["seq"] == 2
    for column in ("member_id", "start_us", "end_us", "doc", "ref_event_id", "content_hash"):
        assert row[column] is None, column
    tombstone = writer.get("/events").json["Events"][0]
    assert set(tombstone) == {"EventId", "ProgramId", "EventType", "Deleted", "Revision",
                              "Sequence", "CreatedUTC", "UpdatedUTC"}
    assert tombstone["Deleted"] is True


def test_delete_twice_or_missing_is_404(writer):
    writer.delete("/events/FOO-1", status=404)
    put(writer, "FOO-1")
    writer.delete("/events/FOO-1", status=204)
    writer.delete("/events/FOO-1", status=404)


def test_put_on_a_tombstone_brings_it_back_as_a_new_revision(writer):
    put(writer)
    writer.delete("/events/FOO-ABC123")
    assert put(writer).headers["ETag"] == '"3"'
    event = writer.get("/events/FOO-ABC123").json
    assert (event["Revision"], event["Sequence"], event["Deleted"]) == (3, 3, False)
    assert event["EventData"] == {"course": "CPR-101", "score": 97}


# --- conditional requests -------------------------------------------------------------

def test_if_match_current_revision_succeeds_and_stale_fails(writer, registry):
    put(writer)
    put(writer, body=event_body(EventType="B"), headers={"If-Match": '"1"'}, status=200)
    put(writer, body=event_body(EventType="C"), headers={"If-Match": '"1"'}, status=412)
    assert registry.row("FOO-ABC123")["event_type"] == "B"


def test_if_match_on_missing_or_deleted_event_fails(writer):
    put(writer, "FOO-new", headers={"If-Match": "*"}, status=412)
    put(writer, "FOO-gone")
    writer.delete("/events/FOO-gone")
    put(writer, "FOO-gone", headers={"If-Match": '"2"'}, status=412)


def test_if_none_match_star_creates_only(writer):
    put(writer, headers={"If-None-Match": "*"}, status=200)
    put(writer, body=event_body(EventType="B"), headers={"If-None-Match": "*"}, status=412)
    writer.delete("/events/FOO-ABC123")
    put(writer, headers={"If-None-Match": "*"}, status=200)


def test_if_match_compares_strongly_so_a_weak_tag_never_matches(writer, registry):
    """RFC 9110 §13.1.1: If-Match uses the strong comparison."""
    put(writer)
    for header in ('W/"1"', 'W/"1", W/"2"', ' W/"1" '):
        put(writer, body=event_body(EventType="B"), headers={"If-Match": header}, status=412)
        writer.delete("/events/FOO-ABC123", headers={"If-Match": header}, status=412)
    assert registry.row("FOO-ABC123")["revision"] == 1
    put(writer, body=event_body(EventType="B"), headers={"If-Match": 'W/"1", "1"'}, status=200)


@pytest.mark.parametrize("header", ['1', '"1', 'w/"1"', '"1",', '"1" "2"', '"a b"', ',', '*, "1"', 'W/ "1"'])
def test_a_malformed_conditional_header_is_a_400_naming_it(writer, registry, header):
    put(writer)
    for name in ("If-Match", "If-None-Match"):
        problem = put(writer, body=event_body(EventType="B"), headers={name: header}, status=400).json
        assert [e["field"] for e in problem["errors"]] == [name]
    writer.delete("/events/FOO-ABC123", headers={"If-Match": header}, status=400)
    writer.get("/events/FOO-ABC123", headers={"If-None-Match": header}, status=400)
    writer.get("/events/FOO-missing", headers={"If-None-Match": header}, status=400)  # 400 before 404
    assert registry.row("FOO-ABC123")["revision"] == 1


def test_if_none_match_compares_weakly(writer):
    """RFC 9110 §13.1.2: W/"1" names revision 1 for If-None-Match."""
    put(writer)
    writer.get("/events/FOO-ABC123", headers={"If-None-Match": 'W/"1"'}, status=304)
    writer.get("/events/FOO-ABC123", headers={"If-None-Match": '"0", W/"1"'}, status=304)
    writer.get("/events/FOO-ABC123", headers={"If-None-Match": 'W/"2"'}, status=200)
    put(writer, body=event_body(EventType="B"), headers={"If-None-Match": 'W/"1"'}, status=412)


def test_delete_honors_if_match(writer, registry):
    put(writer)
    writer.delete("/events/FOO-ABC123", headers={"If-Match": '"7"'}, status=412)
    assert registry.row("FOO-ABC123")["deleted"] == 0
    writer.delete("/events/FOO-ABC123", headers={"If-Match": '"1"'}, status=204)


def test_get_with_current_etag_is_304(writer):
    put(writer)
    response = writer.get("/events/FOO-ABC123", headers={"If-None-Match": '"1"'}, status=304)
    assert response.body == b"" and response.headers["ETag"] == '"1"'
    writer.get("/events/FOO-ABC123", headers={"If-None-Match": '"0"'}, status=200)


# --- 413 / 415 --------------------------------------------------------------------------

def test_other_content_types_are_415(writer, registry):
    body = json.dumps(event_body())
    for content_type in ("text/plain", "application/xml", "application/json; charset=latin-1"):
        writer.put("/events/FOO-1", body, headers={"Content-Type": content_type}, status=415)
    writer.put("/events/FOO-1", body, headers={"Content-Type": "application/json; charset=UTF-8"}, status=200)
    assert registry.count_events() == 1


def test_body_over_the_limit_is_413(writer, registry):
    big = event_body(EventData={"blob": "x" * (1 << 20)})
    writer.put_json("/events/FOO-1", big, status=413)
    assert registry.count_events() == 0


def test_413_is_decided_from_content_length_before_reading(registry):
    class Unreadable:
        def read(self, *args):
            raise AssertionError("the body must not be read")

    from helpers import basic
    environ = {"REQUEST_METHOD": "PUT", "PATH_INFO": "/events/FOO-1", "CONTENT_TYPE": "application/json",
               "CONTENT_LENGTH": str(2 << 20), "wsgi.input": Unreadable(),
               "HTTP_AUTHORIZATION": basic("writer", registry.keys["writer"])["Authorization"]}
    statuses = []
    registry.app(environ, lambda status, headers: statuses.append(status))
    assert [status[:3] for status in statuses] == ["413"]


def test_the_body_limit_is_configurable(tmp_path):
    from helpers import Registry
    registry = Registry(tmp_path / "small.db", max_body_bytes=200)
    client = registry.client("writer")
    client.put_json("/events/FOO-1", event_body(EventData={"x": "y" * 300}), status=413)
    client.put_json("/events/FOO-1", event_body(EventData={}), status=200)


def test_empty_conditional_headers_are_no_condition(writer):
    put(writer, headers={"If-Match": "", "If-None-Match": " "}, status=200)
    put(writer, body=event_body(EventType="B"), headers={"If-Match": ""}, status=200)
    writer.get("/events/FOO-ABC123", headers={"If-None-Match": ""}, status=200)


@pytest.mark.parametrize("length", ["\u00b2", "\u0661\u0662", "1" * 5000, "-1", "+5", "0x10", "1.5", " ", "1 2"])
def test_a_malformed_or_absurd_content_length_is_a_4xx_whatever_the_server(registry, length):
    """The app does not rely on its WSGI server having checked Content-Length
    (waitress refuses these itself; other servers pass them on)."""
    environ = {"REQUEST_METHOD": "PUT", "PATH_INFO": "/events/FOO-1", "CONTENT_TYPE": "application/json",
               "CONTENT_LENGTH": length, "wsgi.input": io.BytesIO(json.dumps(event_body()).encode()),
               "HTTP_AUTHORIZATION": basic("writer", registry.keys["writer"])["Authorization"]}
    answers = []
    body = b"".join(registry.app(environ, lambda status, headers: answers.append((status, dict(headers)))))
    (status, headers), = answers
    if length.strip():
        assert status[:3] in ("400", "413"), status
        assert headers["Content-Type"] == "application/problem+json"
        assert json.loads(body)["status"] == int(status[:3])
    assert registry.count_events() == 0


def test_a_content_length_with_leading_zeros_is_read_as_its_number(registry):
    raw = json.dumps(event_body()).encode()
    environ = {"REQUEST_METHOD": "PUT", "PATH_INFO": "/events/FOO-1", "CONTENT_TYPE": "application/json",
               "CONTENT_LENGTH": "0" * 30 + str(len(raw)), "wsgi.input": io.BytesIO(raw),
               "HTTP_AUTHORIZATION": basic("writer", registry.keys["writer"])["Authorization"]}
    answers = []
    registry.app(environ, lambda status, headers: answers.append(status))
    assert answers == ["200 OK"]


class NeverEnds:
    """A wsgi.input with no end in sight: a read would wait for good."""

    def read(self, *args):
        raise AssertionError("the app read a body the server did not say was terminated")


def test_a_body_without_content_length_is_read_only_where_the_server_ends_it(registry):
    """PEP 3333: without Content-Length the input may never end (wsgiref froze,
    Werkzeug held a thread): 411, unless the server says wsgi.input_terminated."""
    raw = json.dumps(event_body()).encode()
    environ = {"REQUEST_METHOD": "PUT", "PATH_INFO": "/events/FOO-1", "CONTENT_TYPE": "application/json",
               "wsgi.input": NeverEnds(),
               "HTTP_AUTHORIZATION": basic("writer", registry.keys["writer"])["Authorization"]}
    answers = []
    body = b"".join(registry.app(environ, lambda status, headers: answers.append((status, dict(headers)))))
    assert answers[0][0] == "411 Length Required" and "Content-Length" in json.loads(body)["detail"]
    assert answers[0][1]["Content-Type"] == "application/problem+json" and registry.count_events() == 0
    answers.clear()
    registry.app({**environ, "wsgi.input": io.BytesIO(raw), "wsgi.input_terminated": True},
                 lambda status, headers: answers.append((status, dict(headers))))
    assert answers[0][0] == "200 OK" and registry.count_events() == 1

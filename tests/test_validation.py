"""docs/API.md §3 validation: the validator, the strict JSON parser, times, and hostile
input over HTTP (always a 4xx problem+json, nothing written)."""

import json

import pytest

import eventstore
from helpers import event_body
from eventstore import Problem, parse_datetime, parse_json, validate_event


def errors_of(event_id, body):
    with pytest.raises(Problem) as caught:
        validate_event(event_id, body)
    assert caught.value.status == 400
    return {e["field"]: e["message"] for e in caught.value.errors}


# --- times ------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("2026-03-01T09:30:00Z", "2026-03-01T09:30:00Z"),
    ("2026-03-01T09:30:00", "2026-03-01T09:30:00Z"),
    ("2026-03-01t09:30:00z", "2026-03-01T09:30:00Z"),
    ("2026-03-01T09:30Z", "2026-03-01T09:30:00Z"),
    ("2026-03-01T09:30:00.5Z", "2026-03-01T09:30:00.500000Z"),
    ("2026-03-01T09:30:00.1234567Z", "2026-03-01T09:30:00.123456Z"),
    ("2026-03-01T09:30:00+02:00", "2026-03-01T07:30:00Z"),
    ("2026-03-01T01:30:00-0230", "2026-03-01T04:00:00Z"),
    ("2026-03-01T23:30:00-01", "2026-03-02T00:30:00Z"),
    ("1969-12-31T23:59:59.999999Z", "1969-12-31T23:59:59.999999Z"),
    ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z"),  # four-digit years, zero-padded
    ("0999-12-31T23:59:59.5Z", "0999-12-31T23:59:59.500000Z"),
    ("9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999999Z"),
])
def test_times_parse_to_utc(text, expected):
    assert eventstore.format_datetime(parse_datetime(text)) == expected


@pytest.mark.parametrize("text", [
    "2026-03-01", "09:30:00", "2026-02-30T00:00:00Z", "2026-03-01T24:00:00Z",
    "2026-03-01T09:60:00Z", "2026-03-01T09:30:60Z", "2026-03-01T09:30:00+24:00",
    "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-3-1T09:30:00Z",
    "yesterday", "", "2026-03-01T09:30:00ZZ", "２０２６-03-01T09:30:00Z", 20260301, None,
])
def test_bad_times_are_rejected(text):
    with pytest.raises(ValueError):
        parse_datetime(text)


# --- the validator ----------------------------------------------------------------

def test_a_valid_body_is_normalized():
    event = validate_event("FOO-1", event_body(EventStartUTC="2026-03-01T10:30:00+01:00", EventEndUTC=None))
    assert event.start_us == event.end_us == parse_datetime("2026-03-01T09:30:00Z")
    assert event.program_id == "FOO" and event.ref_event_id is None


def test_every_problem_is_listed():
    errors = errors_of("FOO-1", {
        "ProgramId": "BAR", "ProgramMemberId": "", "EventType": "a\x07b",
        "EventStartUTC": "2026-03-01T10:00:00Z", "EventEndUTC": "2026-03-01T09:00:00Z",
        "EventData": [], "ReferenceEventId": "no", "Extra": 1,
    })
    assert set(errors) == {"ProgramId", "ProgramMemberId", "EventType", "EventEndUTC",
                           "EventData", "ReferenceEventId", "Extra"}
    assert "prefix" in errors["ProgramId"]
    assert "control" in errors["EventType"]
    assert "before" in errors["EventEndUTC"]
    assert "unknown field" in errors["Extra"]


def test_required_fields_are_named_when_missing_or_null():
    errors = errors_of("FOO-1", {"ProgramId": None})
    assert set(errors) == {"ProgramId", "ProgramMemberId", "EventType", "EventStartUTC"}
    assert "null" in errors["ProgramId"] and errors["EventType"] == "is required"


@pytest.mark.parametrize("field, value", [
    ("ProgramId", 7), ("ProgramMemberId", 42), ("ProgramMemberId", "x" * 257),
    ("ProgramMemberId", " \t\n"), ("EventType", ""), ("EventType", "x" * 101),
    ("EventType", "   "), ("EventType", ["a"]), ("EventStartUTC", 1772357400),
    ("EventStartUTC", "2026-03-01"), ("EventEndUTC", True), ("EventData", "{}"),
    ("EventData", 3), ("ReferenceEventId", 5), ("ReferenceEventId", "FOO-"),
    ("ReferenceEventId", "F OO-1"),
])
def test_mistyped_fields_are_rejected(field, value):
    assert field in errors_of("FOO-1", event_body(**{field: value}))


@pytest.mark.parametrize("field, value", [
    ("ProgramMemberId", "x" * 256), ("ProgramMemberId", " a "), ("EventType", "x" * 100),
    ("EventType", "Completed ✓"), ("ReferenceEventId", "BAR-" + "~" * 200),
])
def test_limits_are_inclusive(field, value):
    validate_event("FOO-1", event_body(**{field: value}))


def nested(depth):
    value = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_event_data_may_nest_32_levels_but_not_33():
    validate_event("FOO-1", event_body(EventData=nested(32)))
    assert "EventData" in errors_of("FOO-1", event_body(EventData=nested(33)))
    arrays = {"a": json.loads("[" * 31 + "]" * 31)}
    validate_event("FOO-1", event_body(EventData=arrays))
    assert "EventData" in errors_of("FOO-1", event_body(EventData={"a": json.loads("[" * 32 + "]" * 32)}))


@pytest.mark.parametrize("event_id", [
    "FOO", "FOO-", "-1", "FO O-1", "FOO-a/b", "FOO-" + "x" * 201, "F" * 33 + "-1", "FOO-ü",
])
def test_invalid_event_ids_are_rejected(event_id):
    assert "EventId" in errors_of(event_id, event_body(program_id=eventstore.program_of(event_id) or "FOO"))


def test_body_must_be_an_object():
    for body in ([], "x", 1, None):
        assert "body" in errors_of("FOO-1", body)


# --- strict JSON ------------------------------------------------------------------

@pytest.mark.parametrize("raw, why", [
    (b'{"a": 1, "a": 2}', "duplicate"),
    (b'{"a": NaN}', "NaN"),
    (b'{"a": Infinity}', "Infinity"),
    (b'{"a": -Infinity}', "Infinity"),
    (b'{"a": 1e400}', "range"),
    (b'{"a": "\xff"}', "UTF-8"),
    (b'{"a": "\xed\xa0\x80"}', "UTF-8"),
    (b'{"a": "\\ud800"}', "surrogate"),
    (b'{"\\udfff": 1}', "surrogate"),
    (b'{"a": 1', "JSON"),
    (b"", "JSON"),
    (b"\xef\xbb\xbf{}", "JSON"),
    (b"[" * 100000 + b"]" * 100000, "deep"),
])
def test_parse_json_rejects(raw, why):
    with pytest.raises(Problem) as caught:
        parse_json(raw)
    assert caught.value.status == 400
    assert why.lower() in caught.value.detail.lower()


def test_parse_json_accepts_a_surrogate_pair():
    assert parse_json(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001F600"}


# --- hostile input over HTTP --------------------------------------------------------

HOSTILE_BODIES = [
    b"", b"null", b"[]", b'"x"', b"{", b"{}", b'{"ProgramId": "FOO"}', b"\x00\x01\x02",
    b'{"ProgramId": "FOO", "ProgramId": "FOO"}', b'{"EventData": NaN}', b"\xff\xfe{}",
    b'{"ProgramMemberId": "\\udc00"}', b"[" * 50000, b"{" * 5000 + b"}" * 5000,
    json.dumps(event_body(EventData=nested(40))).encode(),
    json.dumps(event_body(EventStartUTC="2026-13-01T00:00:00Z")).encode(),
    json.dumps(event_body(EventData={"x": 0})).encode().replace(b"\"x\": 0", b"\"x\": " + b"9" * 5000),
    json.dumps(event_body(ProgramMemberId={"$gt": ""})).encode(),
    json.dumps(event_body(EventType="'; DROP TABLE events; --" + "x" * 200)).encode(),
]


@pytest.mark.parametrize("raw", HOSTILE_BODIES, ids=range(len(HOSTILE_BODIES)))
def test_hostile_bodies_get_400_problem_json_and_write_nothing(writer, registry, raw):
    response = writer.put("/events/FOO-1", raw, headers={"Content-Type": "application/json"}, status=400)
    assert response.content_type == "application/problem+json"
    problem = response.json
    assert problem["status"] == 400 and problem["title"] == "Bad Request" and problem["type"] == "about:blank"
    assert "Traceback" not in response.text and "sqlite" not in response.text.lower()
    assert registry.count_events() == 0


@pytest.mark.parametrize("path", [
    "/events/FOO-%00", "/events/FOO-%FF", "/events/FOO-..%2F..%2Fetc", "/events/FOO-a%20b",
    "/events/" + "F" * 5000, "/events/FOO-1/extra", "/%2e%2e/events",
])
def test_odd_paths_get_a_4xx(writer, path):
    response = writer.put(path, json.dumps(event_body()), headers={"Content-Type": "application/json"},
                          expect_errors=True)
    assert 400 <= response.status_int < 500
    assert response.content_type == "application/problem+json"


@pytest.mark.parametrize("headers", [
    {"If-Match": "garbage"}, {"If-None-Match": ",,,"}, {"Content-Type": ";;;"},
    {"Authorization": "Basic " + "A" * 10000},
])
def test_odd_headers_get_a_4xx_or_work(writer, headers):
    response = writer.put("/events/FOO-1", json.dumps(event_body()),
                          headers={"Content-Type": "application/json", **headers}, expect_errors=True)
    assert response.status_int < 500


def test_a_non_numeric_content_length_is_400(registry):
    from helpers import basic
    import io
    environ = {"REQUEST_METHOD": "PUT", "PATH_INFO": "/events/FOO-1", "CONTENT_TYPE": "application/json",
               "CONTENT_LENGTH": "12abc", "wsgi.input": io.BytesIO(b"{}"),
               "HTTP_AUTHORIZATION": basic("writer", registry.keys["writer"])["Authorization"]}
    statuses = []
    registry.app(environ, lambda status, headers: statuses.append(status))
    assert [status[:3] for status in statuses] == ["400"]


def test_an_answer_lists_at_most_a_hundred_errors_each_once(registry):
    """A 60 KB query of unknown parameters was answered with 5 MB, a batch
    without write access with one error per event: the list is capped, says how
    many there were, and repeats nothing."""
    nobody = registry.client("nobody")
    query = "&".join(f"x{i}=1" for i in range(5000))
    problem = nobody.get(f"/events?{query}", status=400)
    assert len(problem.body) < 30_000 and len(problem.json["errors"]) == 100
    assert "The first 100 of 5000 errors are listed." in problem.json["detail"]
    repeated = nobody.get("/events?" + "&".join(["limit=1"] * 500), status=400).json["errors"]
    assert len(repeated) == len({(e["field"], e["message"]) for e in repeated}) == 1
    events = [{**event_body(), "EventId": f"FOO-{i}"} for i in range(1000)]
    forbidden = nobody.post_json("/events", {"Events": events}, status=403)
    assert len(forbidden.json["errors"]) == 100 and "1000 events" in forbidden.json["detail"]
    assert len(forbidden.body) < 20_000

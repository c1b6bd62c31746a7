"""Property tests (hypothesis): the parsers and the validator fail only with the
contract's errors, replays change nothing, and the feed replays any history."""

import base64
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eventstore
from eventstore import Problem

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
field_names = st.sampled_from(eventstore.EVENT_FIELDS) | st.text(max_size=12)
bodies = st.dictionaries(field_names, json_values, max_size=9) | json_values


@SETTINGS
@given(st.text(max_size=60), bodies)
def test_the_validator_returns_an_event_or_raises_a_400(event_id, body):
    try:
        event = eventstore.validate_event(event_id, body)
    except Problem as problem:
        assert problem.status == 400
        assert problem.errors and all(set(e) == {"field", "message"} for e in problem.errors)
    else:
        assert event.event_id == event_id and json.loads(event.doc + "}")["EventId"] == event_id


@SETTINGS
@given(st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_the_json_parser_returns_a_value_or_raises_a_400(raw):
    try:
        eventstore.parse_json(raw)
    except Problem as problem:
        assert problem.status == 400


@SETTINGS
@given(st.text(max_size=100) | st.none()
       | st.binary(max_size=100).map(lambda b: "Basic " + base64.b64encode(b).decode()))
def test_the_basic_auth_parser_returns_a_pair_or_none(header):
    result = eventstore.parse_basic_auth(header)
    assert result is None or (len(result) == 2 and ":" not in result[0] and all(result))


times = st.datetimes(min_value=__import__("datetime").datetime(1900, 1, 1),
                     max_value=__import__("datetime").datetime(2200, 1, 1)).map(lambda d: d.isoformat() + "Z")
valid_bodies = st.fixed_dictionaries({
    "ProgramId": st.just("FOO"),
    "ProgramMemberId": st.text(min_size=1, max_size=20).filter(str.strip),
    "EventType": st.text(alphabet=st.characters(blacklist_categories=["Cc", "Cs"]), min_size=1, max_size=20)
    .filter(str.strip),
    "EventStartUTC": times,
    "EventData": st.dictionaries(st.text(max_size=8), json_values, max_size=4),
})


@SETTINGS
@given(valid_bodies)
def test_a_replay_of_any_accepted_body_changes_nothing(body):
    with tempfile.TemporaryDirectory() as folder:
        conn = eventstore.open_database(Path(folder) / "r.db")
        eventstore.put_program(conn, "FOO", "Foo", 1)
        event = eventstore.validate_event("FOO-1", body)
        with eventstore.write_transaction(conn):
            assert eventstore.put_event(eventstore.Transaction(conn, 1), event) == ("created", 1)
        before = conn.execute("SELECT * FROM events").fetchall()
        # The same content again, as a client might re-send it: re-encoded JSON.
        again = eventstore.validate_event("FOO-1", json.loads(json.dumps(body)))
        with eventstore.write_transaction(conn):
            assert eventstore.put_event(eventstore.Transaction(conn, 2), again) == ("unchanged", 1)
        assert conn.execute("SELECT * FROM events").fetchall() == before
        conn.close()


operations = st.lists(st.tuples(st.sampled_from(["put", "delete", "erase"]), st.integers(0, 3),
                                st.sampled_from(["ann", "bob"]), st.integers(0, 2)), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(operations)
def test_following_next_from_zero_yields_exactly_the_final_state(history):
    with tempfile.TemporaryDirectory() as folder:
        from conftest import Registry
        registry = Registry(Path(folder) / "h.db", auth_cache_seconds=0)
        client = registry.client("writer")
        try:
            for operation, n, member, version in history:
                if operation == "put":
                    client.put_json(f"/events/FOO-{n}", {
                        "ProgramId": "FOO", "ProgramMemberId": member, "EventType": "T",
                        "EventStartUTC": "2026-01-01T00:00:00Z", "EventData": {"v": version}})
                elif operation == "delete":
                    client.delete(f"/events/FOO-{n}", expect_errors=True)
                else:
                    client.delete(f"/programs/FOO/members/{member}")
            served, url = [], "/events?limit=2"
            while True:
                page = client.get(url).json
                served += page["Events"]
                url = page["Next"]
                if not page["HasMore"]:
                    break
            final = {row[0]: row[1:] for row in registry.db.execute(
                "SELECT event_id, seq, revision, deleted FROM events")}
            assert [e["Sequence"] for e in served] == sorted(e["Sequence"] for e in served)
            assert {e["EventId"]: (e["Sequence"], e["Revision"], int(e["Deleted"])) for e in served} == final
            assert len(served) == len(final)
        finally:
            registry.close()


common_times = st.tuples(
    st.integers(1, 9999), st.integers(0, 13), st.integers(0, 32), st.integers(0, 24), st.integers(0, 60),
    st.integers(0, 60), st.sampled_from(["", ".5", ".25", ".123456", ".000000"]),
    st.sampled_from(["", "Z", "+00:00", "-23:59", "+05:30", "+14:00", "+23:59", "-00:01", "+24:00", "+01:60"]),
).map(lambda t: f"{t[0]:04d}-{t[1]:02d}-{t[2]:02d}T{t[3]:02d}:{t[4]:02d}:{t[5]:02d}{t[6]}{t[7]}")


@SETTINGS
@given(common_times)
def test_the_fast_datetime_path_agrees_with_the_general_one(text):
    """parse_datetime reads the common spelling with datetime.fromisoformat; it must
    give what the general parser gives: the same microseconds, or the same error."""
    def outcome(parse):
        try:
            return parse(text)
        except ValueError as exc:
            return str(exc)
    assert outcome(eventstore.parse_datetime) == outcome(eventstore.parse_any_datetime)

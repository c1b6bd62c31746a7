"""docs/API.md §5b: a JSON Schema per event type: validation of every write
path, the proof on the stored data (409, dryRun), versions, bad schemas,
bounded work, the command line, and a server without the validator."""

import json
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import webtest

import eventstore
import eventstore_schemas
from helpers import THREADED_HOST, Registry, basic, create_user, event_body, eventually, opened, run_in_thread

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
SCORE = {"type": "object", "required": ["course", "score"],
         "properties": {"course": {"type": "string"}, "score": {"type": "integer", "minimum": 0, "maximum": 100}}}
DESCRIPTION = "A learner completed a course."


def set_type(client, schema=..., status=200, name="CourseCompleted", query="", **fields):
    body = {"Description": DESCRIPTION, **fields}
    if schema is not ...:
        body["Schema"] = schema
    return client.put_json(f"/event-types/{name}{query}", body, status=status)


def put(client, event_id, data, status=200, event_type="CourseCompleted", **fields):
    return client.put_json(f"/events/{event_id}", event_body(event_id.split("-")[0], EventType=event_type,
                                                            EventData=data, **fields), status=status)


def fields(answer):
    return [error["field"] for error in answer.json.get("errors", [])]


def live_data(client, event_id):
    return client.get(f"/events/{event_id}").json["EventData"]


# --- Registering a schema, and its versions ------------------------------------------

def test_a_type_shows_its_schema_and_version_and_each_version_stays_readable(admin, registry):
    entry = set_type(admin, SCORE).json
    assert (entry["Schema"], entry["SchemaVersion"], entry["RetainDays"]) == (SCORE, 1, None)
    nobody = registry.client("nobody")  # any authenticated user reads types and versions
    assert nobody.get("/event-types/CourseCompleted").json == entry
    assert [e["Schema"] for e in nobody.get("/event-types").json["EventTypes"]] == [SCORE]
    version = nobody.get("/event-types/CourseCompleted/schemas/1").json
    assert version.keys() == {"EventType", "SchemaVersion", "Schema", "CreatedUTC"}
    assert (version["EventType"], version["SchemaVersion"], version["Schema"]) == ("CourseCompleted", 1, SCORE)
    assert version["CreatedUTC"].endswith("Z")
    looser = {**SCORE, "required": ["course"]}
    assert set_type(admin, looser).json["SchemaVersion"] == 2
    assert nobody.get("/event-types/CourseCompleted/schemas/1").json["Schema"] == SCORE
    assert nobody.get("/event-types/CourseCompleted/schemas/2").json["Schema"] == looser
    nobody.get("/event-types/CourseCompleted/schemas/3", status=404)
    nobody.get("/event-types/CourseCompleted/schemas/2175518501", status=404)  # any whole number: one that is not
    nobody.get("/event-types/CourseCompleted/schemas/" + "9" * 30, status=404)
    nobody.get("/event-types/Unknown/schemas/1", status=404)
    assert fields(nobody.get("/event-types/CourseCompleted/schemas/x", status=400)) == ["SchemaVersion"]
    assert fields(nobody.get("/event-types/CourseCompleted/schemas/0", status=400)) == ["SchemaVersion"]
    registry.anonymous.get("/event-types/CourseCompleted/schemas/1", status=401)


def test_versions_count_on_through_null_the_same_schema_and_removal(admin):
    set_type(admin, SCORE)
    reordered = json.loads(json.dumps(SCORE, sort_keys=True))  # the same schema, other key order
    assert set_type(admin, reordered).json["SchemaVersion"] == 1  # equal as canonical JSON: no new version
    removed = set_type(admin, None).json
    assert (removed["Schema"], removed["SchemaVersion"]) == (None, None)
    admin.get("/event-types/CourseCompleted/schemas/1", status=200)  # the version stays
    assert set_type(admin, None).json["SchemaVersion"] is None  # null makes none
    assert set_type(admin, SCORE).json["SchemaVersion"] == 2  # a later schema continues the count
    admin.delete("/event-types/CourseCompleted", status=204)
    admin.get("/event-types/CourseCompleted/schemas/2", status=200)  # versions outlive the type
    again = set_type(admin).json
    assert (again["Schema"], again["SchemaVersion"]) == (None, None)  # registered anew: no schema
    assert set_type(admin, {"type": "object"}).json["SchemaVersion"] == 3


def test_fields_absent_keep_their_value_and_null_description_counts_as_absent(admin):
    set_type(admin, SCORE, RetainDays=30)
    kept = admin.put_json("/event-types/CourseCompleted", {"Description": None}).json
    assert (kept["Description"], kept["Schema"], kept["RetainDays"]) == (DESCRIPTION, SCORE, 30)
    changed = admin.put_json("/event-types/CourseCompleted", {"Description": "Other."}).json
    assert (changed["Description"], changed["Schema"], changed["RetainDays"]) == ("Other.", SCORE, 30)
    assert admin.put_json("/event-types/CourseCompleted", {"RetainDays": None}).json["RetainDays"] is None
    # Registering needs a Description; changing does not.
    answer = admin.put_json("/event-types/New", {"Schema": SCORE}, status=400)
    assert fields(answer) == ["Description"]
    admin.get("/event-types/New", status=404)


# --- Validation of every write ------------------------------------------------------------

def test_a_put_that_does_not_validate_is_a_400_naming_each_violation(admin, writer, registry):
    set_type(admin, SCORE)
    put(writer, "FOO-1", {"course": "CPR-101", "score": 97})
    missing = put(writer, "FOO-2", {"course": "CPR-101"}, status=400)
    assert missing.json["errors"] == [{"field": "EventData/score", "message": "'score' is a required property"}]
    wrong = put(writer, "FOO-2", {"course": 5, "score": 101}, status=400)
    assert sorted(fields(wrong)) == ["EventData/course", "EventData/score"]
    set_type(admin, {"type": "object", "minProperties": 1}, name="Strict")
    assert fields(put(writer, "FOO-3", {}, status=400, event_type="Strict")) == ["EventData"]
    # Among the other 400s of the body.
    mixed = put(writer, "FOO-2", {"course": "CPR-101"}, status=400, EventStartUTC="not a time")
    assert sorted(fields(mixed)) == ["EventData/score", "EventStartUTC"]
    assert registry.row("FOO-2") is None
    pointer = {"type": "object", "properties": {"a/b~c": {"type": "array", "items": {"type": "integer"}}}}
    set_type(admin, pointer, name="Pointers")
    assert fields(put(writer, "FOO-4", {"a/b~c": [1, "x"]}, status=400, event_type="Pointers")) == \
        ["EventData/a~1b~0c/1"]


def test_replays_and_updates_are_validated_too(admin, writer, registry):
    put(writer, "FOO-1", {"course": "CPR-101"})  # before any schema
    put(writer, "FOO-2", {"course": "CPR-101", "score": 1})
    set_type(admin)
    with registry.transaction() as tx:  # a schema set behind the proof's back (as an older version allowed)
        tx.set_type_schema("CourseCompleted", json.dumps(SCORE))
    replay = put(writer, "FOO-1", {"course": "CPR-101"}, status=400)  # the stored content, sent again
    assert fields(replay) == ["EventData/score"]
    assert fields(put(writer, "FOO-2", {"course": "CPR-101"}, status=400)) == ["EventData/score"]  # an update
    assert live_data(writer, "FOO-2") == {"course": "CPR-101", "score": 1}
    writer.delete("/events/FOO-1", status=204)  # deletes and erasures are never validated
    writer.delete("/programs/FOO/members/joebob@example.com", status=200)


def test_a_batch_with_an_item_that_does_not_validate_writes_nothing(admin, writer, registry):
    set_type(admin, SCORE)
    items = [{"EventId": f"FOO-{n}", **event_body(EventData={"course": "c", "score": n})} for n in (1, 2)]
    items.append({"EventId": "FOO-3", **event_body(EventData={"course": "c"})})
    answer = writer.post_json("/events", {"Events": items}, status=400)
    assert answer.json["errors"] == [{"index": 2, "EventId": "FOO-3", "field": "EventData/score",
                                      "message": "'score' is a required property"}]
    assert registry.row("FOO-1") is None
    items[2]["EventData"]["score"] = 3
    items[1]["EventStartUTC"] = "never"  # another 400: both listed
    items[2]["EventData"] = {"course": 7, "score": 3}
    answer = writer.post_json("/events", {"Events": items}, status=400)
    assert [(e["index"], e["field"]) for e in answer.json["errors"]] == [(1, "EventStartUTC"), (2, "EventData/course")]
    items[1]["EventStartUTC"], items[2]["EventData"]["course"] = "2026-03-01T09:30:00Z", "c"
    assert [r["Status"] for r in writer.post_json("/events", {"Events": items}).json["Results"]] == ["created"] * 3


def test_schema_violations_come_after_the_404_of_an_unregistered_program(admin):
    set_type(admin, SCORE)
    answer = put(admin, "NOPE-1", {"course": "c"}, status=404)
    assert "NOPE" in answer.json["detail"]


def test_at_most_100_violations_and_messages_of_at_most_300_characters(admin, writer):
    many = {"type": "object", "additionalProperties": {"type": "integer"}}
    set_type(admin, many, name="Many")
    answer = put(writer, "FOO-1", {f"p{n}": "x" * 1000 for n in range(150)}, status=400, event_type="Many")
    assert len(answer.json["errors"]) == 100
    assert all(len(error["message"]) <= 300 for error in answer.json["errors"])
    assert "the first 100 are listed" in answer.json["detail"]


def test_format_is_an_annotation_only(admin, writer):
    set_type(admin, {"type": "object", "properties": {"email": {"type": "string", "format": "email"}}}, name="F")
    put(writer, "FOO-1", {"email": "not an address"}, event_type="F")


def test_unique_items_compares_as_json_schema_does(admin, writer):
    set_type(admin, {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, name="U")
    put(writer, "FOO-1", {"a": [1, True, "1", [1], {"x": 1}, {"x": True}]}, event_type="U")
    for same in ([1, 1.0], [{"x": 1, "y": [2]}, {"y": [2.0], "x": 1}], [[1, 2], [1, 2]]):
        assert fields(put(writer, "FOO-2", {"a": same}, status=400, event_type="U")) == ["EventData/a"]
    put(writer, "FOO-3", {"a": list(range(50_000))}, event_type="U")  # hashed, not compared pairwise


# --- The proof on the data: 409 and dryRun -------------------------------------------------

def test_a_schema_that_live_events_do_not_meet_is_a_409_and_changes_nothing(admin, writer, registry):
    set_type(admin)
    put(writer, "FOO-ok", {"course": "c", "score": 5})
    put(writer, "FOO-bad1", {"course": "c"})
    put(writer, "FOO-bad2", {"course": 3, "score": "x"})
    put(writer, "FOO-gone", {"course": "c"})
    writer.delete("/events/FOO-gone", status=204)  # tombstones are not proved
    put(admin, "BAR-bad3", {"score": 1})  # every program
    put(writer, "FOO-other", {}, event_type="Other")  # other types are not
    before = registry.dump()
    answer = set_type(admin, SCORE, status=409).json
    assert answer["Total"] == 3
    assert sorted((v["EventId"], v["field"]) for v in answer["Violations"]) == [
        ("BAR-bad3", "EventData/course"), ("FOO-bad1", "EventData/score"), ("FOO-bad2", "EventData/course"),
        ("FOO-bad2", "EventData/score")]
    assert all(v.keys() == {"EventId", "field", "message"} for v in answer["Violations"])
    assert registry.dump() == before
    assert admin.get("/event-types/CourseCompleted").json["SchemaVersion"] is None
    admin.get("/event-types/CourseCompleted/schemas/1", status=404)
    # Registering a new type with a schema is proved too, and does not register it.
    put(writer, "FOO-n", {"x": 1}, event_type="Fresh")
    assert set_type(admin, {"type": "object", "required": ["y"]}, name="Fresh", status=409).json["Total"] == 1
    assert admin.get("/event-types/Fresh").json["Registered"] is False
    # Once the data is mended, it goes through; every live event of the type then validates.
    writer.delete("/programs/FOO/members/joebob@example.com", status=200)
    admin.delete("/programs/BAR/members/joebob@example.com", status=200)
    assert set_type(admin, SCORE).json["SchemaVersion"] == 1


def test_violations_list_at_most_100_and_the_total_counts_every_event(admin, writer):
    set_type(admin)
    items = [{"EventId": f"FOO-{n}", **event_body(EventData={"course": "c", "score": "x"})} for n in range(120)]
    writer.post_json("/events", {"Events": items})
    answer = set_type(admin, SCORE, status=409).json
    assert (answer["Total"], len(answer["Violations"])) == (120, 100)


def test_a_dry_run_reports_and_changes_nothing(admin, writer, registry):
    set_type(admin)
    put(writer, "FOO-bad", {"course": "c"})
    before = registry.dump()
    report = set_type(admin, SCORE, query="?dryRun=true").json
    assert report == {"Compatible": False, "Total": 1, "Violations": [
        {"EventId": "FOO-bad", "field": "EventData/score", "message": "'score' is a required property"}]}
    good = set_type(admin, {"type": "object"}, query="?dryRun=true").json
    assert good == {"Compatible": True, "Violations": [], "Total": 0}
    for body in ({"Description": "x"}, {"Schema": None}):  # no schema, or null: nothing to prove
        assert admin.put_json("/event-types/CourseCompleted?dryRun=true", body).json["Total"] == 0
    assert registry.dump() == before
    # A dry run never registers a type, and validates the body as the PUT would.
    assert set_type(admin, SCORE, name="Unseen", query="?dryRun=true").json["Compatible"] is True
    admin.get("/event-types/Unseen", status=404)
    assert fields(admin.put_json("/event-types/Unseen?dryRun=true", {"Schema": SCORE}, status=400)) == \
        ["Description"]
    assert fields(set_type(admin, [], query="?dryRun=true", status=400)) == ["Schema"]
    assert fields(set_type(admin, SCORE, query="?dryRun=yes", status=400)) == ["dryRun"]
    assert fields(set_type(admin, SCORE, query="?dry=true", status=400)) == ["dry"]
    assert set_type(admin, SCORE, query="?dryRun=false", status=409).json["Total"] == 1


def test_a_write_validates_against_the_version_in_force_when_another_app_changed_it(registry, tmp_path):
    """Two processes on one database: each compiles and keeps versions; a write
    reads its type's version inside its transaction, so the other's change counts at once."""
    other = eventstore.make_app(registry.db_path)
    try:
        admin = registry.client("admin")
        other_admin = webtest.TestApp(other, extra_environ=THREADED_HOST)
        auth = basic("admin", registry.keys["admin"])
        set_type(admin, SCORE)
        body = event_body(EventData={"course": "c", "score": 5})
        other_admin.put_json("/events/FOO-1", body, headers=auth)  # the other app compiles version 1
        other_admin.put_json("/events/FOO-1x", body, headers=auth)
        set_type(admin, {**SCORE, "properties": {**SCORE["properties"], "score": {"type": "integer", "minimum": 5}}})
        low = event_body(EventData={"course": "c", "score": 4})
        answer = other_admin.put_json("/events/FOO-2", low, headers=auth, status=400)
        assert answer.json["errors"][0]["field"] == "EventData/score"
        set_type(admin, None)
        other_admin.put_json("/events/FOO-2", low, headers=auth, status=200)
    finally:
        other.close()


# --- Bad schemas ------------------------------------------------------------------------

@pytest.mark.parametrize("schema, says", [
    ([], "an array"), ("{}", "a string"), (True, "a boolean"), (5, "a number"),
    ({"type": 5}, "metaschema"),
    ({"$schema": "https://json-schema.org/draft/2030-01/schema"}, "accepted drafts"),
    ({"$schema": 7}, "accepted drafts"),
    ({"$ref": "https://example.org/s.json"}, "not internal"),
    ({"properties": {"a": {"$ref": "other.json#/x"}}}, "not internal"),
    ({"$ref": "#/$defs/missing"}, "does not resolve"),
    ({"$dynamicRef": "#nowhere"}, "does not resolve"),
    ({"$defs": {"a": {"$id": "https://example.org/a", "type": "string"}}}, "$id below the root"),
    ({"properties": {"a": {"type": "string", "pattern": "(a)\\1"}}}, "pattern"),
    ({"patternProperties": {"(?=x)y": {}}}, "pattern"),
    ({"properties": {"a": {"pattern": "("}}}, "pattern"),
])
def test_a_bad_schema_is_a_400_naming_schema(admin, schema, says):
    answer = set_type(admin, schema, status=400).json
    assert {error["field"] for error in answer["errors"]} == {"Schema"}
    assert says in answer["detail"] + " ".join(error["message"] for error in answer["errors"])
    admin.get("/event-types/CourseCompleted", status=404)


def test_a_data_ref_inside_const_is_data_and_draft_07_and_2019_09_are_taken(admin, writer):
    set_type(admin, {"type": "object", "properties": {"r": {"const": {"$ref": "http://x/"}}}}, name="C")
    put(writer, "FOO-1", {"r": {"$ref": "http://x/"}}, event_type="C")
    draft7 = {"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"n": {"type": "integer"}},
              "properties": {"n": {"$ref": "#/definitions/n"}}}
    set_type(admin, draft7, name="D7")
    assert fields(put(writer, "FOO-2", {"n": "x"}, status=400, event_type="D7")) == ["EventData/n"]
    recursive = {"$schema": "https://json-schema.org/draft/2019-09/schema", "$recursiveAnchor": True,
                 "type": "object", "additionalProperties": {"$recursiveRef": "#"}}
    set_type(admin, recursive, name="D19")
    put(writer, "FOO-3", {"a": {"b": {}}}, event_type="D19")
    assert fields(put(writer, "FOO-4", {"a": {"b": 1}}, status=400, event_type="D19")) == ["EventData/a/b"]


def test_nothing_is_ever_fetched(admin, writer, monkeypatch):
    fetched = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: fetched.append(args))
    set_type(admin, {"$ref": "http://127.0.0.1:9/schema.json"}, status=400)
    set_type(admin, {"$schema": "https://json-schema.org/draft/2019-09/schema", "type": "object",
                     "properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"type": "string"}}})
    put(writer, "FOO-1", {"a": "x"})
    assert fetched == []


def test_a_schema_too_large_is_refused(registry, admin):
    huge = {"type": "object", "description": "x" * (2 << 20)}  # 2 MB
    answer = set_type(admin, huge, status=413)  # past the body's limit
    assert answer.json["status"] == 413
    roomy = webtest.TestApp(eventstore.make_app(registry.db_path, max_body_bytes=8 << 20),
                            extra_environ=THREADED_HOST)
    try:
        answer = roomy.put_json("/event-types/CourseCompleted", {"Description": "d", "Schema": huge},
                                headers=basic("admin", registry.keys["admin"]), status=400)
        assert fields(answer) == ["Schema"] and "bytes" in answer.json["errors"][0]["message"]
    finally:
        roomy.app.close()


def test_a_schema_nested_too_deeply_is_a_400(admin):
    deep = {"type": "object"}
    for _ in range(300):
        deep = {"properties": {"a": deep}}
    answer = set_type(admin, deep, status=400)
    assert fields(answer) == ["Schema"] and "64 levels" in answer.json["errors"][0]["message"]
    ok = {"type": "object"}
    for _ in range(30):
        ok = {"type": "object", "properties": {"a": ok}}
    set_type(admin, ok)


@pytest.mark.parametrize("days", [0, 36501, -1, 1.5, True, "3", 36501.0])
def test_retain_days_out_of_range_is_a_400(admin, days):
    assert fields(set_type(admin, RetainDays=days, status=400)) == ["RetainDays"]


def test_retain_days_as_a_whole_number_with_a_fraction_is_taken(admin):
    """532.0 is an integer as JSON Schema (and openapi.json, and a generated client) count it."""
    assert set_type(admin, RetainDays=532.0).json["RetainDays"] == 532


def test_an_unknown_field_is_a_400(admin):
    assert fields(set_type(admin, Schemas={}, status=400)) == ["Schemas"]


# --- Bounded work --------------------------------------------------------------------------

def test_backtracking_patterns_run_in_linear_time(admin, writer):
    """Python's re takes seconds for 25 characters here (doubling with each one);
    RE2 does a megabyte of them at once."""
    set_type(admin, {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}},
                     "patternProperties": {"^(b+)+$": {"type": "integer"}},
                     "additionalProperties": {"type": "string", "pattern": "(x+x+)+y"}}, name="P")
    assert fields(put(writer, "FOO-1", {"s": "a" * 100_000 + "!"}, status=400, event_type="P")) == ["EventData/s"]
    key = "b" * 50_000 + "!"  # not matched by patternProperties: additionalProperties applies
    assert fields(put(writer, "FOO-2", {key: "x" * 50_000}, status=400, event_type="P")) == [f"EventData/{key}"]
    put(writer, "FOO-3", {"s": "a" * 100_000, "b" * 10: 1, "z": "xxy"}, event_type="P")


def test_a_schema_that_blows_up_is_refused_per_event_not_hung(admin, writer):
    """Each level doubles the work: 2^30 evaluations for one event, past the budget."""
    levels = {f"l{n}": {"allOf": [{"$ref": f"#/$defs/l{n + 1}"}, {"$ref": f"#/$defs/l{n + 1}"}]} for n in range(30)}
    levels["l30"] = {"type": "object"}
    set_type(admin, {"$defs": levels, "$ref": "#/$defs/l0"}, name="Boom")
    answer = put(writer, "FOO-1", {"a": 1}, status=400, event_type="Boom")
    assert fields(answer) == ["EventData"] and "steps" in answer.json["errors"][0]["message"]
    endless = {"$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}
    set_type(admin, endless, name="Endless")
    assert fields(put(writer, "FOO-2", {}, status=400, event_type="Endless")) == ["EventData"]



# --- The fast pass (eventstore_schemas.fast_pass): valid means what jsonschema says ------------

FAST_SCHEMAS = [
    SCORE,
    {"type": ["integer", "null"], "exclusiveMinimum": -1, "exclusiveMaximum": 10, "multipleOf": 2},
    {"type": "number", "minimum": 0.5, "maximum": 1e300},
    {"type": "string", "minLength": 2, "maxLength": 3, "pattern": "^a", "format": "email", "title": "t"},
    {"$schema": "http://json-schema.org/draft-07/schema#", "type": "integer", "enum": [1, 2.0, True]},
    {"$schema": "https://json-schema.org/draft/2019-09/schema", "const": {"a": [1, False]}},
    {"type": "object", "required": ["a"], "minProperties": 1, "maxProperties": 2, "dependentRequired": {"a": ["b"]},
     "properties": {"a": True, "b": False, "c": {}, "d": {"properties": {"e": {"type": "array", "uniqueItems": True,
                                                                              "maxItems": 3, "minItems": 1}}}},
     "$defs": {"unused": {"$ref": "#"}}, "x-unknown": {"$ref": "#"}},
    {},
]
FAST_INSTANCES = [None, True, False, 0, 1, -1, 2, 1.0, 2.0, 0.5, -0.0, 1e301, 10**40, float("nan"), float("inf"),
                  "", "a", "ab", "abc", "abcd", "b😀", "😀😀😀", [], [1, 1.0], [1, True],
                  {}, {"a": 1}, {"a": 1, "b": 2}, {"b": 2}, {"c": None}, {"a": [1, False]}, {"d": {"e": [1, 1]}},
                  {"d": {"e": [1, 2]}}, {"d": {"e": []}}, {"d": 5}, {"course": "x", "score": 0},
                  {"course": "x", "score": 100.0}, {"course": "x", "score": 101}, {"course": "x", "score": -1},
                  {"course": "x", "score": True}, {"course": 1, "score": 5}, {"course": "x"}, {"score": 5}]


@pytest.mark.parametrize("schema", FAST_SCHEMAS)
def test_the_fast_pass_finds_valid_exactly_what_jsonschema_finds_valid(schema):
    """The fast pass answers for most events (eventstore_schemas.fast_pass): it must
    find valid what jsonschema's own validator finds valid, and nothing else."""
    import jsonschema
    compiled = eventstore_schemas.CompiledSchema(schema)
    assert compiled.valid is not None  # these schemas are all ones the fast pass takes
    reference = jsonschema.validators.validator_for(schema)(schema)
    for instance in FAST_INSTANCES:
        assert compiled.valid(instance) == reference.is_valid(instance), (schema, instance)
        assert (compiled.violations(instance) == []) == reference.is_valid(instance), (schema, instance)


@pytest.mark.parametrize("schema", [
    {"type": "object", "additionalProperties": {"type": "string"}},
    {"type": "array", "items": {"type": "integer"}},
    {"properties": {"a": {"allOf": [{"type": "string"}]}}},
    {"$defs": {"s": {"type": "string"}}, "properties": {"a": {"$ref": "#/$defs/s"}}},
    {"type": "object", "patternProperties": {"^a": {"type": "integer"}}},
])
def test_a_schema_the_fast_pass_does_not_take_is_left_to_jsonschema(schema):
    """Keywords whose work grows with the event (items, additionalProperties...) or that
    follow references count against the budget: jsonschema runs those, with it."""
    assert eventstore_schemas.CompiledSchema(schema).valid is None


def test_a_schema_that_could_reach_the_step_budget_gets_no_fast_pass(monkeypatch):
    """The fast pass keeps no budget: it is only taken where the schema's own size
    bounds an event's steps below MAX_STEPS."""
    assert eventstore_schemas.CompiledSchema(SCORE).valid is not None
    monkeypatch.setattr(eventstore_schemas, "MAX_STEPS", 2)
    assert eventstore_schemas.CompiledSchema(SCORE).valid is None
    compiled = eventstore_schemas.CompiledSchema({"properties": {"a": {"properties": {"b": {"type": "string"}}}}})
    assert compiled.valid is None
    assert "steps" in compiled.violations({"a": {"b": "x"}})[0]["message"]  # and the budget still stops the rest


D7, D2019, D2020 = ("http://json-schema.org/draft-07/schema#", "https://json-schema.org/draft/2019-09/schema",
                    "https://json-schema.org/draft/2020-12/schema")


def test_a_subschema_naming_another_draft_is_decided_by_that_draft():
    """jsonschema validates a subschema with its own $schema by that draft's rules:
    here draft 2020-12's dependentRequired inside a draft-07 schema (draft-07 has no
    such keyword). The fast pass knew only the root's draft and found valid."""
    schema = {"$schema": D7, "properties": {"a": {"$schema": D2020, "dependentRequired": {"x": ["y"]}}}}
    eventstore_schemas.check_schema(schema, len(json.dumps(schema)))  # a schema that can be set
    compiled = eventstore_schemas.CompiledSchema(schema)
    assert [e["field"] for e in compiled.violations({"a": {"x": 1}})] == ["EventData/a/y"]
    assert compiled.violations({"a": {"x": 1, "y": 2}}) == []
    inverse = {"properties": {"a": {"$schema": D7, "dependentRequired": {"x": ["y"]}}}}
    assert eventstore_schemas.CompiledSchema(inverse).violations({"a": {"x": 1}}) == []


def test_a_subschema_naming_its_own_draft_still_counts_steps():
    """jsonschema gives a subschema with its own $schema its draft's plain validator
    class; the budget must hold there too (2**16 evaluations for a string)."""
    defs = {f"d{i}": {"$schema": D2020, "allOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"$ref": f"#/$defs/d{i + 1}"}]}
            for i in range(16)}
    schema = {"$defs": {**defs, "d16": {"type": "string"}}, "$ref": "#/$defs/d0"}
    eventstore_schemas.check_schema(schema, len(json.dumps(schema)))
    assert "steps" in eventstore_schemas.CompiledSchema(schema).violations("x")[0]["message"]


def test_multiple_of_a_float_for_an_integer_past_float_range_is_an_answer_not_an_error(admin, writer):
    """jsonschema 4.26's multipleOf divides a huge integer by a float divisor outside its
    overflow fallback (OverflowError: a 500); it is decided as that fallback does."""
    compiled = eventstore_schemas.CompiledSchema({"multipleOf": 0.5})
    assert compiled.violations(10 ** 400) == [] and compiled.valid(10 ** 400)
    assert compiled.violations(10 ** 400 + 1) == []  # every integer is a multiple of 0.5
    thirds = eventstore_schemas.CompiledSchema({"multipleOf": 0.3})  # the float 0.3 is not 3/10
    assert [e["field"] for e in thirds.violations(10 ** 400)] == ["EventData"] and not thirds.valid(10 ** 400)
    set_type(admin, {"properties": {"n": {"multipleOf": 0.1}}})
    answer = put(writer, "FOO-1", {"n": 10 ** 400}, status=400)
    assert fields(answer) == ["EventData/n"]


# The differential property test: schemas of the keywords the fast pass takes (and a few it
# does not), on every draft, against values at the edges; its verdict must be jsonschema's.
# HYPOTHESIS_PROFILE=thorough runs many more.

FAST_NAMES = ["a", "b", "é", "😀"]
FAST_NUMBERS = [0, 1, -1, 2, 3, 7, 1.0, 2.0, -0.0, 0.0, 0.1, 0.01, 0.3, 0.30000000000000004, 1.5, 2.5, 1e308, -1e308,
                1e-300, 2 ** 53, 2 ** 53 + 1, 9007199254740992.0, 10 ** 30, 1e30, 10 ** 400, -(10 ** 400)]
FAST_STRINGS = ["", "a", "ab", "abc", "é", "e\u0301", "\u0301", "😀", "😀😀", "a😀", "aé", "\n", "a\nb", "1", "A",
                "ä", "日本"]
FAST_PATTERNS = ["^a", "a$", "^a$", "^$", "^.$", "^..$", "\\d", "^\\p{L}+$", "é", "e\u0301", "😀", "^[😀a]+$",
                 "(?i)^a", "^\\w*$", "\\Aa", "a\\z", "^(a|ab)$", "[^a]"]
FAST_TYPES = ["null", "boolean", "integer", "number", "string", "array", "object"]


def _fast_pass_strategies():
    from hypothesis import strategies as st

    edges = st.sampled_from(FAST_NUMBERS)
    numbers = st.one_of(edges, edges, edges, st.integers(), st.floats(allow_nan=False, allow_infinity=False))
    strings = st.sampled_from(FAST_STRINGS) | st.text(st.sampled_from("ae😀\u0301日1"), max_size=4)
    scalars = st.none() | st.booleans() | numbers | strings
    values = st.recursive(scalars, lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(FAST_NAMES), children, max_size=3), max_leaves=8)
    names = st.sampled_from(FAST_NAMES)
    sizes = st.sampled_from([0, 1, 2, 3, 2.0])
    positive = st.sampled_from([0.1, 0.01, 0.5, 1, 2, 3, 1.5, 1e-300, 1e308, 2 ** 53 + 1, 10 ** 30, 7.0]) | \
        st.floats(min_value=1e-6, max_value=1e6) | st.integers(min_value=1, max_value=10 ** 20)
    leaf = {
        "type": st.sampled_from(FAST_TYPES) | st.lists(st.sampled_from(FAST_TYPES), min_size=1, max_size=3,
                                                        unique=True),
        "required": st.lists(names, max_size=4),  # duplicates too (the metaschema refuses them; same verdict)
        "minimum": numbers, "maximum": numbers, "exclusiveMinimum": numbers, "exclusiveMaximum": numbers,
        "multipleOf": positive, "minLength": sizes, "maxLength": sizes, "pattern": st.sampled_from(FAST_PATTERNS),
        "enum": st.lists(values, min_size=1, max_size=4), "const": values,
        "minItems": sizes, "maxItems": sizes, "uniqueItems": st.booleans(),
        "minProperties": sizes, "maxProperties": sizes,
        "dependentRequired": st.dictionaries(names, st.lists(names, max_size=2), max_size=2),
        "format": st.sampled_from(["email", "date", "uri", "regex"]),
        "title": strings, "description": strings, "default": values, "examples": st.lists(values, max_size=2),
        "deprecated": st.booleans(), "readOnly": st.booleans(), "writeOnly": st.booleans(), "$comment": strings,
        "contentEncoding": st.just("base64"), "contentMediaType": st.just("application/json"),
        "x-unknown": values, "$defs": st.just({"unused": {"type": "string"}}),
        # Keywords the fast pass leaves to jsonschema (the whole path must still say what it says);
        # a subschema's own $schema switches jsonschema to that draft (the root's is set below).
        "items": st.just({"type": "integer"}), "$schema": st.sampled_from([D7, D2019, D2020]),
    }
    rare = {"items"}
    ASSERTIONS = ["type", "required", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
                  "minLength", "maxLength", "pattern", "enum", "const", "uniqueItems", "dependentRequired", "minItems",
                  "maxItems", "minProperties", "maxProperties"] * 3

    def subschema(children):
        # A subschema naming its own draft, with the keyword only some drafts have:
        switched = st.fixed_dictionaries({"$schema": leaf["$schema"], "dependentRequired": leaf["dependentRequired"]})

        def build(chosen):
            return st.fixed_dictionaries({}, optional={k: v for k, v in leaf.items() if k in chosen}) | \
                st.fixed_dictionaries({"properties": st.dictionaries(names, st.sampled_from(
                    [children] * 3 + [switched]).flatmap(lambda child: child), max_size=3)},
                                      optional={k: v for k, v in leaf.items() if k in chosen})
        common = st.lists(st.sampled_from(sorted(leaf.keys() - rare) + ASSERTIONS), max_size=5, unique=True)
        with_rare = st.lists(st.sampled_from(sorted(leaf.keys())), max_size=5, unique=True)
        return st.sampled_from([common] * 7 + [with_rare]).flatmap(lambda keys: keys).flatmap(build)

    def leafy(chosen_keys):
        return st.fixed_dictionaries({}, optional={k: leaf[k] for k in chosen_keys})
    base = st.booleans() | st.lists(st.sampled_from(sorted(leaf.keys() - rare) + ASSERTIONS), max_size=4,
                                    unique=True).flatmap(leafy) | \
        st.lists(st.sampled_from(ASSERTIONS), min_size=1, max_size=3, unique=True).flatmap(leafy)
    schemas = st.recursive(base, subschema, max_leaves=6).filter(lambda s: isinstance(s, dict))
    drafts = st.sampled_from([None, D7, D7.rstrip("#"), D2019, D2020, D2020 + "#"])
    roots = st.tuples(drafts, schemas).map(
        lambda pair: {**pair[1], "$schema": pair[0]} if pair[0] else {k: v for k, v in pair[1].items()
                                                                       if k != "$schema"})
    arrays = st.lists(st.sampled_from([1, 1.0, True, 0, -0.0, False, "a", None, [1], [1.0], [True], {"a": 1},
                                       {"a": 1.0}, {"a": True}, {"a": 1, "b": 2}, {"b": 2, "a": 1}]), max_size=4)

    def aimed_at(schema):
        """Values aimed at ``schema``: its property names, its bounds and constants and
        their twins (1, 1.0, true; a number past float range), beside any value."""
        if not isinstance(schema, dict):
            return values
        options = [values, arrays]
        properties = schema.get("properties")
        if isinstance(properties, dict) and properties:
            named = st.fixed_dictionaries({}, optional={name: aimed_at(child) for name, child in properties.items()})
            options += [st.tuples(named, st.dictionaries(names, values, max_size=2)).map(
                lambda pair: {**pair[1], **pair[0]})] * 3
        near = [twin for keyword in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
                if isinstance(schema.get(keyword), (int, float)) for twin in _twins(schema[keyword])]
        near += [twin for value in schema.get("enum", []) if isinstance(schema.get("enum"), list)
                 for twin in _twins(value)] + (_twins(schema["const"]) if "const" in schema else [])
        if near:
            options += [st.sampled_from(near)] * 8
        if schema.keys() & {"pattern", "minLength", "maxLength"}:
            options += [strings] * 3
        lengths = [int(schema[keyword]) + step for keyword in ("minLength", "maxLength")
                   if isinstance(schema.get(keyword), (int, float)) for step in (-1, 0, 1)]
        if lengths:  # astral characters and combining marks: one code point each (UTF-16 would say two)
            options += [st.tuples(st.sampled_from([n for n in lengths if n >= 0]),
                                  st.sampled_from(["a", "😀", "\u0301", "é", "e\u0301"]))
                        .map(lambda pair: pair[1] * pair[0])] * 4
        if schema.keys() & {"uniqueItems", "minItems", "maxItems"}:
            options += [arrays] * 2
        if "type" in schema:
            options += [st.sampled_from([None, True, False, 0, 1, 1.0, -0.0, 1.5, 10 ** 400, 2 ** 53 + 1, 1e308,
                                         "", "1", [], [1], {}, {"a": 1}])] * 2
        wanted = [name for name in schema.get("required", []) if isinstance(name, str)] + \
            [name for pair in schema.get("dependentRequired", {}).items() for name in [pair[0], *pair[1]]]
        if wanted:
            options += [st.dictionaries(st.sampled_from(wanted), values, min_size=1, max_size=3)] * 3
        triggers = [name for name, needed in schema.get("dependentRequired", {}).items() if needed]
        if triggers:
            options += [st.sampled_from(triggers).map(lambda name: {name: 0})] * 3  # without what it needs
        if schema.keys() & {"minProperties", "maxProperties"}:
            options += [st.dictionaries(names, values, max_size=4)] * 2
        return st.sampled_from(options).flatmap(lambda chosen: chosen)  # repeated: weighted
    return roots.flatmap(lambda schema: st.tuples(st.just(schema), st.lists(aimed_at(schema), min_size=4,
                                                                              max_size=12)))


def _twins(value):
    """``value`` and values jsonschema might confuse with it or that sit at its edge."""
    if isinstance(value, bool):
        return [value, int(value), float(value)]
    if isinstance(value, (int, float)):
        twins = [value, True, False, 10 ** 400, -10 ** 400, 10 ** 400 * 3]
        for make in (lambda: -value, lambda: value * 2, lambda: value * 3, lambda: value / 2, lambda: value + 1,
                     lambda: value - 1, lambda: float(value), lambda: int(value), lambda: float(value) + 1):
            try:
                twins.append(make())
            except (OverflowError, ValueError):
                pass  # no such number
        return [twin for twin in twins if not isinstance(twin, float) or abs(twin) != float("inf")]
    if isinstance(value, list):
        return [value, [_twins(item)[-1] for item in value], value[::-1], [value]]
    if isinstance(value, dict):
        return [value, dict(reversed(list(value.items()))), {name: _twins(item)[-1] for name, item in value.items()}]
    return [value]


def _jsonschema_with_the_overrides(monkeypatch):
    """The reference: jsonschema's own validator classes, with only the module's two
    documented keyword overrides (uniqueItems by hashing: jsonschema's sorted
    comparison finds [[true], [1], [true]] unique; multipleOf past float range),
    in every draft's class (a subschema's own $schema picks its draft's class),
    and none of the fast pass's or the budget's machinery."""
    from fractions import Fraction

    import jsonschema
    toolkit = eventstore_schemas.packages()

    def multiple_of(validator, divisor, instance, schema):
        try:
            yield from jsonschema._keywords.multipleOf(validator, divisor, instance, schema)
        except OverflowError:  # what jsonschema's own fallback decides, past its division
            if (Fraction(instance) / Fraction(divisor)).denominator != 1:
                yield jsonschema.ValidationError("not a multiple")
    for name in eventstore_schemas.DRAFTS.values():
        keywords = getattr(jsonschema, name).VALIDATORS
        monkeypatch.setitem(keywords, "uniqueItems", toolkit._unique_items)
        monkeypatch.setitem(keywords, "multipleOf", multiple_of)
    return lambda schema: getattr(jsonschema, eventstore_schemas.DRAFTS[eventstore_schemas.draft_of(schema)])(schema)


def _fast_pass_profile():
    import os

    from hypothesis import HealthCheck, settings
    settings.register_profile("fast-pass", max_examples=1000, deadline=None, derandomize=True, database=None,
                              suppress_health_check=list(HealthCheck))
    settings.register_profile("thorough", max_examples=20_000, deadline=None, database=None,
                              suppress_health_check=list(HealthCheck))
    return settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast-pass"))


def test_the_fast_pass_decides_as_jsonschema_for_generated_schemas_and_values(monkeypatch):
    """The fast pass's verdict is jsonschema's; so is the whole path's (fast pass, then
    jsonschema with the budget for what it refuses or does not take)."""
    import collections

    from hypothesis import example, given
    cases = _fast_pass_strategies()
    reference_for = _jsonschema_with_the_overrides(monkeypatch)
    reached = collections.Counter()  # (keyword, its verdict): every one must be reached both ways
    fast_leaf = eventstore_schemas._fast_leaf

    def counted_leaf(keyword, *rest):
        check = fast_leaf(keyword, *rest)

        def counted(instance):
            verdict = check(instance)
            reached[keyword, verdict] += 1
            return verdict
        return counted
    monkeypatch.setattr(eventstore_schemas, "_fast_leaf", counted_leaf)

    @_fast_pass_profile()
    @given(cases)
    # The edges, every run, beside what is generated: lengths count code points (an astral
    # character and a combining mark are one each); number twins; a subschema's own draft.
    @example(({"maxLength": 1, "minLength": 1}, ["😀", "😀😀", "e\u0301", "\u0301", "", "a"]))
    @example(({"multipleOf": 0.1, "maximum": 1e308}, [10 ** 400, 0.30000000000000004, 0.3, 1e308, True, 2 ** 53]))
    @example(({"exclusiveMinimum": 1, "exclusiveMaximum": 2 ** 53 + 1}, [1, 1.0, True, 2 ** 53, float(2 ** 53 + 1)]))
    @example(({"$schema": D7, "properties": {"a": {"$schema": D2020, "dependentRequired": {"x": ["y"]}}}},
              [{"a": {"x": 1}}, {"a": {"x": 1, "y": 2}}]))
    @example(({"uniqueItems": True, "type": ["integer", "array"]},
              [[1, 1.0], [1, True], [[1], [True]], [[True], [1], [True]], [{"a": 1, "b": 2}, {"b": 2, "a": 1.0}], 1.0,
               True]))
    @example(({"enum": [1, [1.0], {"a": True}], "required": ["a", "a"], "pattern": "^\\p{L}$"},
              [1.0, True, [1], [True], {"a": 1}, {"a": True}, "é", "e\u0301"]))
    @example(({"dependentRequired": {"a": ["b"]}, "minProperties": 1, "maxProperties": 1, "minItems": 1,
               "maxItems": 1, "minimum": 0, "maximum": 1, "const": 1},
              [{"a": 1}, {"a": 1, "b": 2}, {}, [], [1, 2], [1], -1, 2, 1.0, True]))
    def check(case):
        schema, values = case
        compiled = eventstore_schemas.CompiledSchema(schema)
        reference = reference_for(schema)
        for value in values:
            expected = reference.is_valid(value)
            if compiled.valid is not None:
                assert compiled.valid(value) == expected, (schema, value)
            assert (compiled.violations(value) == []) == expected, (schema, value)
    check()
    keywords = {"type", "required", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
                "maxLength", "multipleOf", "pattern", "enum", "const", "uniqueItems", "minItems", "maxItems",
                "minProperties", "maxProperties", "dependentRequired"}
    assert {(keyword, verdict) for keyword in keywords for verdict in (True, False)} - reached.keys() == set()


# --- Routes: %2F in a type's name ------------------------------------------------------------

def test_a_percent_encoded_slash_never_separates_segments(admin, registry):
    admin.put_json("/event-types/a%2Fschemas%2F1", {"Description": "d", "Schema": SCORE},  # the type "a/schemas/1"
                   extra_environ={"REQUEST_URI": "/event-types/a%2Fschemas%2F1"})
    # Literal segments name a version, whatever the decoded path would say: PUT there is not allowed.
    admin.put_json("/event-types/a/schemas/1", {"Description": "d"}, status=405)
    set_type(admin, {"type": "object"}, name="a")
    raw = {"REQUEST_URI": "/event-types/a%2Fschemas%2F1"}
    assert admin.get("/event-types/a%2Fschemas%2F1", extra_environ=raw).json["EventType"] == "a/schemas/1"
    version = admin.get("/event-types/a/schemas/1", extra_environ={"REQUEST_URI": "/event-types/a/schemas/1"}).json
    assert (version["EventType"], version["Schema"]) == ("a", {"type": "object"})
    named = admin.get("/event-types/a%2Fschemas%2F1/schemas/1",
                      extra_environ={"REQUEST_URI": "/event-types/a%2Fschemas%2F1/schemas/1"}).json
    assert (named["EventType"], named["Schema"]) == ("a/schemas/1", SCORE)
    # A host that gives only the decoded path (wsgiref; README, "%2F in a name") cannot tell them apart.
    assert admin.get("/event-types/a%2Fschemas%2F1").json["EventType"] == "a"


# --- Without the validator's packages ----------------------------------------------------------

def test_without_jsonschema_types_without_a_schema_still_work_and_others_get_503(registry, admin, monkeypatch):
    set_type(admin, SCORE)
    monkeypatch.setattr(eventstore_schemas, "_loaded", None)
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # import jsonschema now fails
    app = eventstore.make_app(registry.db_path)  # a new process: nothing compiled yet
    try:
        client = webtest.TestApp(app, extra_environ=THREADED_HOST)
        auth = basic("admin", registry.keys["admin"])
        client.put_json("/events/FOO-1", event_body(EventType="Other"), headers=auth, status=200)
        refused = client.put_json("/events/FOO-2", event_body(EventData={"course": "c", "score": 1}),
                                  headers=auth, status=503)
        assert "jsonschema" in refused.json["detail"]
        batch = {"Events": [{"EventId": "FOO-3", **event_body()}]}
        assert "jsonschema" in client.post_json("/events", batch, headers=auth, status=503).json["detail"]
        answer = client.put_json("/event-types/New", {"Description": "d", "Schema": {"type": "object"}},
                                 headers=auth, status=503)
        assert "jsonschema" in answer.json["detail"]
        client.put_json("/event-types/New", {"Description": "d"}, headers=auth, status=200)
        assert registry.row("FOO-2") is None and registry.row("FOO-3") is None
    finally:
        app.close()


# --- The worked example: an Open Badges 3.0 AchievementCredential ----------------------------------

def test_the_open_badges_example_of_docs_api(admin, writer):
    schema = json.loads((EXAMPLES / "achievement-credential.schema.json").read_text())
    credential = json.loads((EXAMPLES / "achievement-credential.json").read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2019-09/schema"
    admin.put_json("/event-types/BadgeAwarded", {"Description": "A badge awarded, as an Open Badges 3.0 "
                                                                "AchievementCredential.", "Schema": schema})
    put(writer, "FOO-badge-1", credential, event_type="BadgeAwarded")
    assert live_data(writer, "FOO-badge-1") == credential
    del credential["credentialSubject"]
    answer = put(writer, "FOO-badge-2", credential, status=400, event_type="BadgeAwarded")
    assert fields(answer) == ["EventData/credentialSubject"]


def test_the_example_is_the_one_docs_api_shows():
    text = (EXAMPLES.parent.parent / "docs/API.md").read_text()
    assert "examples/achievement-credential.schema.json" in text and "EventData/credentialSubject" in text


# --- The command line and import ---------------------------------------------------------------

def test_type_add_with_a_schema_dry_run_retain_days_and_show(cli, tmp_path):
    schema_file = tmp_path / "score.json"
    schema_file.write_text(json.dumps(SCORE))
    cli("program", "add", "FOO")
    cli("type", "add", "CourseCompleted", "--description", DESCRIPTION)
    lines = tmp_path / "events.jsonl"
    lines.write_text(json.dumps({"EventId": "FOO-1", **event_body(EventData={"course": "c"})}) + "\n")
    cli("import", str(lines))
    out, err = cli("type", "add", "CourseCompleted", "--schema", str(schema_file), "--dry-run", status=1)
    assert json.loads(out)["Total"] == 1 and "nothing was changed" in err
    _, err = cli("type", "add", "CourseCompleted", "--schema", str(schema_file), status=1)
    assert "FOO-1: EventData/score" in err
    assert json.loads(cli("type", "show", "CourseCompleted")[0])["Schema"] is None
    lines.write_text(json.dumps({"EventId": "FOO-1", **event_body(EventData={"course": "c", "score": 1})}) + "\n")
    cli("import", str(lines))
    out, _ = cli("type", "add", "CourseCompleted", "--schema", str(schema_file), "--dry-run")
    assert json.loads(out)["Compatible"] is True
    _, err = cli("type", "add", "CourseCompleted", "--schema", str(schema_file), "--retain-days", "400")
    assert "schema version 1" in err and "400 days" in err
    shown = json.loads(cli("type", "show", "CourseCompleted")[0])
    assert (shown["Schema"], shown["SchemaVersion"], shown["RetainDays"]) == (SCORE, 1, 400)
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": 5}')
    assert "--schema" in cli("type", "add", "CourseCompleted", "--schema", str(bad), status=1)[1]
    assert "no event type" in cli("type", "show", "Nope", status=1)[1]


def test_import_checks_every_line_against_the_schema_before_applying_any(cli, tmp_path):
    schema_file = tmp_path / "score.json"
    schema_file.write_text(json.dumps(SCORE))
    cli("program", "add", "FOO")
    cli("type", "add", "CourseCompleted", "--description", DESCRIPTION, "--schema", str(schema_file))
    lines = tmp_path / "events.jsonl"
    lines.write_text("\n".join(json.dumps({"EventId": f"FOO-{n}", **event_body(EventData=data)}) for n, data in
                               enumerate([{"course": "c", "score": 1}, {"course": "c"}, {"course": "c", "score": 2}],
                                         1)) + "\n")
    _, err = cli("import", str(lines), "--batch", "1", status=1)  # a transaction a line: only the check stops line 1
    assert "line 2: EventData/score" in err
    with opened(cli.db) as session:
        assert session.read_event("FOO-1") is None


# --- The database's upgrade --------------------------------------------------------------------

def test_a_version_2_database_is_upgraded(db, registry):
    """Down to version 2 (no schema, retention or lease tables or columns), then opened."""
    sql = registry.sql
    with registry.transaction() as tx:
        tx.register_event_type("Kept", "Kept across the upgrade.")
    for statement in ("DROP INDEX events_by_age", "DROP TABLE event_type_schemas", "DROP TABLE leases",
                      "DROP TABLE sweeps", "ALTER TABLE event_types DROP COLUMN schema_version",
                      "ALTER TABLE event_types DROP COLUMN retain_days"):
        sql.execute(statement)
    if registry.storage.backend == "sqlite":
        sql.execute("PRAGMA user_version = 2")
    else:
        sql.execute("UPDATE eventstore_schema SET version = 2")
    for schema in (None, {"type": "object"}):  # opened twice: the upgrade is idempotent
        app = eventstore.make_app(db)
        try:
            client = webtest.TestApp(app, extra_environ=THREADED_HOST)
            auth = basic("admin", registry.keys["admin"])
            assert client.get("/health").json["schemaVersion"] == eventstore.SCHEMA_VERSION
            entry = client.get("/event-types/Kept", headers=auth).json
            assert (entry["Description"], entry["Schema"], entry["RetainDays"]) == ("Kept across the upgrade.",
                                                                                    schema, schema and 9)
            client.put_json("/event-types/Kept", {"Schema": {"type": "object"}, "RetainDays": 9}, headers=auth)
        finally:
            app.close()
    create_user(db, "after", {}, is_system=True)


def test_a_write_grouped_after_a_change_of_its_rules_follows_the_change(db):
    """Group commit runs the writes queued meanwhile in one transaction: a write
    of a type queued behind a new schema of that type is validated against the new
    one (it was checked against the old one and stored), and a write queued behind
    its program's switch to registered types only follows the switch."""
    registry = Registry(db, max_waiting_writes=100)  # all five wait, however long the held one takes
    try:
        rules_change_within_one_group(registry)
    finally:
        registry.close()


def rules_change_within_one_group(registry):
    admin, writer = registry.client("admin"), registry.client("writer")
    set_type(admin, {"type": "object"})
    for client in (admin, writer):  # their keys' last use is recorded now, not in the group
        client.get("/programs")
    eventually(lambda: not registry.app.writer.waiting, "the last uses recorded")
    gate, holding = threading.Event(), threading.Event()
    held = run_in_thread(lambda: registry.app.write(lambda tx: (holding.set(), gate.wait(30)),
                                                    touched=lambda _: False, seqs=0))
    assert holding.wait(10), "the writer is held"
    try:
        queued = []
        for change in (lambda: put(writer, "FOO-1", {"course": "CPR-101", "score": 1}, status="*"),
                       lambda: set_type(admin, SCORE, status="*"),
                       lambda: put(writer, "FOO-2", {"course": "CPR-101", "score": "high"}, status="*"),
                       lambda: admin.put_json("/programs/FOO", {"Name": "Foo", "RegisteredEventTypesOnly": True},
                                              status="*"),
                       lambda: put(writer, "FOO-3", {"course": "CPR-101", "score": 3}, event_type="Unregistered",
                                   status="*")):
            queued.append(run_in_thread(change))
            eventually(lambda: registry.app.writer.waiting == len(queued), f"write {len(queued)} queued behind the one before")
    finally:
        gate.set()
    held()
    first, schema, second, strict, third = [answer() for answer in queued]
    assert (first.status_int, schema.status_int, strict.status_int) == (200, 200, 200)
    assert second.status_int == 400 and fields(second) == ["EventData/score"]
    assert third.status_int == 400 and fields(third) == ["EventType"]
    assert registry.row("FOO-2") is None and registry.row("FOO-3") is None

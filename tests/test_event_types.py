"""docs/API.md §5a: the event-type catalogue, its live counts, programs that take
registered types only, the command line, and the upgrade of a version-1 database."""

import json
import random
import shutil
import threading
from pathlib import Path

import pytest
import webtest

import eventstore
import eventstore_sqlite
import eventstore_admin
from helpers import basic, create_user, event_body, open_sqlite, opened, run_in_thread

DATA = Path(__file__).resolve().parent / "data"
DESCRIPTION = "A learner completed every module of a course."


def counts(db):
    """The kept counts, as {(type, program): n} (zero rows left out)."""
    return {(t, p): n for t, p, n in db.execute(
        "SELECT event_type, program_id, events FROM event_type_counts WHERE events > 0")}


def recount(db):
    """The same counted from the events themselves: what the kept counts must equal."""
    return {(t, p): n for t, p, n in db.execute(
        "SELECT event_type, program_id, COUNT(*) FROM events WHERE deleted = FALSE GROUP BY 1, 2")}


def catalogue(client, query="", status=200):
    return client.get("/event-types" + query, status=status).json.get("EventTypes")


def entry(name, programs=(), description=None, schema=None, version=None, retain_days=None):
    return {"EventType": name, "Description": description, "Registered": description is not None,
            "Programs": [{"ProgramId": p, "Events": n} for p, n in programs],
            "Schema": schema, "SchemaVersion": version, "RetainDays": retain_days}


def put(client, event_id, event_type="CourseCompleted", status=200, **fields):
    return client.put_json(f"/events/{event_id}", event_body(event_id.split("-")[0], EventType=event_type, **fields),
                           status=status)


# --- The catalogue ---------------------------------------------------------------

def test_an_empty_registry_has_an_empty_catalogue(admin, reader):
    assert admin.get("/event-types").json == {"EventTypes": []}
    assert catalogue(reader) == []


def test_registering_a_type_answers_its_entry_and_everyone_sees_it(admin, reader, registry):
    answer = admin.put_json("/event-types/CourseCompleted", {"Description": DESCRIPTION}, status=200).json
    assert answer == entry("CourseCompleted", description=DESCRIPTION)
    nobody = registry.client("nobody")
    for client in (admin, reader, nobody):
        assert catalogue(client) == [answer]
        assert client.get("/event-types/CourseCompleted").json == answer
    # PUT again changes the description.
    admin.put_json("/event-types/CourseCompleted", {"Description": "Changed.\n\tIndented."})
    assert nobody.get("/event-types/CourseCompleted").json["Description"] == "Changed.\n\tIndented."


def test_used_types_are_listed_with_live_counts_per_program_sorted(admin):
    for n in range(3):
        put(admin, f"FOO-c{n}")
        put(admin, f"BAR-c{n}")
    put(admin, "BAR-x", "Assessment")
    put(admin, "FOO-dead", "Assessment")
    admin.delete("/events/FOO-dead", status=204)
    assert catalogue(admin) == [entry("Assessment", [("BAR", 1)]),
                                entry("CourseCompleted", [("BAR", 3), ("FOO", 3)])]


def test_the_catalogue_is_sorted_in_code_point_order(admin):
    names = ["b", "B", "a", "Z", "_x", "é", "ä", "Ω", "aa", "a b", "~"]
    for n, name in enumerate(names):
        put(admin, f"FOO-{n}", name)
    assert [e["EventType"] for e in catalogue(admin)] == sorted(names)
    assert sorted(names) != sorted(names, key=str.lower)  # the order is not case-folded


def test_the_catalogue_is_the_same_bytes_on_both_backends(admin):
    """PostgreSQL wrote its JSON with " : " and ", " where SQLite writes none: an
    answer is the same bytes whichever backend serves it, compact as every other."""
    described = "Done.\n\t\"Zoë\" ✓ \\ /"
    admin.put_json("/event-types/CourseCompleted", {"Description": described})
    admin.put_json("/event-types/Zeta", {"Description": "z"})
    for event_id in ("FOO-1", "FOO-2", "BAR-1"):
        put(admin, event_id)
    put(admin, "FOO-3", "apple")
    expected = [entry("CourseCompleted", [("BAR", 1), ("FOO", 2)], described), entry("Zeta", description="z"),
                entry("apple", [("FOO", 1)])]

    def compact(value):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    assert admin.get("/event-types").body == compact({"EventTypes": expected})
    assert admin.get("/event-types/apple").body == compact(expected[2])
    assert admin.put_json("/event-types/Zeta", {"Description": "z"}).body == compact(expected[1])


# --- Scoping -----------------------------------------------------------------------

@pytest.fixture
def used(admin):
    """FOO and BAR use CourseCompleted; only BAR uses BarOnly; Registered is registered, unused."""
    put(admin, "FOO-1")
    put(admin, "FOO-2")
    put(admin, "BAR-1")
    put(admin, "BAR-2", "BarOnly")
    admin.put_json("/event-types/Registered", {"Description": "Known."})


def test_a_reader_sees_registered_types_and_only_its_programs_counts(used, reader, writer):
    expected = [entry("CourseCompleted", [("FOO", 2)]), entry("Registered", description="Known.")]
    assert catalogue(reader) == expected
    assert catalogue(writer) == expected
    reader.get("/event-types/BarOnly", status=404)  # used only where the reader cannot read
    assert reader.get("/event-types/CourseCompleted").json == entry("CourseCompleted", [("FOO", 2)])


def test_a_user_without_grants_sees_only_registered_types(used, registry):
    nobody = registry.client("nobody")
    assert catalogue(nobody) == [entry("Registered", description="Known.")]
    nobody.get("/event-types/CourseCompleted", status=404)


def test_system_sees_every_program(used, admin):
    assert catalogue(admin) == [entry("BarOnly", [("BAR", 1)]), entry("CourseCompleted", [("BAR", 1), ("FOO", 2)]),
                                entry("Registered", description="Known.")]


def test_program_id_narrows_the_programs_and_the_list(used, admin, reader):
    assert catalogue(admin, "?ProgramId=BAR") == [
        entry("BarOnly", [("BAR", 1)]), entry("CourseCompleted", [("BAR", 1)]), entry("Registered", description="Known.")]
    assert catalogue(admin, "?ProgramId=FOO") == [entry("CourseCompleted", [("FOO", 2)]),
                                                  entry("Registered", description="Known.")]
    assert catalogue(admin, "?ProgramId=FOO&ProgramId=BAR") == catalogue(admin)
    assert catalogue(admin, "?ProgramId=NOPE") == [entry("Registered", description="Known.")]
    assert catalogue(reader, "?ProgramId=FOO") == catalogue(reader)


def test_program_id_without_read_is_403_before_anything_else(used, reader, registry):
    assert reader.get("/event-types?ProgramId=BAR", status=403).content_type == "application/problem+json"
    reader.get("/event-types?ProgramId=FOO&ProgramId=BAR", status=403)
    reader.get("/event-types?ProgramId=BAR&Bogus=1", status=403)  # authorization before validation
    registry.client("nobody").get("/event-types?ProgramId=FOO", status=403)


@pytest.mark.parametrize("query, field", [
    ("?Bogus=1", "Bogus"), ("?EventType=x", "EventType"), ("?ProgramId=A-B", "ProgramId"),
    ("?" + "&".join(f"ProgramId=P{n}" for n in range(101)), "ProgramId"),
    ("?" + "&".join("ProgramId=P1" for n in range(101)), "ProgramId"),  # found by schemathesis: repeats count
])
def test_bad_catalogue_queries_are_400(admin, query, field):
    problem = admin.get("/event-types" + query, status=400).json
    assert field in [e["field"] for e in problem["errors"]]


def test_the_catalogue_needs_authentication(registry):
    for path in ("/event-types", "/event-types/X"):
        registry.anonymous.get(path, status=401)
    registry.anonymous.put_json("/event-types/X", {"Description": "x"}, status=401)


# --- Registering and unregistering ---------------------------------------------------

def test_only_system_registers_and_unregisters(admin, writer, reader, registry):
    for client in (writer, reader):
        client.put_json("/event-types/X", {"Description": "x"}, status=403)
        client.put_json("/event-types/%07", {}, status=403)  # 403 before validation
        client.delete("/event-types/X", status=403)
    assert registry.sql.execute("SELECT COUNT(*) FROM event_types").fetchone() == (0,)
    admin.put_json("/event-types/X", {"Description": "x"})
    writer.delete("/event-types/X", status=403)
    assert admin.get("/event-types/X").json["Registered"] is True


def test_unregistering_keeps_the_events_and_their_count(admin):
    admin.put_json("/event-types/CourseCompleted", {"Description": DESCRIPTION})
    put(admin, "FOO-1")
    assert admin.delete("/event-types/CourseCompleted", status=204).body == b""
    assert admin.get("/event-types/CourseCompleted").json == entry("CourseCompleted", [("FOO", 1)])
    assert admin.get("/events/FOO-1").json["EventType"] == "CourseCompleted"
    admin.delete("/event-types/CourseCompleted", status=404)
    admin.delete("/event-types/NeverRegistered", status=404)


@pytest.mark.parametrize("name, stored", [
    ("Course%20Started%2Fv1", "Course Started/v1"),
    ("a%2Fb%2F", "a/b/"),
    ("%C3%A9v%C3%A9nement", "événement"),
    ("x" * 100, "x" * 100),
])
def test_names_are_percent_encoded_in_the_path(admin, name, stored):
    assert admin.put_json(f"/event-types/{name}", {"Description": "d"}).json["EventType"] == stored
    assert admin.get(f"/event-types/{name}").json["EventType"] == stored
    assert [e["EventType"] for e in catalogue(admin)] == [stored]
    admin.delete(f"/event-types/{name}", status=204)
    assert catalogue(admin) == []


@pytest.mark.parametrize("name", ["x" * 101, "%20%20", "%09", "a%07b", "%C2%85", "%E2%80%83", "a%0Ab", "%0A"])
def test_names_breaking_the_event_type_rule_are_400_on_every_method(admin, name):
    for problem in (admin.get(f"/event-types/{name}", status=400).json,
                    admin.put_json(f"/event-types/{name}", {"Description": "d"}, status=400).json,
                    admin.delete(f"/event-types/{name}", status=400).json):
        assert [e["field"] for e in problem["errors"]] == ["EventType"]


@pytest.mark.parametrize("body, field", [
    ({}, "Description"),
    ({"Description": None}, "Description"),
    ({"Description": ""}, "Description"),
    ({"Description": " \n\t "}, "Description"),
    ({"Description": "x" * 2001}, "Description"),
    ({"Description": 5}, "Description"),
    ({"Description": "bell \x07"}, "Description"),
    ({"Description": "carriage\rreturn"}, "Description"),
    ({"Description": "next line \x85"}, "Description"),
    ({"Description": "x", "Owner": "me"}, "Owner"),
    ([], "body"),
])
def test_bad_descriptions_are_400_and_register_nothing(admin, registry, body, field):
    problem = admin.put_json("/event-types/X", body, status=400).json
    assert field in [e["field"] for e in problem["errors"]]
    assert registry.sql.execute("SELECT COUNT(*) FROM event_types").fetchone() == (0,)


def test_descriptions_may_hold_line_feeds_and_tabs_up_to_2000_characters(admin):
    text = ("line\n\tindented " * 200)[:2000]
    assert admin.put_json("/event-types/X", {"Description": text}).json["Description"] == text


def test_registering_is_not_a_feed_change(admin):
    put(admin, "FOO-1")
    before = admin.get("/events").json["Events"]
    admin.put_json("/event-types/CourseCompleted", {"Description": "d"})
    assert admin.get("/events").json["Events"] == before


# --- Counts after every kind of change -------------------------------------------------

def test_counts_follow_every_kind_of_change(admin, writer, registry, tmp_path, capsys):
    db = registry.sql
    expect = {}

    def check(**changes):
        for key, n in changes.items():
            event_type, program = key.rsplit("_", 1)
            expect[(event_type, program)] = n
        assert counts(db) == {k: v for k, v in expect.items() if v} == recount(db)

    put(writer, "FOO-1")
    put(writer, "FOO-2")
    check(CourseCompleted_FOO=2)                                    # creates
    put(writer, "FOO-1")
    check()                                                         # a replay moves nothing
    put(writer, "FOO-1", EventData={"score": 1})
    check()                                                         # an update of the same type
    put(writer, "FOO-1", "Assessment")
    check(CourseCompleted_FOO=1, Assessment_FOO=1)                  # an update that changes the type
    writer.delete("/events/FOO-2", status=204)
    check(CourseCompleted_FOO=0)                                    # a delete
    put(writer, "FOO-2", "Assessment")
    check(Assessment_FOO=2)                                         # a tombstone brought back, another type
    put(writer, "FOO-3", ProgramMemberId="erased")
    put(writer, "FOO-4", "Assessment", ProgramMemberId="erased")
    put(admin, "BAR-1", ProgramMemberId="erased")
    check(CourseCompleted_FOO=1, Assessment_FOO=3, CourseCompleted_BAR=1)
    assert writer.delete("/programs/FOO/members/erased").json == {"Deleted": 2}
    check(CourseCompleted_FOO=0, Assessment_FOO=2)                  # an erasure, in FOO only
    items = [dict(event_body("FOO", EventType="Badge"), EventId=f"FOO-b{n}") for n in range(3)]
    items.append(dict(event_body("FOO", EventType="Badge"), EventId="FOO-1"))  # Assessment -> Badge
    items.append(dict(event_body("FOO", EventType="Assessment"), EventId="FOO-2"))  # a replay
    admin.post_json("/events", {"Events": items})
    check(Badge_FOO=4, Assessment_FOO=1)                            # a batch
    dump = tmp_path / "in.jsonl"
    dump.write_text("\n".join(json.dumps(line) for line in [
        dict(event_body("FOO", EventType="Imported"), EventId="FOO-i1"),
        dict(event_body("FOO", EventType="Imported"), EventId="FOO-b0"),       # Badge -> Imported
        {"EventId": "FOO-b1", "ProgramId": "FOO", "EventType": "Badge", "Deleted": True},   # a delete
        {"EventId": "FOO-gone", "ProgramId": "FOO", "EventType": "Badge", "Deleted": True},  # a tombstone only
    ]) + "\n")
    assert eventstore_admin.main(["--db", registry.db_path, "import", str(dump)]) == 0, capsys.readouterr().err
    check(Imported_FOO=2, Badge_FOO=2)                              # import


def test_counts_are_exact_under_concurrent_publishers(registry, admin):
    """Eight threads publish, change types, delete and bring back events over the
    same few ids at once; the kept counts must equal a recount, and the catalogue
    must say the same."""
    types = ["A", "B", "C"]
    failures = []

    def publish(seed):
        rng = random.Random(seed)
        client = registry.client("admin")
        for _ in range(60):
            event_id = f"{rng.choice(['FOO', 'BAR'])}-{rng.randrange(12)}"
            if rng.random() < 0.2:
                status = client.delete(f"/events/{event_id}", expect_errors=True).status_int
                if status not in (204, 404):
                    failures.append(status)
            elif rng.random() < 0.2:
                items = [dict(event_body(event_id.split("-")[0], EventType=rng.choice(types)),
                              EventId=f"{event_id}-{n}") for n in range(3)]
                client.post_json("/events", {"Events": items}, status=200)
            else:
                put(client, event_id, rng.choice(types))

    waits = [run_in_thread(publish, seed) for seed in range(8)]
    for wait in waits:
        wait(timeout=120)
    assert failures == []
    kept = counts(registry.sql)
    assert kept == recount(registry.sql) and sum(kept.values()) > 0
    listed = {(e["EventType"], p["ProgramId"]): p["Events"] for e in catalogue(admin) for p in e["Programs"]}
    assert listed == kept


# --- Programs that take registered types only -------------------------------------------

@pytest.fixture
def strict(admin):
    """FOO takes registered types only; CourseCompleted and Known are registered."""
    admin.put_json("/event-types/CourseCompleted", {"Description": DESCRIPTION})
    admin.put_json("/event-types/Known", {"Description": "k"})
    answer = admin.put_json("/programs/FOO", {"Name": "Program FOO", "RegisteredEventTypesOnly": True}).json
    assert answer == {"ProgramId": "FOO", "Name": "Program FOO", "RegisteredEventTypesOnly": True}


def test_the_setting_shows_in_programs_and_is_kept_unless_given(strict, admin, reader):
    settings = lambda client: {p["ProgramId"]: p["RegisteredEventTypesOnly"] for p in client.get("/programs").json["Programs"]}
    assert settings(admin) == {"FOO": True, "BAR": False}
    assert settings(reader) == {"FOO": True}
    assert admin.put_json("/programs/FOO", {"Name": "Renamed"}).json["RegisteredEventTypesOnly"] is True
    assert admin.put_json("/programs/FOO", {"Name": "Renamed", "RegisteredEventTypesOnly": None}).json[
        "RegisteredEventTypesOnly"] is True
    assert admin.put_json("/programs/FOO", {"Name": "x", "RegisteredEventTypesOnly": False}).json[
        "RegisteredEventTypesOnly"] is False
    assert admin.put_json("/programs/NEW", {"Name": "New"}).json["RegisteredEventTypesOnly"] is False
    assert admin.put_json("/programs/NEW2", {"Name": "New", "RegisteredEventTypesOnly": True}).json[
        "RegisteredEventTypesOnly"] is True


def test_a_strict_program_refuses_an_unregistered_type_and_writes_nothing(strict, writer, admin, registry):
    problem = put(writer, "FOO-1", "Unknown", status=400).json
    assert problem["errors"] == [{"field": "EventType", "message": problem["errors"][0]["message"]}]
    message = problem["errors"][0]["message"]
    assert "'Unknown'" in message and "CourseCompleted, Known" in message
    assert registry.row("FOO-1") is None
    put(writer, "FOO-1")                      # a registered type
    put(admin, "BAR-1", "Unknown")            # BAR takes any type


def test_the_type_error_is_listed_with_the_bodys_other_problems(strict, writer, registry):
    problem = put(writer, "FOO-1", "Unknown", status=400, EventStartUTC="yesterday").json
    assert sorted(e["field"] for e in problem["errors"]) == ["EventStartUTC", "EventType"]
    problem = put(writer, "FOO-1", "Known", status=400, EventStartUTC="yesterday").json
    assert [e["field"] for e in problem["errors"]] == ["EventStartUTC"]


def test_replays_and_updates_of_an_unregistered_type_are_refused_once_strict(admin, writer, registry):
    put(writer, "FOO-1", "Old")
    admin.put_json("/programs/FOO", {"Name": "Program FOO", "RegisteredEventTypesOnly": True})
    assert admin.get("/events/FOO-1").json["EventType"] == "Old"  # switching on leaves events as they are
    put(writer, "FOO-1", "Old", status=400)                         # a replay
    put(writer, "FOO-1", "Old", status=400, EventData={"x": 1})     # an update
    assert registry.row("FOO-1")["revision"] == 1
    writer.delete("/events/FOO-1", status=204)                      # deletes are not writes of a type


def test_a_strict_batch_lists_every_failing_item_and_writes_nothing(strict, admin, registry):
    items = [dict(event_body("FOO"), EventId="FOO-1"),
             dict(event_body("FOO", EventType="Nope"), EventId="FOO-2"),
             dict(event_body("BAR", EventType="Nope"), EventId="BAR-1"),
             dict(event_body("FOO", EventType="Nope2"), EventId="FOO-3")]
    problem = admin.post_json("/events", {"Events": items}, status=400).json
    assert [(e["index"], e["EventId"], e["field"]) for e in problem["errors"]] == [
        (1, "FOO-2", "EventType"), (3, "FOO-3", "EventType")]
    assert registry.count_events() == 0
    items[0]["EventStartUTC"] = "never"  # with another item invalid too: every problem in one answer
    problem = admin.post_json("/events", {"Events": items}, status=400).json
    assert [(e["index"], e["field"]) for e in problem["errors"]] == [
        (0, "EventStartUTC"), (1, "EventType"), (3, "EventType")]
    assert registry.count_events() == 0
    items[0]["EventStartUTC"] = "2026-01-01T00:00:00Z"
    del items[3], items[1]
    assert [r["Status"] for r in admin.post_json("/events", {"Events": items}).json["Results"]] == ["created"] * 2


def test_the_message_counts_the_registered_types_when_there_are_many(strict, admin, writer):
    for n in range(25):
        admin.put_json(f"/event-types/T{n:02}", {"Description": "d"})
    message = put(writer, "FOO-1", "Unknown", status=400).json["errors"][0]["message"]
    assert "27 types are registered" in message and "T00" not in message


def test_a_type_a_strict_program_uses_cannot_be_unregistered(strict, admin, writer):
    put(writer, "FOO-1")
    problem = admin.delete("/event-types/CourseCompleted", status=409).json
    assert "FOO (1 events)" in problem["detail"]
    admin.delete("/event-types/Known", status=204)  # registered, unused: fine
    writer.delete("/events/FOO-1", status=204)      # no live event any more
    admin.delete("/event-types/CourseCompleted", status=204)
    put(writer, "FOO-2", status=400)                # and now it is refused


def test_a_type_used_only_by_programs_taking_any_type_can_be_unregistered(strict, admin):
    put(admin, "BAR-1")
    admin.delete("/event-types/CourseCompleted", status=204)
    admin.put_json("/event-types/CourseCompleted", {"Description": "back"})
    admin.put_json("/programs/FOO", {"Name": "Program FOO", "RegisteredEventTypesOnly": False})
    put(admin, "FOO-1")
    admin.delete("/event-types/CourseCompleted", status=204)  # FOO takes any type now


# --- Through a real server ------------------------------------------------------------

def test_a_real_server_decodes_slashes_and_spaces_in_names(tmp_path):
    from server import Server
    server = Server(tmp_path / "real.db")
    try:
        admin = {"user": "admin", "key": server.admin_key}
        status, _, answer = server.request("PUT", "/event-types/Course%20Started%2Fv1", {"Description": "started"},
                                           **admin)
        assert status == 200 and answer["EventType"] == "Course Started/v1"
        status, _, answer = server.request("GET", "/event-types/Course%20Started%2Fv1", **admin)
        assert status == 200 and answer["Registered"] is True
        assert server.request("DELETE", "/event-types/Course%20Started%2Fv1", **admin)[0] == 204
        assert server.request("GET", "/event-types/Course%20Started%2Fv1", **admin)[0] == 404
    finally:
        server.stop()


# --- The command line -----------------------------------------------------------------

def publish_directly(db_path, event_id, event_type):
    with opened(db_path) as session, session.transaction(1, seqs=1) as tx:
        eventstore.put_event(tx, eventstore.validate_event(
            event_id, event_body(event_id.split("-")[0], EventType=event_type)))


def test_type_add_list_remove(cli):
    cli("program", "add", "FOO")
    cli("type", "add", "Course Started/v1", "--description", "line one\nline\ttwo \\ end")
    cli("type", "add", "Zed", "--description", "z")
    cli("type", "add", "Zed", "--description", "changed")
    publish_directly(cli.db, "FOO-1", "Used")
    out, _ = cli("type", "list")
    assert out == ("Course Started/v1\tregistered\t-\tline one\\nline\\ttwo \\\\ end\n"
                   "Used\tunregistered\tFOO=1\t\n"
                   "Zed\tregistered\t-\tchanged\n")
    cli("type", "remove", "Zed")
    assert "not registered" in cli("type", "remove", "Zed", status=1)[1]
    assert "Zed" not in cli("type", "list")[0]


@pytest.mark.parametrize("argv, says", [
    (["type", "add", "X"], "--description"),
    (["type", "add", "X", "--retain-days", "3"], "--description"),  # registering needs one
    (["type", "add", "X", "--description", " "], "white space"),
    (["type", "add", "X", "--description", "x" * 2001], "2001"),
    (["type", "add", "a\x07", "--description", "d"], "control"),
    (["type", "remove", "x" * 101], "101"),
])
def test_type_commands_refuse_bad_input(cli, capsys, argv, says):
    assert says in cli(*argv, status=1)[1]


def test_program_add_sets_what_types_a_program_takes(cli):
    cli("program", "add", "FOO", "--registered-types-only")
    assert cli("program", "list")[0] == "FOO\tFOO\tregistered-types-only\n"
    cli("program", "add", "FOO", "--any-types")        # no --name needed to change the setting
    cli("program", "add", "FOO", "--name", "Foo")      # kept when not given
    assert cli("program", "list")[0] == "FOO\tFoo\tany-types\n"
    with pytest.raises(SystemExit) as exit:  # one or the other
        eventstore_admin.main(["--db", cli.db, "program", "add", "FOO", "--registered-types-only", "--any-types"])
    assert exit.value.code == 2


def test_type_remove_is_refused_while_a_strict_program_uses_it(cli):
    cli("program", "add", "FOO", "--registered-types-only")
    cli("type", "add", "T", "--description", "d")
    publish_directly(cli.db, "FOO-1", "T")
    assert "FOO (1 events)" in cli("type", "remove", "T", status=1)[1]


def test_import_checks_the_types_of_a_strict_program_and_imports_nothing(cli, tmp_path):
    cli("program", "add", "FOO", "--registered-types-only")
    cli("type", "add", "T", "--description", "d")
    dump = tmp_path / "in.jsonl"
    dump.write_text(json.dumps(dict(event_body("FOO", EventType="T"), EventId="FOO-1")) + "\n"
                    + json.dumps(dict(event_body("FOO", EventType="U"), EventId="FOO-2")) + "\n")
    err = cli("import", str(dump), status=1)[1]
    assert "line 2: EventType: 'U' is not a registered event type" in err and "line 1" not in err
    assert cli("export")[0] == ""


# --- Upgrading a version-1 database -------------------------------------------------------

@pytest.fixture
def v1_database(tmp_path):
    """A copy of tests/data/schema-v1.db, made by the version-1 code (see make_schema_v1_db.py)."""
    path = tmp_path / "v1.db"
    shutil.copy(DATA / "schema-v1.db", path)
    return path


V1_COUNTS = {("Badge", "BAR"): 3, ("CertificateIssued", "FOO"): 2, ("Course Started/v1", "FOO"): 5,
             ("CourseCompleted", "FOO"): 7}


def test_a_version_1_database_is_upgraded_at_start_up(v1_database):
    import sqlite3
    with sqlite3.connect(v1_database) as before:
        assert before.execute("PRAGMA user_version").fetchone() == (1,)
        events_before = before.execute("SELECT * FROM events ORDER BY seq").fetchall()
    app = eventstore.make_app(v1_database)
    try:
        db = open_sqlite(v1_database)
        assert db.execute("PRAGMA user_version").fetchone() == (eventstore.SCHEMA_VERSION,)
        assert counts(db) == V1_COUNTS == recount(db)
        assert db.execute("SELECT * FROM events ORDER BY seq").fetchall() == events_before
        key = create_user(v1_database, "upgrader", {}, is_system=True)
        client = webtest.TestApp(app)
        auth = basic("upgrader", key)
        assert client.get("/health").json["schemaVersion"] == eventstore.SCHEMA_VERSION
        assert client.get("/event-types", headers=auth).json["EventTypes"] == [
            entry("Badge", [("BAR", 3)]), entry("CertificateIssued", [("FOO", 2)]),
            entry("Course Started/v1", [("FOO", 5)]), entry("CourseCompleted", [("FOO", 7)])]
        assert {p["ProgramId"]: p["RegisteredEventTypesOnly"] for p in client.get(
            "/programs", headers=auth).json["Programs"]} == {"BAR": False, "EMPTY": False, "FOO": False}
        # And the counts go on from there.
        client.put_json("/events/BAR-b0", dict(event_body("BAR", EventType="CourseCompleted")), headers=auth)
        assert counts(db) == {**V1_COUNTS, ("Badge", "BAR"): 2, ("CourseCompleted", "BAR"): 1} == recount(db)
        db.close()
    finally:
        app.close()


def test_the_upgrade_is_idempotent_and_the_command_line_does_it_too(v1_database, capsys):
    assert eventstore_admin.main(["--db", str(v1_database), "type", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "Badge\tunregistered\tBAR=3\t"
    for _ in range(2):
        conn = open_sqlite(v1_database)
        assert counts(conn) == V1_COUNTS
        eventstore_sqlite.apply_schema(conn)
        conn.close()


def test_processes_upgrading_at_once_upgrade_once(v1_database):
    """Workers of one server start together: each applies the schema; the
    version is read again under the write lock, so the upgrade runs once."""
    errors, start = [], threading.Barrier(4)

    def upgrade():
        conn = eventstore_sqlite.connect(str(v1_database))
        try:
            start.wait(timeout=10)
            eventstore_sqlite.apply_schema(conn)
        except Exception as exc:
            errors.append(exc)
        finally:
            conn.close()

    waits = [run_in_thread(upgrade) for _ in range(4)]
    for wait in waits:
        wait(timeout=60)
    assert errors == []
    conn = open_sqlite(v1_database)
    assert counts(conn) == V1_COUNTS
    conn.close()

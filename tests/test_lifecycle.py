"""Member erasure, backup, export and import."""

import io
import json
import sqlite3
import threading
import urllib.parse

import pytest

import eventstore_admin
from helpers import Registry, event_body, eventually


def erase(client, program_id, member_id, **kwargs):
    return client.delete(f"/programs/{program_id}/members/{urllib.parse.quote(member_id, safe='')}", **kwargs)


# --- member erasure -------------------------------------------------------------------

def test_erasure_tombstones_every_live_event_of_the_member(writer, registry):
    writer.put_json("/events/FOO-1", event_body(ProgramMemberId="ann"))
    writer.put_json("/events/FOO-2", event_body(ProgramMemberId="bob"))
    writer.put_json("/events/FOO-3", event_body(ProgramMemberId="ann"))
    registry.client("admin").put_json("/events/BAR-1", event_body("BAR", ProgramMemberId="ann"))
    writer.delete("/events/FOO-3")
    assert erase(writer, "FOO", "ann").json == {"Deleted": 1}
    page = writer.get("/events?ProgramId=FOO").json["Events"]
    assert [(e["EventId"], e["Deleted"], e["Sequence"], e["Revision"]) for e in page] == [
        ("FOO-2", False, 2, 1), ("FOO-3", True, 5, 2), ("FOO-1", True, 6, 2)]
    assert registry.row("BAR-1")["member_id"] == "ann"


def test_erasure_gives_each_event_its_own_sequence(writer):
    for n in range(3):
        writer.put_json(f"/events/FOO-{n}", event_body(ProgramMemberId="ann"))
    before = writer.get("/events").json["Events"][-1]["Sequence"]
    assert erase(writer, "FOO", "ann").json == {"Deleted": 3}
    events = writer.get(f"/events?after={before}").json["Events"]
    sequences = [e["Sequence"] for e in events]
    assert len(events) == 3 and all(e["Deleted"] for e in events)
    assert sequences == sorted(set(sequences))  # each its own, in order (consecutive on SQLite, not on PostgreSQL)


def test_erasure_is_idempotent(writer):
    writer.put_json("/events/FOO-1", event_body(ProgramMemberId="ann"))
    assert erase(writer, "FOO", "ann").json == {"Deleted": 1}
    assert erase(writer, "FOO", "ann").json == {"Deleted": 0}
    assert writer.get("/events?after=2").json["Events"] == []


@pytest.mark.parametrize("member_id", ["joe+tag@example.com", "Jane Doe", "Zoë Ñúñez", "a/b", "100%", "?#&", "line\nfeed"])
def test_percent_encoded_member_ids_work(writer, member_id, registry):
    writer.put_json("/events/FOO-1", event_body(ProgramMemberId=member_id))
    assert erase(writer, "FOO", member_id).json == {"Deleted": 1}
    assert registry.row("FOO-1")["deleted"] == 1


def test_erasure_needs_write(registry, reader):
    erase(reader, "FOO", "ann", status=403)
    erase(registry.client("nobody"), "FOO", "ann", status=403)
    erase(registry.client("writer"), "BAR", "ann", status=403)


def test_erasure_is_403_before_404_so_an_unregistered_program_is_not_revealed(registry, reader):
    for client in (registry.client("writer"), reader, registry.client("nobody")):
        forbidden = erase(client, "ZZZ", "ann", status=403)
        assert forbidden.json["detail"] == erase(client, "BAR", "ann", status=403).json["detail"].replace(
            "BAR", "ZZZ")


def test_erasure_of_an_unregistered_program_is_404_for_system(admin):
    erase(admin, "ZZZ", "ann", status=404)
    erase(admin, "A-B", "ann", status=400)


def test_a_blank_member_id_is_400(admin):
    assert admin.delete("/programs/FOO/members/%20%20", status=400).json["errors"][0]["field"] == "ProgramMemberId"


def test_other_methods_on_members_are_405(admin):
    assert admin.get("/programs/FOO/members/ann", status=405).headers["Allow"] == "DELETE"


def test_erased_data_is_gone_from_the_database_file(tmp_path):
    registry = Registry(tmp_path / "erase.db")
    writer = registry.client("writer")
    marker = "ERASE-ME-7c1f"
    for n in range(20):
        writer.put_json(f"/events/FOO-{n}", event_body(
            ProgramMemberId=marker, ReferenceEventId=f"FOO-{marker}",
            EventData={"secret": f"{marker} payload {n}", "pad": "x" * 500}))
    writer.put_json("/events/FOO-keep", event_body(ProgramMemberId="keeper"))
    assert erase(writer, "FOO", marker).json == {"Deleted": 20}
    registry.sql.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    registry.app.storage.reads().conn.close()
    registry.sql.close()
    for suffix in ("", "-wal"):
        path = tmp_path / f"erase.db{suffix}"
        if path.exists():
            assert marker.encode() not in path.read_bytes(), path


def test_erasure_under_concurrent_publishing_leaves_nothing_committed_before_it(registry):
    """Publishers keep writing the member's events while it is erased. Every
    revision acknowledged before the erasure was sent must be erased by it: after
    it, each such event is a tombstone or was published again (so its revision
    moved on by at least two: the erasure's tombstone, then the new one)."""
    acknowledged = {}
    lock = threading.Lock()
    stop = threading.Event()

    def publish(n):
        client, i = registry.client("writer"), 0
        while not stop.is_set():
            event_id = f"FOO-p{n}-{i % 15}"
            response = client.put_json(f"/events/{event_id}", event_body(ProgramMemberId="ann", EventData={"i": i}))
            with lock:
                acknowledged[event_id] = int(response.headers["ETag"].strip('"'))
            i += 1

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    eventually(lambda: len(acknowledged) >= 20, "20 events acknowledged")
    with lock:
        before = dict(acknowledged)
    erased = erase(registry.client("writer"), "FOO", "ann").json["Deleted"]
    after = {row[0]: row[1:] for row in registry.sql.execute("SELECT event_id, revision, deleted FROM events")}
    stop.set()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), 'a thread did not finish in 30 s'
    assert erased >= len(before)
    for event_id, revision in before.items():
        now_revision, deleted = after[event_id]
        assert deleted or now_revision >= revision + 2, event_id


# --- CLI helpers ---------------------------------------------------------------------

def run(db, *argv, status=0, capsys=None):
    out = io.StringIO()
    code = eventstore_admin.main(["--db", str(db), "--create", *argv], out=out)
    err = capsys.readouterr().err if capsys else ""
    assert code == status, err
    return out.getvalue(), err


def fill(registry, count=30):
    client = registry.client("admin")
    for n in range(count):
        program_id = "FOO" if n % 3 else "BAR"
        client.put_json(f"/events/{program_id}-{n}", event_body(
            program_id, ProgramMemberId=f"m{n % 4}", EventData={"n": n, "f": n / 7, "s": "ü\u2028"},
            ReferenceEventId=f"FOO-{n - 1}" if n else None))
    for n in range(0, count, 5):
        client.delete(f"/events/{'FOO' if n % 3 else 'BAR'}-{n}")
    client.put_json("/events/FOO-1", event_body(EventType="Updated"))


# --- backup --------------------------------------------------------------------------

@pytest.mark.sqlite_only
def test_backup_copies_and_verifies(registry, tmp_path, capsys):
    fill(registry)
    dest = tmp_path / "copy.db"
    _, err = run(registry.db_path, "backup", str(dest), capsys=capsys)
    assert "ok" in err and "integrity_check ok" in err
    copy = sqlite3.connect(dest)
    assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    original = registry.sql.execute("SELECT * FROM events ORDER BY seq").fetchall()
    assert copy.execute("SELECT * FROM events ORDER BY seq").fetchall() == original


@pytest.mark.sqlite_only
def test_backup_refuses_to_overwrite_unless_forced(registry, tmp_path, capsys):
    dest = tmp_path / "copy.db"
    dest.write_text("precious")
    _, err = run(registry.db_path, "backup", str(dest), status=1, capsys=capsys)
    assert "--force" in err and dest.read_text() == "precious"
    run(registry.db_path, "backup", str(dest), "--force", capsys=capsys)
    assert sqlite3.connect(dest).execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.sqlite_only
def test_backup_into_a_missing_folder_names_the_folder(registry, tmp_path, capsys):
    dest = tmp_path / "not-made-yet" / "copy.db"
    _, err = run(registry.db_path, "backup", str(dest), status=1, capsys=capsys)
    assert err.count("\n") == 1 and str(dest.parent) in err and "folder" in err


@pytest.mark.postgresql_only
def test_backup_on_postgresql_refuses_and_points_to_pg_dump(registry, tmp_path, capsys):
    _, err = run(registry.db_path, "backup", str(tmp_path / "copy.db"), status=1, capsys=capsys)
    assert err.count("\n") == 1 and "pg_dump" in err and not (tmp_path / "copy.db").exists()


@pytest.mark.sqlite_only
def test_backup_during_writes_holds_everything_acknowledged_before_it(registry, tmp_path, capsys):
    client = registry.client("writer")
    acknowledged = []
    stop = threading.Event()

    def publish():
        n = 0
        while not stop.is_set():
            client.put_json(f"/events/FOO-{n}", event_body(EventData={"pad": "y" * 2000}))
            acknowledged.append(f"FOO-{n}")
            n += 1

    for n in range(300):
        client.put_json(f"/events/FOO-pre{n}", event_body(EventData={"pad": "z" * 2000}))
    thread = threading.Thread(target=publish)
    thread.start()
    eventually(lambda: len(acknowledged) >= 20, "20 writes acknowledged before the backup")
    before = list(acknowledged)
    run(registry.db_path, "backup", str(tmp_path / "live.db"), capsys=capsys)
    stop.set()
    thread.join(30)
    assert not thread.is_alive(), 'a thread did not finish in 30 s'
    copy = sqlite3.connect(tmp_path / "live.db")
    assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    present = {row[0] for row in copy.execute("SELECT event_id FROM events")}
    assert set(before) | {f"FOO-pre{n}" for n in range(300)} <= present
    assert len(acknowledged) > len(before)  # writes went on while it copied


# --- export and import ----------------------------------------------------------------

def test_export_writes_json_lines_in_feed_order_with_tombstones(registry, capsys):
    fill(registry)
    out, _ = run(registry.db_path, "export", capsys=capsys)
    lines = [json.loads(line) for line in out.splitlines()]
    feed = registry.client("admin").get("/events?limit=1000").json["Events"]
    assert lines == feed
    assert any(line["Deleted"] for line in lines)


def test_export_filters_by_program(registry, capsys):
    fill(registry)
    out, _ = run(registry.db_path, "export", "--program", "BAR", capsys=capsys)
    assert {json.loads(line)["ProgramId"] for line in out.splitlines()} == {"BAR"}
    run(registry.db_path, "export", "--program", "NOPE", status=1, capsys=capsys)


def test_export_import_round_trip_reproduces_every_event_and_tombstone(registry, tmp_path, capsys):
    fill(registry)
    out, _ = run(registry.db_path, "export", capsys=capsys)
    dump = tmp_path / "dump.jsonl"
    dump.write_text(out)
    target = Registry(tmp_path / "target.db")
    _, err = run(target.db_path, "import", str(dump), "--batch", "7", capsys=capsys)
    assert "ok" in err
    again, _ = run(target.db_path, "export", capsys=capsys)
    strip = lambda e: {k: v for k, v in e.items() if k not in ("Revision", "Sequence", "CreatedUTC", "UpdatedUTC")}
    original = {e["EventId"]: strip(e) for e in map(json.loads, out.splitlines())}
    copied = {e["EventId"]: strip(e) for e in map(json.loads, again.splitlines())}
    assert copied == original
    # Feed order is kept: the import applies lines in the order they come.
    assert [json.loads(line)["EventId"] for line in again.splitlines()] == list(original)


def test_importing_the_same_file_twice_changes_nothing(registry, tmp_path, capsys):
    fill(registry)
    dump = tmp_path / "dump.jsonl"
    dump.write_text(run(registry.db_path, "export", capsys=capsys)[0])
    target = Registry(tmp_path / "target.db")
    run(target.db_path, "import", str(dump), capsys=capsys)
    before = target.sql.execute("SELECT * FROM events ORDER BY seq").fetchall()
    _, err = run(target.db_path, "import", str(dump), capsys=capsys)
    assert target.sql.execute("SELECT * FROM events ORDER BY seq").fetchall() == before
    assert " 0 created, 0 updated" in err and "0 deleted" in err


def test_a_tombstone_line_deletes(registry, tmp_path, capsys):
    registry.client("writer").put_json("/events/FOO-1", event_body())
    dump = tmp_path / "t.jsonl"
    dump.write_text('{"EventId": "FOO-1", "ProgramId": "FOO", "EventType": "X", "Deleted": true, "Revision": 9}\n')
    run(registry.db_path, "import", str(dump), capsys=capsys)
    assert registry.row("FOO-1")["deleted"] == 1 and registry.row("FOO-1")["revision"] == 2


def test_import_reports_every_bad_line_and_imports_nothing(registry, tmp_path, capsys):
    good = json.dumps({"EventId": "FOO-1", **event_body()})
    lines = [
        good,
        "{not json",
        json.dumps({"EventId": "FOO-2", **event_body(EventStartUTC="never")}),
        json.dumps({"EventId": "ZZZ-1", **event_body("ZZZ")}),
        json.dumps({"EventId": "FOO-3", **event_body(), "Colour": "red"}),
        "",
        json.dumps({"EventId": "FOO-4", "Deleted": True, "EventData": {}}),
        json.dumps([1]),
        good,
    ]
    dump = tmp_path / "bad.jsonl"
    dump.write_text("\n".join(lines) + "\n")
    _, err = run(registry.db_path, "import", str(dump), status=1, capsys=capsys)
    for number, reason in [(2, "JSON"), (3, "EventStartUTC"), (4, "not registered"), (5, "Colour"),
                           (7, "EventData"), (8, "object")]:
        assert any(line.startswith(f"line {number}:") and reason in line for line in err.splitlines()), number
    assert "line 1:" not in err and "line 9:" not in err
    assert "6 of 8 lines are not valid; nothing was imported" in err
    assert registry.count_events() == 0


def test_import_of_a_missing_file_is_one_clear_error(registry, tmp_path, capsys):
    _, err = run(registry.db_path, "import", str(tmp_path / "nope.jsonl"), status=1, capsys=capsys)
    assert err.startswith("error:") and "nope.jsonl" in err and "Traceback" not in err


def test_progress_shows_count_rate_and_time_left():
    stream = io.StringIO()
    progress = eventstore_admin.Progress("import", total=1000, stream=stream, enabled=True)
    progress.shown -= 1
    progress.update(250)
    progress.finish()
    text = stream.getvalue()
    assert "import: 250/1,000 (25%)" in text and "/s" in text and "left" in text


def test_progress_is_silent_when_not_a_terminal():
    stream = io.StringIO()
    progress = eventstore_admin.Progress("export", stream=stream)
    progress.shown -= 1
    progress.update(5)
    progress.finish()
    assert stream.getvalue() == ""

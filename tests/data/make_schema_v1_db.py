"""How tests/data/schema-v1.db was made: run with the eventstore.py of schema
version 1 (commit 645b371) importable, e.g.

    git show 645b371:eventstore.py > /tmp/v1/eventstore.py   # and schema.sql, openapi.json
    PYTHONPATH=/tmp/v1 python tests/data/make_schema_v1_db.py tests/data/schema-v1.db

It writes through that version's own app (WebTest), so the database is exactly what
that code made: programs FOO, BAR and EMPTY, a SYSTEM user "admin" whose key is
printed into the database's users only (tests re-key it), and events of several
types with updates that change the type, replays, deletes, a tombstone brought
back, an erasure and a batch.
"""

import base64
import sys

import webtest

import eventstore

assert eventstore.SCHEMA_VERSION == 1, "run this with the version-1 eventstore.py"
path = sys.argv[1]
conn = eventstore.open_database(path)
key = eventstore.bootstrap_admin(conn, eventstore.now_us())
for program in ("FOO", "BAR", "EMPTY"):
    with eventstore.write_transaction(conn):
        eventstore.put_program(conn, program, f"Program {program}", eventstore.now_us())
app = eventstore.make_app(path)
auth = {"Authorization": "Basic " + base64.b64encode(f"admin:{key}".encode()).decode()}
client = webtest.TestApp(app)


def put(event_id, event_type, member="m1", **extra):
    body = {"ProgramId": event_id.split("-")[0], "ProgramMemberId": member, "EventType": event_type,
            "EventStartUTC": "2026-01-01T00:00:00Z", **extra}
    client.put_json(f"/events/{event_id}", body, headers=auth, status=200)


for n in range(10):
    put(f"FOO-{n}", "CourseCompleted", member=f"m{n % 3}")
for n in range(5):
    put(f"FOO-s{n}", "Course Started/v1", member="m9")
for n in range(4):
    put(f"BAR-{n}", "CourseCompleted")
put("FOO-0", "CourseCompleted", member="m0")        # a replay: no change
put("FOO-1", "CertificateIssued", member="m1")      # an update that changes the type
put("FOO-2", "CourseCompleted", member="m2", EventData={"score": 1})  # an update of the same type
client.delete("/events/FOO-3", headers=auth, status=204)      # a tombstone
client.delete("/events/FOO-4", headers=auth, status=204)
put("FOO-4", "CertificateIssued", member="m1")      # a tombstone brought back, with another type
client.delete("/programs/BAR/members/m1", headers=auth, status=200)   # erases BAR-0..3
client.post_json("/events", {"Events": [
    {"EventId": f"BAR-b{n}", "ProgramId": "BAR", "ProgramMemberId": "m2", "EventType": "Badge",
     "EventStartUTC": "2026-01-02T00:00:00Z"} for n in range(3)]}, headers=auth, status=200)
app.close()
conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
conn.execute("VACUUM")
conn.close()
print("ok", path)

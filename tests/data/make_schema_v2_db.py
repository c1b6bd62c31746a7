"""How tests/data/schema-v2.db and tests/data/schema-v2-postgres.sql were made:
run with the eventstore of schema version 2 (commit 9cd735f) importable, e.g.

    mkdir /tmp/v2 && git archive 9cd735f | tar -x -C /tmp/v2
    PYTHONPATH=/tmp/v2:/tmp/v2/tests python tests/data/make_schema_v2_db.py tests/data

It writes through that version's own app (WebTest), so each database is exactly
what that code made: programs FOO, BAR and STRICT (registered types only), the
registered type CourseCompleted, a SYSTEM user "admin" and a user "reader"
(read on FOO), events with updates, a tombstone, an erasure and a batch. The
SQLite file is checkpointed and vacuumed; the PostgreSQL database (on a
throwaway cluster, tests/pg_cluster.py) is written out with pg_dump as plain SQL
(--inserts, no owner, no privileges).
"""

import base64
import subprocess
import sys
from pathlib import Path

import webtest

import eventstore
import eventstore_storage
from pg_cluster import Cluster

assert eventstore_storage.SCHEMA_VERSION == 2, "run this with the version-2 eventstore"
folder = Path(sys.argv[1])


def fill(db):
    app = eventstore.make_app(db)
    session = app.storage.session()
    key = eventstore.bootstrap_admin(session, eventstore.now_us())
    with session.transaction(eventstore.now_us()) as tx:
        eventstore.add_user(tx, "reader", False, {})
    session.close()
    client = webtest.TestApp(app, extra_environ={"wsgi.multithread": True})
    auth = {"Authorization": "Basic " + base64.b64encode(f"admin:{key}".encode()).decode()}
    for program in ("FOO", "BAR", "STRICT"):
        client.put_json(f"/programs/{program}", {"Name": f"Program {program}",
                                                  "RegisteredEventTypesOnly": program == "STRICT"}, headers=auth)
    client.put_json("/event-types/CourseCompleted", {"Description": "A learner completed a course."}, headers=auth)
    with _session(db) as session:
        with session.transaction(eventstore.now_us()) as tx:
            tx.set_grants("reader", {"FOO": "read"})

    def put(event_id, event_type="CourseCompleted", member="m1", **extra):
        body = {"ProgramId": event_id.split("-")[0], "ProgramMemberId": member, "EventType": event_type,
                "EventStartUTC": "2026-01-01T00:00:00Z", **extra}
        client.put_json(f"/events/{event_id}", body, headers=auth, status=200)

    for n in range(6):
        put(f"FOO-{n}", member=f"m{n % 2}")
    put("BAR-1", "Badge")
    put("STRICT-1")
    put("FOO-1", "CertificateIssued")                      # an update that changes the type
    client.delete("/events/FOO-2", headers=auth, status=204)  # a tombstone
    client.delete("/programs/BAR/members/m1", headers=auth, status=200)
    client.post_json("/events", {"Events": [
        {"EventId": f"BAR-b{n}", "ProgramId": "BAR", "ProgramMemberId": "m2", "EventType": "Badge",
         "EventStartUTC": "2026-01-02T00:00:00Z"} for n in range(3)]}, headers=auth, status=200)
    app.close()


class _session:
    def __init__(self, db):
        self.storage = eventstore.open_storage(db)

    def __enter__(self):
        self.session = self.storage.session()
        return self.session

    def __exit__(self, *exc):
        self.session.close()
        self.storage.close()


sqlite_path = folder / "schema-v2.db"
sqlite_path.unlink(missing_ok=True)
fill(str(sqlite_path))
conn = eventstore.open_storage(str(sqlite_path)).session().conn
conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
conn.execute("VACUUM")
conn.close()

cluster = Cluster.start()
try:
    url = cluster.url("v2")
    import psycopg
    with psycopg.connect(cluster.url(), autocommit=True) as admin:
        admin.execute("CREATE DATABASE v2")
    fill(url)
    dump = subprocess.run([f"{cluster.binaries}/pg_dump", "--inserts", "--no-owner", "--no-privileges",
                           "--dbname", url], check=True, capture_output=True, text=True).stdout
    # pg_dump 15.14 and later fence the script with psql's \restrict: not SQL.
    lines = [line for line in dump.splitlines() if not line.startswith("\\")]
    (folder / "schema-v2-postgres.sql").write_text("\n".join(lines) + "\n")
finally:
    cluster.stop()
print("ok", sqlite_path, folder / "schema-v2-postgres.sql")

"""How tests/data/schema-v4.db and tests/data/schema-v4-postgres.sql were made:
run with the eventstore of schema version 4 (commit 4a0672e) importable, e.g.

    mkdir /tmp/v4 && git archive 4a0672e | tar -x -C /tmp/v4
    PYTHONPATH=/tmp/v4:/tmp/v4/tests python tests/data/make_schema_v4_db.py tests/data

It writes through that version's own app (WebTest), so each database is exactly
what that code made: programs FOO and BAR, a SYSTEM user "admin" and a user
"reader" (read on FOO), a few events, and two subscriptions (one acknowledged,
with a filter and a description), so that the upgrade to version 5 adds the
webhook columns to a table that has rows. The SQLite file is checkpointed and
vacuumed; the PostgreSQL database (on a throwaway cluster, tests/pg_cluster.py)
is written out with pg_dump as plain SQL (--inserts, no owner, no privileges).
"""

import base64
import subprocess
import sys
from pathlib import Path

import webtest

import eventstore
import eventstore_storage
from pg_cluster import Cluster

assert eventstore_storage.SCHEMA_VERSION == 4, "run this with the version-4 eventstore"
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
    for program in ("FOO", "BAR"):
        client.put_json(f"/programs/{program}", {"Name": f"Program {program}"}, headers=auth)
    for n in range(4):
        client.put_json(f"/events/FOO-{n}", {"ProgramId": "FOO", "ProgramMemberId": f"m{n}",
                                             "EventType": "CourseCompleted",
                                             "EventStartUTC": "2026-01-01T00:00:00Z"}, headers=auth, status=200)
    client.put_json("/events/BAR-1", {"ProgramId": "BAR", "ProgramMemberId": "m1", "EventType": "Badge",
                                      "EventStartUTC": "2026-01-01T00:00:00Z"}, headers=auth, status=200)
    client.put_json("/subscriptions/lms", {"Filter": {"ProgramId": ["FOO"]}, "Description": "the LMS"},
                    headers=auth, status=201)
    client.post_json("/subscriptions/lms/ack", {"Through": 2}, headers=auth, status=200)
    client.put_json("/subscriptions/all", {}, headers=auth, status=201)
    app.close()


sqlite_path = folder / "schema-v4.db"
sqlite_path.unlink(missing_ok=True)
fill(str(sqlite_path))
conn = eventstore.open_storage(str(sqlite_path)).session().conn
conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
conn.execute("VACUUM")
conn.close()

cluster = Cluster.start()
try:
    url = cluster.url("v4")
    import psycopg
    with psycopg.connect(cluster.url(), autocommit=True) as admin:
        admin.execute("CREATE DATABASE v4")
    fill(url)
    dump = subprocess.run([f"{cluster.binaries}/pg_dump", "--inserts", "--no-owner", "--no-privileges",
                           "--dbname", url], check=True, capture_output=True, text=True).stdout
    # pg_dump 15.14 and later fence the script with psql's \restrict: not SQL.
    lines = [line for line in dump.splitlines() if not line.startswith("\\")]
    (folder / "schema-v4-postgres.sql").write_text("\n".join(lines) + "\n")
finally:
    cluster.stop()
print("ok", sqlite_path, folder / "schema-v4-postgres.sql")

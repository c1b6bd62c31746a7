"""Issue 35's floor: the cheapest durable ``PUT /events/{id}`` and ``GET
/events/{id}`` this stack can answer, served the way serve.py serves eventstore
(one process pinned to a CPU, waitress with serve.py's settings, the access log).

A PUT's body is parsed as JSON, rendered back and hashed, and upserted with the
next Sequence into eventstore's own events table (its indexes, its trigger,
eventstore_sqlite's statement and connection settings: WAL, synchronous=FULL)
by a group commit in ``BEGIN IMMEDIATE ... COMMIT``; the 200 comes after the
COMMIT. A GET reads the stored doc by EventId on its thread's own connection.
Nothing else: no authentication, routing, validation, type rules, schemas,
preconditions, metrics, request ids or cross-process lock. Every other request
goes to eventstore itself (bench/cost.py registers and fills through it).

No design of eventstore in this stack (Python, waitress, SQLite with this
schema, durable) can cost less than this; bench/cost.py measures C1 and C2
against it beside the do-nothing app. Its group is committed by a writer thread
of its own, as eventstore's is, or with ``--leader-commits`` by the first
request thread that finds no commit in progress, for its own change and every
change queued meanwhile (leader/follower: the alternative writer design, which
saves the hand-over to a writer thread and back).

``python bench/floor_server.py [--leader-commits] [serve.py's options]``
"""

import hashlib
import json
import queue
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import eventstore  # noqa: E402
import eventstore_sqlite  # noqa: E402
import serve  # noqa: E402


class _Change:
    __slots__ = ("row", "revision", "done")

    def __init__(self, row):
        self.row, self.revision = row, None
        self.done = threading.Lock()
        self.done.acquire()  # released once the change is committed


def commit(conn, changes):
    """One durable transaction for ``changes``: each takes the next Sequence."""
    conn.execute("BEGIN IMMEDIATE")
    seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
    for change in changes:
        seq += 1
        found = conn.execute(eventstore_sqlite.UPSERT_EVENT, {**change.row, "seq": seq}).fetchall()
        change.revision = found[0][0] if found else 0
    conn.execute("COMMIT")


class WriterThread:
    """eventstore's shape: a thread of its own commits whatever is queued."""

    def __init__(self, db):
        self._queue = queue.SimpleQueue()
        threading.Thread(target=self._run, args=(db,), daemon=True).start()

    def write(self, change):
        self._queue.put(change)
        change.done.acquire()

    def _run(self, db):
        conn = eventstore_sqlite.connect(db)
        while True:
            changes = [self._queue.get()]
            while not self._queue.empty():
                changes.append(self._queue.get())
            commit(conn, changes)
            for change in changes:
                change.done.release()


class LeaderCommits:
    """Leader/follower: a request thread that finds no commit in progress commits
    its change and every one queued meanwhile, then hands the lead to the first
    change queued during its commit; the others wait to be answered or to lead."""

    def __init__(self, db):
        self._queued, self._lock, self._committing = [], threading.Lock(), False
        self._conn = eventstore_sqlite.connect(db, check_same_thread=False)  # used by the leader of the moment

    def write(self, change):
        with self._lock:
            self._queued.append(change)
            leading, self._committing = not self._committing, True
        if not leading:
            change.done.acquire()  # committed by a leader, or handed the lead
            if change.revision is not None:
                return
        with self._lock:
            changes, self._queued = self._queued, []
        commit(self._conn, changes)
        for other in changes:
            if other is not change:
                other.done.release()
        with self._lock:
            if self._queued:
                self._queued[0].done.release()  # its thread leads the next group
            else:
                self._committing = False


class FloorApp:
    def __init__(self, app, db, leader_commits=False):
        self.app, self.db = app, db
        self.writer = LeaderCommits(db) if leader_commits else WriterThread(db)
        self._local = threading.local()

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if path.startswith("/events/") and path.count("/") == 2 and method in ("PUT", "GET"):
            return (self.put if method == "PUT" else self.get)(path[len("/events/"):], environ, start_response)
        return self.app(environ, start_response)

    def put(self, event_id, environ, start_response):
        body = json.loads(environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"])))
        doc = json.dumps(body, separators=(",", ":"))
        change = _Change({"event_id": event_id, "program_id": event_id.partition("-")[0],
                          "event_type": body["EventType"], "member_id": body.get("ProgramMemberId"),
                          "start_us": None, "end_us": None, "doc": doc, "ref_event_id": None,
                          "content_hash": hashlib.sha256(doc.encode()).digest(), "now": eventstore.now_us()})
        self.writer.write(change)
        start_response("200 OK", [("Location", f"/events/{event_id}"), ("ETag", f'"{change.revision}"'),
                                  ("Content-Length", "0")])
        return [b""]

    def get(self, event_id, environ, start_response):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = eventstore_sqlite.connect(self.db)
        row = conn.execute("SELECT doc, revision FROM events WHERE event_id = ?", (event_id,)).fetchone()
        if row is None:
            start_response("404 Not Found", [("Content-Length", "0")])
            return [b""]
        body = row[0].encode()
        start_response("200 OK", [("ETag", f'"{row[1]}"'), ("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]


def main(argv):
    leader_commits = "--leader-commits" in argv
    args = serve.parse_args([arg for arg in argv if arg != "--leader-commits"])
    serve.configure_logging(args.log_format)
    serve.pin_to_cpu(args)
    storage = eventstore.open_storage(args.db, threads=args.threads)
    admin_key = serve.create_first_admin(storage)
    app = eventstore.make_app(storage)
    floor = FloorApp(app, args.db, leader_commits)
    access_log = serve.AccessLog(floor) if args.access_log else None
    server = serve.create_waitress(access_log or floor, args)
    serve.announce(storage, args.host, server.effective_port, admin_key)
    app.start()
    try:
        serve.run_until_stopped(server, app)
    finally:
        if access_log is not None:
            access_log.close()


if __name__ == "__main__":
    main(sys.argv[1:])

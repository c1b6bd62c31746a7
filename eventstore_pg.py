"""eventstore on PostgreSQL: the storage interface of eventstore_storage.py
for several servers sharing one database.

Imported only for a ``postgresql://`` URL; needs psycopg 3 and its pool
(requirements-postgres.txt). The schema is schema-postgres.sql.

How the change feed stays "Sequence order, never skipped" while servers
commit concurrently (docs/DESIGN.md has the measurements of the alternatives): every write
transaction that may change events first calls eventstore_take_sequences(n),
which, under an advisory lock held for that call only, gives the transaction
its xid and a block of n Sequences. So xid order is Sequence order, and a
feed that shows only rows whose xid is older than every transaction still in
progress (``xid < pg_snapshot_xmin(pg_current_snapshot())``) never shows a
Sequence while a smaller one can still commit. The price: the feed waits for
the oldest transaction in progress in the whole cluster (``/health`` reports
how long that is). A transaction that needs more Sequences than it took
raises SequencesExhausted; the writer runs it again with a larger block.
Unused Sequences are gaps: the contract promises increasing, not consecutive.
"""

import contextlib
import copy
import hashlib
import json
import logging
import os
import queue
import select
import stat
import tempfile
import threading
import time
import weakref

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors
from psycopg import pq

from eventstore_storage import (EVENT_COLUMNS, SCHEMA_VERSION, Change, CommitWatch, EventKey, EventRow, EventState,
                                FeedBacklog, Failure, KeyInfo, KeyRow, LiveEvent, ProgramRow, Reads, SchemaRow,
                                SequencesExhausted, Session, Storage, StorageOpenError, SubscriptionRow, SweepRow,
                                Transaction, TypeRules, TypeState, UserRow, SUBSCRIPTION_COLUMN_NAMES,
                                SUBSCRIPTION_COLUMNS, WEBHOOK_COLUMN_NAMES, data_path, event_row,
                                safe_db_name, webhook_of, webhook_values)

SCHEMA_PATH = data_path("schema-postgres.sql")
SCHEMA_LOCK = 7310581      # advisory lock id: one process applies the schema at a time
TYPE_LOCKS = 7310583       # advisory locks (TYPE_LOCKS, hashtext(type)): a type's writers against its schema's change
NOTIFY_CHANNEL = "eventstore"
PROGRAMS_READ_AT_BEGIN = 1000  # up to this many programs, a write transaction reads them all at BEGIN
RECHECK_SECONDS = 0.25     # the commit watch looks even without a notification this often (at least)
READ_ONLY = "-c default_transaction_read_only=on"  # request threads read; every write goes through a session
BARRIER = "xid < pg_snapshot_xmin(pg_current_snapshot())"

log = logging.getLogger("eventstore")


def _subscription(row):
    """A subscriptions row -> SubscriptionRow."""
    name, owner, description, programs, event_types, position, created_us, last_ack_us = row[:8]
    return SubscriptionRow(name, owner, description, tuple(programs), tuple(event_types), position, created_us,
                           last_ack_us, webhook_of(row[8:]))


def _member(member_id):
    """A ProgramMemberId as stored: its UTF-8 bytes."""
    return None if member_id is None else member_id.encode("utf-8", "surrogatepass")


def local_file(url, suffix):
    """A file the processes of this machine that serve the database at ``url`` share,
    in a folder of this user's alone (``eventstore-UID`` in the temporary folder,
    0700): at a name anyone can guess in a folder anyone may write, another local
    user could put a file or a link there first. None where that folder is not
    this user's alone."""
    folder = os.path.join(tempfile.gettempdir(), f"eventstore-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        log.warning("%s is not a folder of this user's alone; shared files such as the failed-authentication "
                    "counts are kept per process", folder)
        return None
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return os.path.join(folder, f"{digest}-{suffix}")


# --- Reads --------------------------------------------------------------------

class PostgresReads(Reads):
    """Every read of the storage interface: on ``conn`` (a transaction's), or on
    a connection from ``pool`` that the calling thread keeps while it lives; it
    goes back to the pool when the thread ends, or is replaced if it broke.
    Outside a transaction, GET by id goes through ``pipeline`` (a ReadPipeline)."""
    # PERF: a connection kept per thread, not borrowed per statement (docs/DESIGN.md, "Measured choices").

    def __init__(self, pool=None, conn=None, pipeline=None):
        self.pool, self.conn, self.pipeline = pool, conn, pipeline
        self._local = threading.local()
        self._holders = weakref.WeakSet()  # every thread's _Held, for close_held()

    def _held(self):
        held = getattr(self._local, "held", None)
        if held is None or held.conn.broken or held.conn.closed:
            if held is not None:
                held.give_back()
            held = self._local.held = _Held(self.pool)
            self._holders.add(held)
        return held

    def close_held(self):
        """Close the connections threads still hold (the pool closes only those it has)."""
        for held in list(self._holders):
            held.conn.close()

    def _connection(self):
        return self.conn if self.conn is not None else self._held().conn

    def _execute(self, sql, params):
        """``sql`` on this thread's connection. Outside a transaction, a statement
        that finds its connection broken (the server restarted, the backend was
        terminated) runs once more on a fresh one: a read changes nothing, and the
        first answer after a blip is then the right one, not a 503."""
        if self.conn is not None:
            return self.conn.execute(sql, params)
        held = self._held()
        try:
            return held.conn.execute(sql, params)
        except psycopg.OperationalError:
            if not (held.conn.broken or held.conn.closed):
                raise
            return self._held().conn.execute(sql, params)

    def _all(self, sql, params=()):
        return self._execute(sql, params).fetchall()

    def _one(self, sql, params=()):
        return self._execute(sql, params).fetchone()

    # Users, keys, grants

    def key_row(self, key_id):
        row = self._one(
            "SELECT k.user_id, k.key_hash, k.revoked_us, k.last_used_us, u.is_system, u.disabled"
            " FROM api_keys k JOIN users u ON u.user_id = k.user_id WHERE k.key_id = %s", (key_id,))
        return row and KeyRow._make(row)

    def grants_of(self, user_id):
        return dict(self._all("SELECT program_id, access FROM grants WHERE user_id = %s", (user_id,)))

    def any_user(self):
        return self._one("SELECT 1 FROM users LIMIT 1") is not None

    def user_state(self, user_id):
        row = self._one("SELECT disabled FROM users WHERE user_id = %s", (user_id,))
        return None if row is None else "disabled" if row[0] else "active"

    def list_users(self):
        grants = {}
        for user_id, program_id, access in self._all(
                "SELECT user_id, program_id, access FROM grants ORDER BY user_id, program_id"):
            grants.setdefault(user_id, []).append((program_id, access))
        return [UserRow(user_id, is_system, disabled, grants.get(user_id, [])) for user_id, is_system, disabled in
                self._all("SELECT user_id, is_system, disabled FROM users ORDER BY user_id")]

    def find_user(self, user_id):
        row = self._one("SELECT is_system, disabled FROM users WHERE user_id = %s", (user_id,))
        if row is None:
            return None
        grants = self._all("SELECT program_id, access FROM grants WHERE user_id = %s ORDER BY program_id",
                           (user_id,))
        return UserRow(user_id, row[0], row[1], [tuple(grant) for grant in grants])

    def list_keys(self, user_id):
        return [KeyInfo._make(row) for row in self._all(
            "SELECT key_id, created_us, last_used_us, revoked_us FROM api_keys"
            " WHERE user_id = %s ORDER BY created_us, key_id", (user_id,))]

    # Programs and event types

    def find_program(self, program_id):
        row = self._one("SELECT name, registered_types_only FROM programs WHERE program_id = %s", (program_id,))
        return row and ProgramRow(program_id, *row)

    def list_programs(self):
        return [ProgramRow._make(row) for row in self._all(
            "SELECT program_id, name, registered_types_only FROM programs ORDER BY program_id")]

    def type_registered(self, event_type):
        return self._one("SELECT 1 FROM event_types WHERE event_type = %s", (event_type,)) is not None

    def type_state(self, event_type):
        row = self._one("SELECT schema_version, retain_days FROM event_types WHERE event_type = %s", (event_type,))
        return row and TypeState._make(row)

    def type_schema(self, event_type, version):
        row = self._one("SELECT schema, created_us FROM event_type_schemas WHERE event_type = %s AND version = %s",
                        (event_type, version))
        return row and SchemaRow(event_type, version, *row)

    def live_events_of_type(self, event_type, after=0):
        if self.conn is not None:  # a write transaction's own view: everything committed before its lock
            return self.last_sequence(), (LiveEvent._make(row) for row in self._all(
                self.LIVE_OF_TYPE, {"type": event_type, "after": after}))
        conn = self._connection()
        scope = conn.transaction()
        scope.__enter__()
        try:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            head = conn.execute(f"SELECT COALESCE(MAX(seq), 0) FROM events WHERE {BARRIER}").fetchone()[0]
        except BaseException as exc:
            scope.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return head, self._walk_live(conn, scope, event_type, after)

    # Through events_by_type: per program that has live events of the type.
    LIVE_OF_TYPE = ("SELECT event_id, doc FROM events WHERE event_type = %(type)s AND seq > %(after)s AND NOT deleted"
                    " AND program_id = ANY(ARRAY(SELECT program_id FROM event_type_counts"
                    " WHERE event_type = %(type)s AND events > 0))")

    def _walk_live(self, conn, scope, event_type, after):
        """The rows of live_events_of_type's snapshot (a head above which nothing is missed:
        every Sequence at or below the barrier's head was committed before the snapshot)."""
        try:
            with conn.cursor(name="eventstore_live_of_type") as cursor:
                cursor.itersize = 1000
                cursor.execute(self.LIVE_OF_TYPE, {"type": event_type, "after": after})
                for row in cursor:
                    yield LiveEvent._make(row)
        except BaseException as exc:
            scope.__exit__(type(exc), exc, exc.__traceback__)
            raise
        scope.__exit__(None, None, None)

    def retained_types(self):
        return self._one("SELECT COUNT(*) FROM event_types WHERE retain_days IS NOT NULL")[0]

    def last_sweep(self, name):
        row = self._one("SELECT finished_us, count FROM sweeps WHERE name = %s", (name,))
        return row and SweepRow._make(row)

    def registered_types(self, limit):
        names = [row[0] for row in self._all(
            "SELECT event_type FROM event_types ORDER BY event_type LIMIT %s", (limit,))]
        if len(names) < limit:
            return names, len(names)
        return names, self._one("SELECT COUNT(*) FROM event_types")[0]

    def event_types_json(self, programs, event_type=None):
        """As SQLiteReads.event_types_json: the catalogue's entries as one JSON
        text, rendered by PostgreSQL in one statement from the count rows, byte
        for byte as SQLite renders it: row_to_json is compact where json_build_object
        writes " : " and json_agg ", ", and names sort by their bytes (COLLATE "C"),
        as SQLite's BINARY does, whatever the database's collation."""
        params = {"all": programs is None, "programs": list(programs or ()), "type": event_type}
        in_programs = "(%(all)s OR program_id = ANY(%(programs)s))"
        one = "(%(type)s::text IS NULL OR event_type = %(type)s)"
        return self._one(f"""
            SELECT '[' || COALESCE(string_agg(row_to_json(entry)::text, ',' ORDER BY entry."EventType" COLLATE "C"),
                                   '') || ']'
            FROM (SELECT listed.event_type AS "EventType", registered.description AS "Description",
                         registered.event_type IS NOT NULL AS "Registered",
                         (SELECT COALESCE('[' || string_agg(row_to_json(counted)::text, ','
                                                            ORDER BY counted."ProgramId" COLLATE "C") || ']', '[]')::json
                          FROM (SELECT program_id AS "ProgramId", events AS "Events" FROM event_type_counts
                                WHERE event_type = listed.event_type AND events > 0 AND {in_programs}) AS counted)
                         AS "Programs",
                         schemas.schema::json AS "Schema", registered.schema_version AS "SchemaVersion",
                         registered.retain_days AS "RetainDays"
                  FROM (SELECT event_type FROM event_types WHERE {one}
                        UNION SELECT event_type FROM event_type_counts WHERE events > 0 AND {one} AND {in_programs})
                       AS listed
                  LEFT JOIN event_types AS registered USING (event_type)
                  LEFT JOIN event_type_schemas AS schemas
                      ON schemas.event_type = registered.event_type AND schemas.version = registered.schema_version)
                 AS entry""", params)[0]

    # Events and the feed

    def read_event(self, event_id):
        if self.conn is None:  # GET /events/{id}: the hot path
            return self.pipeline.read_event(event_id)
        row = self._one(f"SELECT {EVENT_COLUMNS} FROM events WHERE event_id = %s", (event_id,))
        return row and EventRow._make(row)

    def last_sequence(self):
        """The largest Sequence the feed can show now (behind the barrier), 0 for none."""
        return self._one(f"SELECT COALESCE(MAX(seq), 0) FROM events WHERE {BARRIER}")[0]

    def last_committed_sequence(self):
        """The largest Sequence committed (what this statement's snapshot sees),
        without the barrier: it may be ahead of the head while an older transaction
        runs."""
        return self._one("SELECT COALESCE(MAX(seq), 0) FROM events")[0]

    def changes_since(self, seq, limit):
        return [Change._make(row) for row in self._all(
            f"SELECT seq, program_id, event_type FROM events WHERE seq > %s AND {BARRIER} ORDER BY seq LIMIT %s",
            (seq, limit))]

    def read_feed(self, programs, query, strategy=None):
        """One page of the change feed (as SQLiteReads.read_feed): rows behind the
        barrier only, in one statement, so the page is one snapshot. ``strategy``
        is SQLite's; PostgreSQL's planner chooses its own way."""
        found = self._feed_where(programs, query)
        if found is None:
            return []
        where, params = found
        return [EventRow._make(row) for row in self._all(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE {where} ORDER BY seq LIMIT %s", (*params, query.limit + 1))]

    def feed_backlog(self, programs, query):
        """read_feed's rows, counted in the statement that finds them."""
        found = self._feed_where(programs, query)
        if found is None:
            return FeedBacklog(0, None)
        where, params = found
        return FeedBacklog._make(self._one(
            f"SELECT COUNT(*), (array_agg(updated_us ORDER BY seq))[1] FROM (SELECT seq, updated_us FROM events"
            f" WHERE {where} ORDER BY seq LIMIT %s) AS page", (*params, query.limit + 1)))

    @staticmethod
    def _feed_where(programs, query):
        """A feed query -> (its WHERE clause, parameters), or None when it matches nothing."""
        where, params = [f"seq > %s AND {BARRIER}"], [query.after]
        if programs is not None:
            where.append("program_id = ANY(%s)")
            params.append(list(programs))
        if query.event_types:
            # Stored types never hold U+0000 (text cannot): such a value matches nothing.
            types = [event_type for event_type in query.event_types if "\x00" not in event_type]
            if not types:
                return None
            where.append("event_type = ANY(%s)")
            params.append(types)
        if query.member_id is not None:
            where.append("member_id = %s")
            params.append(_member(query.member_id))
        if query.ref_event_id is not None:
            if "\x00" in query.ref_event_id:
                return None
            where.append("ref_event_id = %s")
            params.append(query.ref_event_id)
        for op, value in ((">=", query.start_from_us), ("<", query.start_before_us)):
            if value is not None:
                where.append(f"start_us {op} %s")
                params.append(value)
        return " AND ".join(where), params

    def sequence_before(self, time_us):
        """Walked down from the head, behind the barrier."""
        row = self._one(f"SELECT seq FROM events WHERE updated_us < %s AND {BARRIER} ORDER BY seq DESC LIMIT 1",
                        (time_us,))
        return row[0] if row else 0

    def export_events(self, programs=()):
        """Every event (tombstones included) in Sequence order, as EventRows, from one
        snapshot, streamed through a server-side cursor."""
        where = "WHERE program_id = ANY(%s)" if programs else ""
        conn = self._connection()
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            with conn.cursor(name="eventstore_export") as cursor:
                cursor.itersize = 1000
                cursor.execute(f"SELECT {EVENT_COLUMNS} FROM events {where} ORDER BY seq",
                               (list(programs),) if programs else ())
                for row in cursor:
                    yield EventRow._make(row)

    # Subscriptions

    def find_subscription(self, name):
        row = self._one(f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE name = %s", (name,))
        return row and _subscription(row)

    def list_subscriptions(self, owner=None):
        return [_subscription(row) for row in self._all(
            f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE %(all)s OR owner = %(owner)s ORDER BY name",
            {"all": owner is None, "owner": owner})]

    def webhook_subscriptions(self):
        return [_subscription(row) for row in self._all(
            f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE webhook_url IS NOT NULL ORDER BY name")]

    def answers(self):
        self._one("SELECT 1 FROM programs LIMIT 1")


class _Held:
    """A pool connection held by one thread; given back when this object goes
    (its thread ended, or its connection broke)."""

    def __init__(self, pool):
        self.conn = pool.getconn()
        self.give_back = weakref.finalize(self, pool.putconn, self.conn)


class _Read:
    __slots__ = ("event_id", "done", "row", "error")

    def __init__(self, event_id):
        self.event_id, self.row, self.error = event_id, None, None
        self.done = threading.Lock()
        self.done.acquire()  # released when answered


class ReadPipeline:
    """GET /events/{id}, the hottest read, for every request thread of this
    process on one connection of its own: a thread hands its EventId over and
    waits; one thread reads every id waiting in one statement and hands each
    thread its row (PERF: not a connection per request thread; docs/DESIGN.md,
    "Measured choices"). Reads change nothing, so a batch whose connection
    broke is read once more on a new one. The pipeline waits at most ``timeout``
    seconds for an answer before it gives its connection up, so a thread waits
    at most about twice that."""

    STATEMENT = b"eventstore_read_events"
    SQL = f"SELECT {EVENT_COLUMNS} FROM events WHERE event_id = ANY($1::text[])".encode()
    MAX_BATCH = 256

    def __init__(self, connect, timeout):
        self.connect, self.timeout = connect, timeout
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._starting = threading.Lock()

    def read_event(self, event_id):
        if self._thread is None or not self._thread.is_alive():
            self._start()
        read = _Read(event_id)
        self._queue.put(read)
        wait = 2 * self.timeout + 1  # a try on each of two connections
        if not read.done.acquire(timeout=wait):
            raise psycopg.OperationalError(f"PostgreSQL did not answer a read within {wait:g} s")
        if read.error is not None:
            raise read.error
        return read.row

    def _start(self):
        with self._starting:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="eventstore-reads", daemon=True)
                self._thread.start()

    def close(self):
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(self.timeout)

    def _run(self):
        conn = None
        try:
            while True:
                batch = [self._queue.get()]
                while len(batch) < self.MAX_BATCH and not self._queue.empty():
                    batch.append(self._queue.get())
                reads = [read for read in batch if read is not None]
                for attempt in (1, 2):
                    try:
                        if conn is None:
                            conn = self._open()
                        rows = self._read(conn.pgconn, {read.event_id for read in reads})
                        for read in reads:
                            read.row = rows.get(read.event_id)
                        break
                    except Exception as exc:  # the connection broke, or none could be opened
                        if conn is not None:
                            conn.close()
                            conn = None
                        if attempt == 2:
                            log.warning("database unavailable for reads: %r", exc)
                            for read in reads:  # each its own copy: raised in one thread only
                                read.error = copy.copy(exc).with_traceback(None)
                for read in reads:
                    read.done.release()
                if len(reads) < len(batch):  # close() was called
                    return
        finally:
            if conn is not None:
                conn.close()

    def _open(self):
        conn = self.connect()
        _succeeded(conn.pgconn.prepare(self.STATEMENT, self.SQL))
        conn.pgconn.nonblocking = 1  # so that waiting has a bound (_wait)
        return conn

    def _read(self, pgconn, event_ids):
        """{EventId: row} of those that exist."""
        pgconn.send_query_prepared(self.STATEMENT, [_text_array(event_ids)])
        deadline = time.monotonic() + self.timeout
        results = []
        while True:
            _wait_for_answer(pgconn, deadline)
            result = pgconn.get_result()
            if result is None:
                break
            results.append(_succeeded(result))
        (result,) = results
        rows = (_event_of(result, row) for row in range(result.ntuples))
        return {row.event_id: row for row in rows}



def _wait_for_answer(pgconn, deadline=None):
    """Send what libpq holds for ``pgconn`` and wait until a result can be read
    without blocking: get_result() would wait holding the GIL (psycopg waits in
    Python, so must we), and every thread of the process with it. ``deadline``
    (time.monotonic()) bounds the wait, or None."""
    while pgconn.flush():
        _poll(pgconn, deadline, select.POLLIN | select.POLLOUT)
    while pgconn.is_busy():
        _poll(pgconn, deadline, select.POLLIN)


def _poll(pgconn, deadline, events):
    poll = select.poll()
    poll.register(pgconn.socket, events)
    if not poll.poll(None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000):
        raise psycopg.OperationalError("PostgreSQL did not answer in time")
    pgconn.consume_input()


def _text_array(values):
    """A PostgreSQL text[] literal of ``values`` (each quoted, so any text goes)."""
    return ("{" + ",".join('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' for value in values)
            + "}").encode("utf-8")


def _event_of(result, row):
    """An EventRow, from a libpq result in text format."""
    value = result.get_value
    seq, event_id, program_id, event_type, doc, revision, created_us, updated_us = (
        value(row, 0), value(row, 1), value(row, 2), value(row, 3), value(row, 4), value(row, 5), value(row, 6),
        value(row, 7))
    return EventRow(int(seq), event_id.decode(), program_id.decode(), event_type.decode(), doc and doc.decode(),
                    int(revision), int(created_us), int(updated_us))


def _libpq_parameters(params):
    """-> (values, formats) for libpq: str and int as text, bytes as binary, None as NULL."""
    return ([value if value is None or isinstance(value, bytes) else str(value).encode("utf-8")
             for value in params], [1 if isinstance(value, bytes) else 0 for value in params])


def _prepare(pgconn, prepared, name, sql):
    """Prepare ``sql`` ($1, $2 ... placeholders) as ``name`` on ``pgconn``
    unless ``prepared`` (the names prepared on it) holds it. The hottest
    write (PUT's upsert) runs through libpq itself, as a statement prepared
    once per connection (PERF: psycopg's cursor costs more CPU; docs/DESIGN.md,
    "Measured choices"). A statement can go behind our back (psycopg deallocates every prepared
    statement of a connection when it rolls back a transaction of its own; so
    may a pooler): whoever sees InvalidSqlStatementName discards its name, and
    the transaction, now aborted, runs again and prepares it anew."""
    if name not in prepared:
        try:
            _succeeded(pgconn.prepare(name.encode(), sql.encode()))
        except pg_errors.DuplicatePreparedStatement:
            pass
        prepared.add(name)


def _succeeded(result):
    """A libpq result -> itself, or its error raised as psycopg raises it."""
    if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        raise pg_errors.error_from_result(result, encoding="utf-8")
    return result


# --- Writes -------------------------------------------------------------------

UPSERT_EVENT = (
    "INSERT INTO events (seq, xid, event_id, program_id, event_type, member_id, start_us, end_us, doc,"
    " ref_event_id, content_hash, deleted, revision, created_us, updated_us)"
    " VALUES (%(seq)s, pg_current_xact_id(), %(event_id)s, %(program_id)s, %(event_type)s, %(member_id)s,"
    " %(start_us)s, %(end_us)s, %(doc)s, %(ref_event_id)s, %(content_hash)s, false, 1, %(now)s, %(now)s)"
    " ON CONFLICT (event_id) DO UPDATE SET seq = excluded.seq, xid = excluded.xid,"
    " event_type = excluded.event_type, member_id = excluded.member_id, start_us = excluded.start_us,"
    " end_us = excluded.end_us, doc = excluded.doc, ref_event_id = excluded.ref_event_id,"
    " content_hash = excluded.content_hash, deleted = false, revision = events.revision + 1,"
    " updated_us = excluded.updated_us"
    " WHERE events.deleted OR events.content_hash IS DISTINCT FROM excluded.content_hash"
    " RETURNING revision")
INSERT_EVENT = UPSERT_EVENT[:UPSERT_EVENT.index(" ON CONFLICT")]
# The same upsert with libpq's placeholders (see _prepare).
UPSERT_PARAMETERS = ("seq", "event_id", "program_id", "event_type", "member_id", "start_us", "end_us", "doc",
                     "ref_event_id", "content_hash", "now")
UPSERT_STATEMENT = "eventstore_upsert_event"
UPSERT_EVENT_PREPARED = UPSERT_EVENT
for _number, _name in enumerate(UPSERT_PARAMETERS, 1):
    UPSERT_EVENT_PREPARED = UPSERT_EVENT_PREPARED.replace(f"%({_name})s", f"${_number}")
UPDATE_EVENT = (
    "UPDATE events SET seq = %(seq)s, xid = pg_current_xact_id(), event_type = %(event_type)s,"
    " member_id = %(member_id)s, start_us = %(start_us)s, end_us = %(end_us)s, doc = %(doc)s,"
    " ref_event_id = %(ref_event_id)s, content_hash = %(content_hash)s, deleted = false,"
    " revision = revision + 1, updated_us = %(now)s WHERE event_id = %(event_id)s")


def _event_row(event, seq, now):
    row = event_row(event, seq, now)
    row["member_id"] = _member(row["member_id"])
    return row


class PostgresTransaction(PostgresReads, Transaction):
    """One write transaction on ``conn``: its reads see its own writes; ``now``;
    the programs' rules; the block of Sequences taken at its start (``seqs``
    of them; none when 0, and then it must not change events)."""

    PIPELINE_MAX = 64  # upserts sent before their answers are read (see upsert_event)

    def __init__(self, conn, now, seqs, prepared=None):
        self._sent = []  # the upserts on their way, each a list its answer goes in
        super().__init__(conn=conn)
        self.prepared = set() if prepared is None else prepared  # see _prepare
        self.now = now
        self.rules = TypeRules(self)
        self.wanted = seqs
        self._next = self._end = 0
        self._written = 0
        self._programs = None  # program id -> (name, registered_types_only), when read at BEGIN
        if not seqs:
            _succeeded(conn.pgconn.exec_(b"BEGIN"))
            return
        # PERF: one round trip for all a group commit needs first (docs/DESIGN.md,
        # "Measured choices"): BEGIN, the Sequences, the NOTIFY (sent with
        # the COMMIT; a transaction that then changes nothing wakes the listeners for
        # nothing: they find no new change and wait again), and the programs' rules.
        # The SQL holds no input: seqs is this module's int, the channel a constant.
        result = _succeeded(conn.pgconn.exec_(
            f"BEGIN; SELECT eventstore_take_sequences({int(seqs)}), pg_notify('{NOTIFY_CHANNEL}', ''),"
            f" (SELECT COALESCE(json_object_agg(program_id, json_build_array(name, registered_types_only)), '{{}}')"
            f" FROM programs HAVING COUNT(*) <= {PROGRAMS_READ_AT_BEGIN})".encode()))
        self._next = int(result.get_value(0, 0))
        self._end = self._next + seqs
        programs = result.get_value(0, 2)
        if programs is not None:
            self._programs = {program_id: ProgramRow(program_id, *rule)
                              for program_id, rule in json.loads(programs).items()}

    @property
    def conn(self):
        """The connection, for any statement but an upsert: the answers of the
        upserts on their way are read first."""
        self.settle()
        return self._conn

    @conn.setter
    def conn(self, conn):
        self._conn = conn

    def settle(self):
        """Read the answers of the upserts still on their way (before COMMIT or
        ROLLBACK). One that failed has aborted the transaction: COMMIT says so."""
        if self._sent:
            self._answer_sent()

    def changes(self):
        return self._written

    def find_program(self, program_id):
        if self._programs is None:
            return super().find_program(program_id)
        return self._programs.get(program_id)

    def _write(self, sql, params=()):
        cursor = self.conn.execute(sql, params)
        self._written += max(cursor.rowcount, 0)
        return cursor

    def peek_seq(self):
        if self._next >= self._end:
            raise SequencesExhausted(max(4 * self.wanted, 16))
        return self._next

    def take_seq(self):
        seq = self.peek_seq()
        self._next += 1
        return seq

    # Events

    def current(self, event_id):
        row = self._one("SELECT revision, deleted, content_hash FROM events WHERE event_id = %s", (event_id,))
        return row and EventState._make(row)

    def upsert_event(self, event):
        """PUT's statement, prepared through libpq (see _prepare) and sent
        in libpq's pipeline mode: a group commit's upserts reach PostgreSQL
        together, and their answers come back together when the first is asked
        for (one round trip, not one each: the writer waited on round trips).
        At most PIPELINE_MAX are on their way, so that neither side's buffer
        fills while the other waits. Each takes its Sequence, also a replay
        that writes nothing (a gap in the Sequences, which PostgreSQL's have)."""
        row = _event_row(event, self.take_seq(), self.now)
        values, formats = _libpq_parameters([row[name] for name in UPSERT_PARAMETERS])
        pgconn = self._conn.pgconn
        if not self._sent:
            _prepare(pgconn, self.prepared, UPSERT_STATEMENT, UPSERT_EVENT_PREPARED)
            pgconn.enter_pipeline_mode()
        pgconn.send_query_prepared(UPSERT_STATEMENT.encode(), values, formats)
        answer = []
        self._sent.append(answer)
        self._written += 1
        if len(self._sent) >= self.PIPELINE_MAX:
            self._answer_sent()
        return lambda: self._revision(answer)

    def _revision(self, answer):
        if not answer:
            self._answer_sent()
        if isinstance(answer[0], Exception):
            raise answer[0]
        return answer[0]

    def _answer_sent(self):
        """Each upsert on its way gets its answer (its revision, None for a
        replay, or the error that failed or aborted it), and the connection
        leaves pipeline mode; one that cannot be read closes the connection."""
        pgconn, sent, self._sent = self._conn.pgconn, self._sent, []

        def next_result():  # waiting as long as COMMIT may: row locks can hold an upsert
            _wait_for_answer(pgconn)
            return pgconn.get_result()
        error = None
        try:
            pgconn.pipeline_sync()
            for answer in sent:
                result = next_result()
                if result is None:
                    raise psycopg.OperationalError("PostgreSQL's answer to an upsert was lost")
                if error is None and result.status != pq.ExecStatus.TUPLES_OK:
                    error = pg_errors.error_from_result(result, encoding="utf-8")
                    if isinstance(error, pg_errors.InvalidSqlStatementName):
                        self.prepared.discard(UPSERT_STATEMENT)  # see _prepare
                if error is not None:  # this one failed, or was not run after one that did
                    answer.append(copy.copy(error))
                else:
                    answer.append(int(result.get_value(0, 0)) if result.ntuples else None)
                next_result()  # the end of this statement's results
            result = next_result()
            if result is None or result.status != pq.ExecStatus.PIPELINE_SYNC:
                raise psycopg.OperationalError("PostgreSQL's answers to the upserts were not what was sent")
            pgconn.exit_pipeline_mode()
        except Exception as exc:
            self._conn.close()  # in an unknown state: the session opens another
            for answer in sent:
                if not answer:
                    answer.append(copy.copy(exc))
            raise

    def current_many(self, event_ids):
        return {row[0]: EventState._make(row[1:]) for row in self._all(
            "SELECT event_id, revision, deleted, content_hash FROM events WHERE event_id = ANY(%s)",
            (list(event_ids),))}

    def insert_events(self, events):
        self._write_many(INSERT_EVENT, [_event_row(event, seq, self.now) for event, seq in events])

    def update_events(self, events):
        self._write_many(UPDATE_EVENT, [_event_row(event, seq, self.now) for event, seq in events])

    def _write_many(self, sql, rows):
        if rows:
            with self.conn.cursor() as cursor:
                cursor.executemany(sql, rows)
                self._written += len(rows)

    def live_revision(self, event_id):
        row = self._one("SELECT revision FROM events WHERE event_id = %s AND NOT deleted", (event_id,))
        return row and row[0]

    def tombstone(self, event_id):
        # The row's fields are overwritten; the old row version stays on disk until
        # VACUUM reclaims it, and in the WAL until it is recycled (docs/DESIGN.md).
        return self._write(
            "UPDATE events SET member_id = NULL, start_us = NULL, end_us = NULL, doc = NULL,"
            " ref_event_id = NULL, content_hash = NULL, deleted = true, revision = revision + 1,"
            " updated_us = %s, seq = %s, xid = pg_current_xact_id() WHERE event_id = %s RETURNING revision",
            (self.now, self.take_seq(), event_id)).fetchone()[0]

    def member_event_ids(self, program_id, member_id):
        return [row[0] for row in self._all(
            "SELECT event_id FROM events WHERE program_id = %s AND member_id = %s ORDER BY seq",
            (program_id, _member(member_id)))]

    def insert_tombstone(self, event_id, program_id, event_type):
        self._write(
            "INSERT INTO events (seq, xid, event_id, program_id, event_type, deleted, revision, created_us,"
            " updated_us) VALUES (%s, pg_current_xact_id(), %s, %s, %s, true, 1, %s, %s)",
            (self.take_seq(), event_id, program_id, event_type, self.now, self.now))

    # Programs and event types

    def put_program(self, program_id, name, registered_types_only=None):
        self.rules.forget()  # the writes after this one in the group read the rule anew
        self._programs = None  # read them from the table again
        return self._write(
            "INSERT INTO programs (program_id, name, created_us, registered_types_only)"
            " VALUES (%s, %s, %s, COALESCE(%s, false)) ON CONFLICT (program_id) DO UPDATE SET name = excluded.name,"
            " registered_types_only = COALESCE(%s, programs.registered_types_only) RETURNING registered_types_only",
            (program_id, name, self.now, registered_types_only, registered_types_only)).fetchone()[0]

    def register_event_type(self, event_type, description):
        self.rules.forget()  # the writes after this one in the group read the rule anew
        self._write(
            "INSERT INTO event_types (event_type, description, created_us, updated_us) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (event_type) DO UPDATE SET description = excluded.description,"
            " updated_us = excluded.updated_us", (event_type, description, self.now, self.now))

    def strict_users_of_type(self, event_type):
        return self._all(
            "SELECT c.program_id, c.events FROM event_type_counts AS c JOIN programs AS p USING (program_id)"
            " WHERE c.event_type = %s AND c.events > 0 AND p.registered_types_only ORDER BY c.program_id",
            (event_type,))

    def type_registered(self, event_type):
        """Whether ``event_type`` is registered, kept so until this transaction ends:
        its removal (lock_event_type) waits for this transaction's writes of it."""
        return self._one("SELECT 1 FROM event_types WHERE event_type = %s FOR KEY SHARE",
                         (event_type,)) is not None

    def type_state(self, event_type):
        """The type's TypeState, held until this transaction ends: its advisory lock
        shared (a change of its schema takes it exclusively, registered or not, and
        waits for this transaction: see lock_event_type), then its row for key share
        (as type_registered). Read after the lock, so a schema changed meanwhile is seen."""
        # One round trip: two statements in one simple query, each with its own snapshot.
        with psycopg.ClientCursor(self.conn) as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock_shared(%s, hashtext(%s));"
                           " SELECT schema_version, retain_days FROM event_types WHERE event_type = %s FOR KEY SHARE",
                           (TYPE_LOCKS, event_type, event_type), prepare=False)
            cursor.nextset()
            row = cursor.fetchone()
        return row and TypeState._make(row)

    def lock_event_type(self, event_type):
        """Whether ``event_type`` is registered, locked for its removal or a change of
        its schema: after every transaction that wrote it (each holds it, see
        type_state and type_registered) has ended, so that the next statement sees
        their events, and before any other writes it."""
        self._one("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (TYPE_LOCKS, event_type))
        return self._one("SELECT 1 FROM event_types WHERE event_type = %s FOR UPDATE", (event_type,)) is not None

    def set_type_schema(self, event_type, schema):
        self.rules.forget()  # the writes after this one in the group read the rule anew
        version = None
        if schema is not None:
            version = self._write(
                "INSERT INTO event_type_schemas (event_type, version, schema, created_us)"
                " SELECT %(type)s, COALESCE(MAX(version), 0) + 1, %(schema)s, %(now)s FROM event_type_schemas"
                " WHERE event_type = %(type)s RETURNING version",
                {"type": event_type, "schema": schema, "now": self.now}).fetchone()[0]
        self._write("UPDATE event_types SET schema_version = %s, updated_us = %s WHERE event_type = %s",
                    (version, self.now, event_type))
        return version

    def set_retain_days(self, event_type, days):
        self._write("UPDATE event_types SET retain_days = %s, updated_us = %s WHERE event_type = %s",
                    (days, self.now, event_type))

    def expired_events(self, limit):
        # Through events_by_age: per retained type, the range of its live events older than its cutoff.
        return [EventKey._make(row) for row in self._all(
            "SELECT e.event_id, e.program_id, e.event_type FROM event_types AS t"
            " CROSS JOIN LATERAL (SELECT event_id, program_id, event_type FROM events"
            " WHERE event_type = t.event_type AND NOT deleted AND updated_us < %s - t.retain_days * 86400000000::bigint"
            " LIMIT %s) AS e WHERE t.retain_days IS NOT NULL LIMIT %s", (self.now, limit, limit))]

    def take_lease(self, name, holder, seconds):
        return self._write(
            "INSERT INTO leases (name, holder, expires_us) VALUES (%(name)s, %(holder)s, %(now)s + %(ttl)s)"
            " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_us = excluded.expires_us"
            " WHERE leases.holder = excluded.holder OR leases.expires_us <= %(now)s RETURNING holder",
            {"name": name, "holder": holder, "now": self.now, "ttl": int(seconds * 1_000_000)}).fetchone() is not None

    def holds_lease(self, name, holder):
        return self._one("SELECT 1 FROM leases WHERE name = %s AND holder = %s AND expires_us > %s FOR SHARE",
                         (name, holder, self.now)) is not None

    def release_lease(self, name, holder):
        self._write("DELETE FROM leases WHERE name = %s AND holder = %s", (name, holder))

    def record_sweep(self, name, count):
        self._write("INSERT INTO sweeps (name, finished_us, count) VALUES (%s, %s, %s) ON CONFLICT (name)"
                    " DO UPDATE SET finished_us = excluded.finished_us, count = excluded.count",
                    (name, self.now, count))

    def delete_event_type(self, event_type):
        self.rules.forget()  # the writes after this one in the group read the rule anew
        self._write("DELETE FROM event_types WHERE event_type = %s", (event_type,))

    # Users, keys, grants

    def insert_user(self, user_id, is_system):
        self._write("INSERT INTO users (user_id, is_system, created_us) VALUES (%s, %s, %s)",
                    (user_id, bool(is_system), self.now))

    def insert_key(self, key_id, user_id, key_hash):
        self._write("INSERT INTO api_keys (key_id, user_id, key_hash, created_us) VALUES (%s, %s, %s, %s)",
                    (key_id, user_id, key_hash, self.now))

    def set_grants(self, user_id, grants):
        self._write_many(
            "INSERT INTO grants (user_id, program_id, access) VALUES (%s, %s, %s)"
            " ON CONFLICT (user_id, program_id) DO UPDATE SET access = excluded.access",
            [(user_id, program_id, access) for program_id, access in grants.items()])

    def revoke_grant(self, user_id, program_id):
        return bool(self._write("DELETE FROM grants WHERE user_id = %s AND program_id = %s",
                                (user_id, program_id)).rowcount)

    def set_user_disabled(self, user_id, disabled):
        return bool(self._write("UPDATE users SET disabled = %s WHERE user_id = %s", (disabled, user_id)).rowcount)

    def revoke_key(self, user_id, key_id):
        return bool(self._write("UPDATE api_keys SET revoked_us = COALESCE(revoked_us, %s)"
                                " WHERE user_id = %s AND key_id = %s", (self.now, user_id, key_id)).rowcount)

    def touch_key(self, key_id, when):
        self._write("UPDATE api_keys SET last_used_us = %s WHERE key_id = %s", (when, key_id))

    # Subscriptions

    def lock_subscription(self, name):
        """The subscription, its row locked: another transaction's change of it
        waits for this one to end, then reads what it left."""
        row = self._one(f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE name = %s FOR UPDATE", (name,))
        return row and _subscription(row)

    def put_subscription(self, row):
        """A new name two servers create at once: the second waits for the first's
        commit, then writes nothing unless it is the same owner's."""
        return bool(self._write(
            f"INSERT INTO subscriptions ({SUBSCRIPTION_COLUMNS}) VALUES ({', '.join(['%s'] * len(SUBSCRIPTION_COLUMN_NAMES))})"
            " ON CONFLICT (name) DO UPDATE SET description = excluded.description, programs = excluded.programs,"
            " event_types = excluded.event_types, position = excluded.position, "
            + ", ".join(f"{column} = excluded.{column}" for column in WEBHOOK_COLUMN_NAMES)
            + " WHERE subscriptions.owner = excluded.owner",
            (row.name, row.owner, row.description, list(row.programs), list(row.event_types), row.position,
             row.created_us, row.last_ack_us, *webhook_values(row.webhook))).rowcount)

    def set_webhook(self, name, webhook):
        self._write(f"UPDATE subscriptions SET {', '.join(c + ' = %s' for c in WEBHOOK_COLUMN_NAMES)}"
                    " WHERE name = %s", (*webhook_values(webhook), name))

    def acknowledge(self, name, position, when):
        self._write("UPDATE subscriptions SET position = %s, last_ack_us = %s WHERE name = %s",
                    (position, when, name))

    def delete_subscription(self, name):
        return bool(self._write("DELETE FROM subscriptions WHERE name = %s", (name,)).rowcount)


# --- Sessions and the storage ----------------------------------------------------

class PostgresSession(PostgresReads, Session):
    """A connection of its own (the writer's, the command line's): reads, and
    write transactions. A connection that broke is replaced before the next one."""

    def __init__(self, storage):
        self.storage = storage
        super().__init__(conn=storage.connect(application_name="eventstore writer"))
        self.prepared = set()  # the statements prepared on self.conn (see _prepare)

    @contextlib.contextmanager
    def transaction(self, now, seqs=0):
        """BEGIN (see PostgresTransaction) ... COMMIT, on libpq itself: psycopg's
        transaction() would send BEGIN in a round trip of its own. Every way out
        leaves the connection idle, or closed (and replaced by the next one): a
        failed BEGIN (a cancel, a timeout) must not leave it in a transaction."""
        if not self._usable():
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn, self.prepared = self.storage.connect(application_name="eventstore writer"), set()
        pgconn = self.conn.pgconn
        tx = None
        try:
            tx = PostgresTransaction(self.conn, now, seqs, self.prepared)
            yield tx
            tx.settle()
            result = _succeeded(pgconn.exec_(b"COMMIT"))
        except BaseException as exc:
            self._end_failed(tx)
            if pgconn.status != pq.ConnStatus.OK and not isinstance(exc, psycopg.OperationalError):
                raise psycopg.OperationalError(f"the connection to the database was lost: {exc}") from exc
            raise
        if result.command_status != b"COMMIT":
            # COMMIT in a failed transaction rolls it back (a statement failed, and its
            # error was caught): nothing was written; say so.
            raise psycopg.OperationalError("the transaction failed and was rolled back; nothing was written")

    def _usable(self):
        return (not self.conn.closed and not self.conn.broken and self.conn.pgconn.status == pq.ConnStatus.OK
                and self.conn.pgconn.transaction_status == pq.TransactionStatus.IDLE)

    def _end_failed(self, tx):
        """Roll back what a failure left open; a connection that cannot is closed."""
        with contextlib.suppress(Exception):
            if tx is not None:
                tx.settle()
        pgconn = self.conn.pgconn
        with contextlib.suppress(Exception):
            if not self.conn.closed and pgconn.transaction_status in (
                    pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR):
                pgconn.exec_(b"ROLLBACK")
        if not self.conn.closed and not self._usable():
            with contextlib.suppress(Exception):
                self.conn.close()

    def close(self):
        self.conn.close()


class PostgresStorage(Storage):
    """The PostgreSQL database at ``url``: a pool of autocommit connections for
    the request threads (sized from the server's ``threads``), a connection of
    its own for each session and for the commit watch."""

    backend = "postgresql"
    errors = (psycopg.Error, psycopg_pool.PoolTimeout)

    def __init__(self, url, busy_timeout_ms=5000, threads=None):
        self.url = url
        self.busy_timeout_ms, self.threads = busy_timeout_ms, threads
        self._opened = weakref.WeakSet()  # every connection opened for this storage (see forget_after_fork)
        try:
            with self.connect() as conn:
                self.settings = self._check(conn)
                self._apply_schema(conn)
                self._adopt_restored_rows(conn)
        except psycopg.Error as exc:
            raise StorageOpenError(f"PostgreSQL: {exc}".strip()) from None
        size = (threads or 16) + 1
        self.pool = psycopg_pool.ConnectionPool(
            url, min_size=min(2, size), max_size=size, timeout=busy_timeout_ms / 1000, open=True,
            # Read-only, as SQLite's read connections are. A thread keeps the connection it
            # takes (PostgresReads), so the check at checkout costs a round trip once in a
            # thread's life, or after a break: an idle one a blip killed is not handed out.
            kwargs={"autocommit": True, "options": READ_ONLY}, name="eventstore", configure=self._opened.add,
            check=psycopg_pool.ConnectionPool.check_connection)
        self._pipeline = ReadPipeline(self.connect_read_only, busy_timeout_ms / 1000)
        self._reads = PostgresReads(pool=self.pool, pipeline=self._pipeline)

    def __str__(self):
        return safe_db_name(self.url)

    def connect(self, **options):
        conn = psycopg.connect(self.url, autocommit=True, connect_timeout=max(2, self.busy_timeout_ms // 1000),
                               **options)
        self._opened.add(conn)
        return conn

    def reopened(self):
        """The same database, connected anew from this process (see EventStore._after_fork)."""
        return PostgresStorage(self.url, self.busy_timeout_ms, self.threads)

    def forget_after_fork(self):
        """In a forked child: the parent's connections share their sockets with it,
        and closing one here (now, or when it is collected) would send PostgreSQL
        the end of the parent's session. /dev/null takes each socket's place in
        this process only."""
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            for conn in list(self._opened):
                with contextlib.suppress(Exception):
                    if not conn.closed:
                        os.dup2(devnull, conn.pgconn.socket)
        finally:
            os.close(devnull)

    def connect_read_only(self):
        """The GET pipeline's connection (``eventstore reads`` in pg_stat_activity).
        Its one prepared statement is planned once (PERF: left to itself,
        PostgreSQL planned ``event_id = ANY($1)`` anew at every execution;
        docs/DESIGN.md, "Measured choices")."""
        return self.connect(options=f"{READ_ONLY} -c plan_cache_mode=force_generic_plan",
                            application_name="eventstore reads")

    @staticmethod
    def _check(conn):
        """fsync and synchronous_commit must be on for a COMMIT to be durable:
        say so, or warn loudly."""
        settings = {name: conn.execute(f"SHOW {name}").fetchone()[0]
                    for name in ("fsync", "synchronous_commit", "server_version")}
        if not _durable(settings):
            log.warning("PostgreSQL has fsync=%s and synchronous_commit=%s: a 200 is NOT durable, a crash "
                        "can lose acknowledged changes. Turn both on for anything but tests.",
                        settings["fsync"], settings["synchronous_commit"])
        # /health's feedHeldBackSeconds reads pg_stat_activity, where a role sees
        # other roles' transactions only with pg_read_all_stats (or as superuser).
        settings["role"], settings["sees_all_sessions"] = conn.execute(
            "SELECT current_user, rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER')"
            " FROM pg_roles WHERE rolname = current_user").fetchone()
        if not settings["sees_all_sessions"]:
            log.warning("%s", _blind_note(settings["role"]))
        return settings

    def durability(self):
        """One line for the operator: whether a 200 is durable on this server."""
        s = self.settings
        return (f"PostgreSQL {s['server_version']}: fsync={s['fsync']}, synchronous_commit="
                f"{s['synchronous_commit']}" + ("" if _durable(s) else " -- WARNING: a 200 is not durable")
                + ("" if s["sees_all_sessions"] else f"\n{_blind_note(s['role'])}"))

    @staticmethod
    def _apply_schema(conn):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            exists = conn.execute("SELECT to_regclass('eventstore_schema') IS NOT NULL").fetchone()[0]
            version = exists and conn.execute("SELECT MAX(version) FROM eventstore_schema").fetchone()[0]
            if version and version > SCHEMA_VERSION:
                raise StorageOpenError(f"the database has schema version {version}; this eventstore knows up "
                                       f"to {SCHEMA_VERSION}. Upgrade eventstore.")
            if version == SCHEMA_VERSION:
                return
            conn.execute(SCHEMA_PATH.read_text(encoding="utf-8"))
            conn.execute("DELETE FROM eventstore_schema")
            conn.execute("INSERT INTO eventstore_schema (version) VALUES (%s)", (SCHEMA_VERSION,))

    @staticmethod
    def _adopt_restored_rows(conn):
        """Rows restored from another cluster (pg_dump, a copy of its files) carry
        that cluster's transaction ids, which may be ahead of this one's: the feed
        shows only rows older than every transaction in progress, so it would hide
        them until this cluster's ids caught up. They were all committed, and no
        change of this cluster can be older than them, so they take the oldest id
        there is. Only a restore can leave the newest row (by Sequence) with an id
        ahead of a new transaction's, so a start looks at that one row."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            newest = conn.execute("SELECT xid > pg_current_xact_id() FROM events ORDER BY seq DESC LIMIT 1").fetchone()
            if newest and newest[0]:
                adopted = conn.execute("UPDATE events SET xid = '1'::xid8 WHERE xid > pg_current_xact_id()").rowcount
                log.warning("%d events carried the transaction ids of the cluster they were restored from, ahead of "
                            "this one's; the feed now shows them", adopted)

    def session(self):
        return PostgresSession(self)

    def reads(self):
        return self._reads

    def watch_commits(self, after=None):
        return PostgresCommitWatch(self, after)

    def local_file(self, suffix):
        return local_file(self.url, suffix)

    def health_details(self):
        """How long the oldest transaction in progress in the cluster has been
        open: the feed shows nothing committed after it began until it ends."""
        held = self._reads._one(
            "SELECT COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - MIN(xact_start)), 0)::float8"
            " FROM pg_stat_activity WHERE backend_xid IS NOT NULL")[0]
        if held > 10:
            log.warning("the change feed is held back %.0f s by the oldest transaction in progress in the "
                        "PostgreSQL cluster (see pg_stat_activity); followers see nothing newer until it ends",
                        held)
        return {"feedHeldBackSeconds": round(held, 3),
                "feedHeldBackSeesAllSessions": self.settings["sees_all_sessions"]}

    def failure(self, exc):
        if isinstance(exc, psycopg_pool.PoolTimeout):
            return Failure(Failure.BUSY, "Every database connection is busy; try again shortly.")
        if isinstance(exc, pg_errors.DiskFull):
            return Failure(Failure.DISK_FULL, "The database server's disk is full; nothing was written.")
        if isinstance(exc, pg_errors.ReadOnlySqlTransaction):
            return Failure(Failure.READ_ONLY, "The database is read-only at the moment; nothing was written.")
        if isinstance(exc, (psycopg.OperationalError, pg_errors.SerializationFailure,
                            pg_errors.DeadlockDetected, pg_errors.LockNotAvailable,
                            pg_errors.QueryCanceled)):
            log.warning("database unavailable: %r", exc)
            return Failure(Failure.UNAVAILABLE, "The database is unavailable or busy; try again shortly.")
        return None

    @staticmethod
    def retryable(exc):
        """Errors after which running the transaction again can succeed."""
        return isinstance(exc, (pg_errors.SerializationFailure, pg_errors.DeadlockDetected))

    def close(self):
        self._pipeline.close()
        self._reads.close_held()
        self.pool.close()


def _blind_note(role):
    quoted = '"' + role.replace('"', '""') + '"'
    return (f"note: role {role} cannot see other roles' transactions, which also hold the change feed back: "
            f"/health's feedHeldBackSeconds counts only its own. To see them all: GRANT pg_read_all_stats "
            f"TO {quoted};")


def _durable(settings):
    """Whether a COMMIT returns only once it is on disk: fsync on, and
    synchronous_commit anything but off (local, on, remote_write, remote_apply)."""
    return settings["fsync"] == "on" and settings["synchronous_commit"] != "off"


class PostgresCommitWatch(CommitWatch):
    """Other servers' commits: one autocommit connection LISTENs; every writer
    notifies once per group commit. Notifications wake it at once; it also looks
    every RECHECK_SECONDS, because a notification can be lost (a reconnect) and
    the barrier can release rows without one (an unrelated transaction ends)."""

    def __init__(self, storage, last_seq=None):
        self.storage, self.last_seq = storage, last_seq
        self._behind = last_seq is not None  # the first look reads at once what came since last_seq
        self._open()

    def _open(self):
        self.conn = self.storage.connect(application_name="eventstore watcher")
        self.conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        self.reads = PostgresReads(conn=self.conn)
        if self.last_seq is None:  # reconnected: what was committed meanwhile is reported at the next look
            self.last_seq = self.reads.last_sequence()

    def changes(self, timeout, stop, limit=10000):
        """Wait for a notification (at most the longer of ``timeout``, the app's
        poll_interval, and RECHECK_SECONDS), then -> the changes the feed can
        show since the last look, or None when ``stop`` was set meanwhile."""
        if self.conn.broken or self.conn.closed:
            self._open()
            self._behind = True  # notifications sent meanwhile were lost
        if not self._behind:
            for _ in self.conn.notifies(timeout=max(timeout, RECHECK_SECONDS), stop_after=1):
                pass
        self._behind = False
        if stop.is_set():
            return None
        return self.changes_after_last_look(limit)

    def close(self):
        self.conn.close()

"""eventstore on SQLite, the default backend: the storage interface of
eventstore_storage.py over one database file, with the standard library only.

WAL with synchronous=FULL (a 200 is committed and fsynced); every write in
BEGIN IMMEDIATE ... COMMIT, its Sequences taken inside it, so Sequence order is
commit order; the writers of every process on one file take turns on a
WriterLock beside it. The schema is schema.sql, applied idempotently on opening.
"""

import collections
import fcntl
import heapq
import json
import logging
import math
import os
import sqlite3
import threading
import itertools

from eventstore_storage import (EVENT_COLUMNS, SCHEMA_VERSION, Backups, Change, CommitWatch, EventRow, EventState,
                                EventKey, FeedBacklog, Failure, KeyInfo, KeyRow, LiveEvent, ProgramRow, Reads,
                                SchemaRow, Session, Storage, StorageOpenError, SubscriptionRow, SweepRow, Transaction,
                                TypeRules, TypeState, UserRow, SUBSCRIPTION_COLUMN_NAMES, SUBSCRIPTION_COLUMNS,
                                WEBHOOK_COLUMN_NAMES, data_path, event_row, webhook_of, webhook_values)

SCHEMA_PATH = data_path("schema.sql")

log = logging.getLogger("eventstore")


class WriterLock:
    """An exclusive lock that the writers of every process on one database take
    around each write transaction: ``flock`` on a file beside the database.

    A waiting writer wakes the moment the holder releases it, where SQLite's
    busy handler would sleep 1, 2, 5, 10 ... ms between retries (with two
    processes that gave PUT p99 near a second). The wait is bounded: past its
    timeout ``acquire`` gives up (the caller answers 503, as a busy database
    does), and a lock obtained after that is released at once. A process that
    dies holding it releases it with its file descriptor.
    """

    def __init__(self, path):
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._mutex = threading.Lock()
        self._waiter = None    # an Event set when a helper thread got the lock for us
        self._wanted = False   # whether that lock is still wanted when it comes

    @classmethod
    def beside(cls, db_path):
        """The lock for ``db_path``, or None where no lock file can be made (a
        read-only folder: nothing will be written there anyway)."""
        try:
            return cls(f"{db_path}-writer.lock")
        except OSError:
            return None

    def acquire(self, timeout):
        with self._mutex:
            if self._waiter is None:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    # Wait in a helper thread, so that this wait can be bounded.
                    self._waiter = threading.Event()
                    threading.Thread(target=self._wait, args=(self._waiter,), daemon=True,
                                     name="eventstore-writer-lock").start()
            got = self._waiter
            self._wanted = True
        if got.wait(timeout):
            with self._mutex:
                self._waiter = None
            return True
        with self._mutex:
            if got.is_set():
                self._waiter = None
                return True
            self._wanted = False  # when it comes, release it at once
        return False

    def _wait(self, got):
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        with self._mutex:
            if self._wanted:
                got.set()
                return
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._waiter = None

    def release(self):
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self):
        os.close(self._fd)


class Connection(sqlite3.Connection):
    """A sqlite3 connection that knows the database's WriterLock (None: none);
    ``owns_writer_lock`` closes it with the connection."""

    writer_lock = None
    owns_writer_lock = False
    busy_timeout = 5.0  # seconds; set by connect()

    def close(self):
        if self.owns_writer_lock and self.writer_lock is not None:
            self.writer_lock.close()
            self.writer_lock = None
        super().close()


def busy_error():
    """What SQLite raises when its write lock cannot be had in time (mapped to 503)."""
    error = sqlite3.OperationalError("database is locked (the writer lock was not released in time)")
    error.sqlite_errorcode = sqlite3.SQLITE_BUSY
    return error


def connect(db_path, busy_timeout_ms=5000, check_same_thread=True):
    """A connection with the durability settings every eventstore connection uses:
    WAL, synchronous=FULL (a commit is fsynced before it returns), secure_delete
    (erased data is overwritten in the file, not just unlinked). ``check_same_thread``
    False: one thread at a time may use it, not only the one that opened it."""
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=busy_timeout_ms / 1000, factory=Connection,
                           check_same_thread=check_same_thread)
    conn.busy_timeout = busy_timeout_ms / 1000
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA secure_delete = ON")
    return conn


class write_transaction:
    """``with write_transaction(conn):`` runs the block in BEGIN IMMEDIATE ... COMMIT,
    rolling back on any exception. The write lock is taken up front (the
    connection's WriterLock first, then SQLite's), so reads in the block see the
    latest committed state and nothing commits in between."""

    def __init__(self, conn):
        self.conn = conn
        self.lock = getattr(conn, "writer_lock", None)

    def __enter__(self):
        if self.lock is not None and not self.lock.acquire(getattr(self.conn, "busy_timeout", 5.0)):
            raise busy_error()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._release()
            raise
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.conn.execute("COMMIT")
        finally:
            if self.conn.in_transaction:  # an exception, or a COMMIT that failed and left it open
                self.conn.execute("ROLLBACK")
            self._release()
        return False

    def _release(self):
        if self.lock is not None:
            self.lock.release()


class read_snapshot:
    """A deferred read transaction: every query in the block sees one snapshot."""

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN")
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        if self.conn.in_transaction:
            self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False


def apply_schema(conn):
    """Create what is missing and upgrade an older database in place, in one
    write transaction, idempotently; record the schema version."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StorageOpenError(f"the database has schema version {version}; this eventstore "
                           f"knows up to {SCHEMA_VERSION}. Upgrade eventstore.")
    if version == SCHEMA_VERSION:
        return  # up to date: nothing to write (so a read-only database still opens)
    with write_transaction(conn):
        # Read again under the write lock: another process may have upgraded it meanwhile.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version and version < SCHEMA_VERSION:
            log.warning("upgrading the database schema from version %d to %d", version, SCHEMA_VERSION)
        for statement in _upgrade_statements(conn, version):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _upgrade_statements(conn, version):
    """The statements that bring a database of ``version`` (0: new) to SCHEMA_VERSION."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(programs)")}
    if columns and "registered_types_only" not in columns:  # a version-1 programs table
        yield "ALTER TABLE programs ADD COLUMN registered_types_only INTEGER NOT NULL DEFAULT 0"
    columns = {row[1] for row in conn.execute("PRAGMA table_info(event_types)")}
    for column in ("schema_version", "retain_days"):  # a version-2 event_types table
        if columns and column not in columns:
            yield f"ALTER TABLE event_types ADD COLUMN {column} INTEGER"
    columns = {row[1] for row in conn.execute("PRAGMA table_info(subscriptions)")}
    if columns:  # a version-4 subscriptions table: its webhook's columns
        for column in WEBHOOK_COLUMN_NAMES:
            if column not in columns:
                kind = "TEXT" if column.endswith(("url", "state", "secret", "error", "reason")) else "INTEGER"
                yield f"ALTER TABLE subscriptions ADD COLUMN {column} {kind}"
    yield from _statements(SCHEMA_PATH.read_text(encoding="utf-8"))
    if version < 2:  # counts of the events written before the triggers kept them
        yield "DELETE FROM event_type_counts"
        yield ("INSERT INTO event_type_counts (event_type, program_id, events)"
               " SELECT event_type, program_id, COUNT(*) FROM events WHERE deleted = 0"
               " GROUP BY event_type, program_id")


def _statements(script):
    """An SQL script -> its statements (a trigger's body holds semicolons too)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        if not statement and (not line.strip() or line.lstrip().startswith("--")):
            continue
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement.strip()
            statement = ""


# --- SQLite: reads ---------------------------------------------------------------

def _event_rows(cursor):
    """``cursor`` (of a SELECT of EVENT_COLUMNS), its rows given as EventRows."""
    cursor.row_factory = _event_row
    return cursor


def _rows_of(cursor, columns):
    """``cursor``, its rows given as EventRows when it selects EVENT_COLUMNS."""
    return _event_rows(cursor) if columns == EVENT_COLUMNS else cursor


def _event_row(cursor, row):
    return EventRow._make(row)


def _subscription(row):
    """A subscriptions row -> SubscriptionRow (its filter lists are JSON arrays)."""
    name, owner, description, programs, event_types, position, created_us, last_ack_us = row[:8]
    return SubscriptionRow(name, owner, description, tuple(json.loads(programs)), tuple(json.loads(event_types)),
                           position, created_us, last_ack_us, webhook_of(row[8:]))


MERGE_ALWAYS = 4        # this many index ranges or fewer: always merge them
WINDOW = 4              # the first walk covers WINDOW x (limit + 1) Sequences
SEEK_COST = 8           # an index range's first row costs about this many rows walked
MAX_IN_LIST = 30_000    # SQLite binds at most 32,766 values in one statement


class SQLiteReads(Reads):
    """Every read of the storage interface, on one sqlite3 connection."""

    def __init__(self, conn):
        self.conn = conn

    # Users, keys, grants

    def key_row(self, key_id):
        row = self.conn.execute(
            "SELECT k.user_id, k.key_hash, k.revoked_us, k.last_used_us, u.is_system, u.disabled"
            " FROM api_keys k JOIN users u ON u.user_id = k.user_id WHERE k.key_id = ?", (key_id,)).fetchone()
        if row is None:
            return None
        user_id, key_hash, revoked_us, last_used_us, is_system, disabled = row
        return KeyRow(user_id, key_hash, revoked_us, last_used_us, bool(is_system), bool(disabled))

    def grants_of(self, user_id):
        return dict(self.conn.execute("SELECT program_id, access FROM grants WHERE user_id = ?", (user_id,)))

    def any_user(self):
        return self.conn.execute("SELECT 1 FROM users LIMIT 1").fetchone() is not None

    def user_state(self, user_id):
        row = self.conn.execute("SELECT disabled FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return None if row is None else "disabled" if row[0] else "active"

    def list_users(self):
        grants = collections.defaultdict(list)
        for user_id, program_id, access in self.conn.execute(
                "SELECT user_id, program_id, access FROM grants ORDER BY user_id, program_id"):
            grants[user_id].append((program_id, access))
        return [UserRow(user_id, bool(is_system), bool(disabled), grants[user_id]) for user_id, is_system, disabled in
                self.conn.execute("SELECT user_id, is_system, disabled FROM users ORDER BY user_id")]

    def find_user(self, user_id):
        row = self.conn.execute("SELECT is_system, disabled FROM users WHERE user_id = ?", (user_id,)).fetchone()
        if row is None:
            return None
        grants = self.conn.execute("SELECT program_id, access FROM grants WHERE user_id = ? ORDER BY program_id",
                                   (user_id,)).fetchall()
        return UserRow(user_id, bool(row[0]), bool(row[1]), grants)

    def list_keys(self, user_id):
        return [KeyInfo(*row) for row in self.conn.execute(
            "SELECT key_id, created_us, last_used_us, revoked_us FROM api_keys WHERE user_id = ? ORDER BY created_us",
            (user_id,))]

    # Programs and event types

    def find_program(self, program_id):
        row = self.conn.execute("SELECT name, registered_types_only FROM programs WHERE program_id = ?",
                                (program_id,)).fetchone()
        return row and ProgramRow(program_id, row[0], bool(row[1]))

    def list_programs(self):
        return [ProgramRow(program_id, name, bool(strict)) for program_id, name, strict in self.conn.execute(
            "SELECT program_id, name, registered_types_only FROM programs ORDER BY program_id")]

    def type_registered(self, event_type):
        return self.conn.execute("SELECT 1 FROM event_types WHERE event_type = ?",
                                 (event_type,)).fetchone() is not None

    def type_state(self, event_type):
        row = self.conn.execute("SELECT schema_version, retain_days FROM event_types WHERE event_type = ?",
                                (event_type,)).fetchone()
        return row and TypeState._make(row)

    def type_schema(self, event_type, version):
        row = self.conn.execute("SELECT schema, created_us FROM event_type_schemas WHERE event_type = ? AND version = ?",
                                (event_type, version)).fetchone()
        return row and SchemaRow(event_type, version, *row)

    def live_events_of_type(self, event_type, after=0):
        if self.conn.in_transaction:  # a write transaction's own view
            return self.last_sequence(), self._live_events_of_type(event_type, after)
        self.conn.execute("BEGIN")  # one snapshot for the head and the walk; ended by the walk
        try:
            head = self.last_sequence()
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return head, self._live_events_of_type(event_type, after, snapshot=True)

    def _live_events_of_type(self, event_type, after, snapshot=False):
        try:
            programs = [row[0] for row in self.conn.execute(
                "SELECT program_id FROM event_type_counts WHERE event_type = ? AND events > 0 ORDER BY program_id",
                (event_type,))]
            for program_id in programs:
                # "+deleted": through events_by_type (program, type, then seq), not events_by_age.
                cursor = self.conn.execute(
                    "SELECT event_id, doc FROM events WHERE program_id = ? AND event_type = ? AND seq > ?"
                    " AND +deleted = 0", (program_id, event_type, after))
                while rows := cursor.fetchmany(500):
                    yield from map(LiveEvent._make, rows)
        finally:
            if snapshot and self.conn.in_transaction:
                self.conn.execute("COMMIT")

    def retained_types(self):
        return self.conn.execute("SELECT COUNT(*) FROM event_types WHERE retain_days IS NOT NULL").fetchone()[0]

    def last_sweep(self, name):
        row = self.conn.execute("SELECT finished_us, count FROM sweeps WHERE name = ?", (name,)).fetchone()
        return row and SweepRow._make(row)

    def registered_types(self, limit):
        names = [row[0] for row in self.conn.execute(
            "SELECT event_type FROM event_types ORDER BY event_type LIMIT ?", (limit,))]
        if len(names) < limit:
            return names, len(names)
        return names, self.conn.execute("SELECT COUNT(*) FROM event_types").fetchone()[0]

    def event_types_json(self, programs, event_type=None):
        """The catalogue (docs/API.md §5a) as seen through ``programs`` (a list, or None
        for every program), as the JSON text of its list of entries: every registered
        type and every type with live events in those programs (or only
        ``event_type``), sorted by name, each with its live counts per program.

        SQLite renders it in one statement and one step (PERF: read row by row, it
        releases and retakes the GIL at every row; docs/DESIGN.md, "Measured
        choices"). It reads count rows, never events."""
        params = {"type": event_type, **{f"p{n}": program for n, program in enumerate(programs or ())}}
        one = "" if event_type is None else " AND event_type = :type"
        in_programs = ("" if programs is None else
                       f" AND program_id IN ({', '.join(f':p{n}' for n in range(len(programs)))})")
        # Subqueries with ORDER BY feed the aggregates their rows in that order.
        return self.conn.execute(f"""
            SELECT json_group_array(json_object(
                'EventType', listed.event_type,
                'Description', registered.description,
                'Registered', json(iif(registered.event_type IS NULL, 'false', 'true')),
                'Programs', json((SELECT json_group_array(json_object('ProgramId', program_id, 'Events', events))
                                  FROM (SELECT program_id, events FROM event_type_counts
                                        WHERE event_type = listed.event_type AND events > 0{in_programs}
                                        ORDER BY program_id))),
                'Schema', json(schemas.schema),
                'SchemaVersion', registered.schema_version,
                'RetainDays', registered.retain_days))
            FROM (SELECT event_type FROM event_types WHERE 1 = 1{one}
                  UNION SELECT event_type FROM event_type_counts WHERE events > 0{one}{in_programs}
                  ORDER BY event_type) AS listed
            LEFT JOIN event_types AS registered USING (event_type)
            LEFT JOIN event_type_schemas AS schemas
                ON schemas.event_type = registered.event_type AND schemas.version = registered.schema_version""",
                                 params).fetchone()[0]

    # Events and the feed

    def read_event(self, event_id):
        row = self.conn.execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE event_id = ?", (event_id,)).fetchone()
        return row and EventRow._make(row)

    def last_sequence(self):
        """The largest Sequence ever assigned (rows are never removed), 0 for none:
        the feed's head, since SQLite serves every committed change."""
        return self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]

    def last_committed_sequence(self):
        return self.last_sequence()

    def changes_since(self, seq, limit):
        return [Change._make(row) for row in self.conn.execute(
            "SELECT seq, program_id, event_type FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))]

    def read_feed(self, programs, query, strategy=None):
        """One page of the change feed (see Reads.read_feed).

        Two ways to read it, chosen by which reads fewer rows:
        - **merge**: each (program, event type) pair is one index range walked in seq
          order, and heapq.merge interleaves them: about limit x log(ranges) rows plus
          one seek per range. It wins for a few programs or a rare filter.
        - **walk**: the table itself in seq order (seq is the rowid), each row tested
          for membership and the filters: about limit / (the share of rows that
          match). It wins for a caller who reads all or most programs, where a merge
          would pay one seek per program on every page.
        With few ranges it merges. Otherwise it walks a first window of seqs, which
        also measures the share of matching rows, and reads whatever the page still
        needs the cheaper way. ``strategy`` ("merge", "walk") forces one (for tests).
        """
        with read_snapshot(self.conn):
            return self._feed(programs, query, strategy, EVENT_COLUMNS)

    def feed_backlog(self, programs, query):
        """read_feed's rows, counted: read the same way, only their Sequences
        (from the index alone where read_feed merges index ranges), and the
        first one's UpdatedUTC."""
        with read_snapshot(self.conn):
            rows = self._feed(programs, query, None, "seq")
            first = self.conn.execute("SELECT updated_us FROM events WHERE seq = ?",
                                      rows[0]).fetchone()[0] if rows else None
        return FeedBacklog(len(rows), first)

    def _feed(self, programs, query, strategy, columns):
        """read_feed's way of reading a page (in a snapshot), each row its ``columns``."""
        want, types = query.limit + 1, query.event_types
        if strategy == "walk":
            return self._walk(programs, query, query.after, None, want, columns)
        if programs is not None and (strategy == "merge" or len(programs) * max(1, len(types)) <= MERGE_ALWAYS
                                     or len(programs) + len(types) > MAX_IN_LIST):
            return self._merge_ranges(programs, query, query.after, want, columns)
        window = WINDOW * want
        window_end = min(query.after + window, 2**63 - 1)  # SQLite's integers end there
        rows = self._walk(programs, query, query.after, window_end, want, columns)
        last_seq = self.last_sequence()
        if len(rows) == want or window_end >= last_seq:
            return rows
        needed, share = want - len(rows), len(rows) / window
        if programs is None:
            programs = [row[0] for row in self.conn.execute("SELECT program_id FROM programs")]
        ranges = len(programs) * max(1, len(types))
        walk_cost = needed / share if share else last_seq - window_end
        merge_cost = ranges * SEEK_COST + needed * math.log2(ranges + 1)
        if walk_cost <= merge_cost:
            return rows + self._walk(programs, query, window_end, None, needed, columns)
        return rows + self._merge_ranges(programs, query, window_end, needed, columns)

    @staticmethod
    def _filters(query, prefix=""):
        """The member, reference and start filters -> (SQL conditions, parameters).
        ``prefix`` "+" keeps SQLite off their indexes (for a walk in seq order)."""
        where, params = [], []
        for column, op, value in (("member_id", "=", query.member_id),
                                  ("ref_event_id", "=", query.ref_event_id),
                                  ("start_us", ">=", query.start_from_us),
                                  ("start_us", "<", query.start_before_us)):
            if value is not None:
                where.append(f"{prefix}{column} {op} ?")
                params.append(value)
        return where, params

    def _merge_ranges(self, programs, query, after, want, columns=EVENT_COLUMNS):
        where, params = self._filters(query)
        where = ["program_id = ?"] + (["event_type = ?"] if query.event_types else []) + where
        sql = (f"SELECT {columns} FROM events WHERE {' AND '.join(where)}"
               " AND seq > ? ORDER BY seq LIMIT ?")
        tail = (*params, after, want)
        ranges = itertools.product(programs, query.event_types or [None])
        cursors = [_rows_of(self.conn.execute(sql, (program, *([] if event_type is None else [event_type]), *tail)),
                            columns) for program, event_type in ranges]
        try:
            return list(itertools.islice(heapq.merge(*cursors), want))
        finally:
            for cursor in cursors:
                cursor.close()

    def _walk(self, programs, query, after, upto, want, columns=EVENT_COLUMNS):
        """Rows with after < seq (<= upto), in seq order, that are in ``programs``
        (None: all) and match the filters: the table walked in rowid order."""
        where, params = self._filters(query, prefix="+")
        if programs is not None:
            where.insert(0, f"+program_id IN ({', '.join('?' * len(programs))})")
            params[:0] = programs
        if query.event_types:
            where.insert(0, f"+event_type IN ({', '.join('?' * len(query.event_types))})")
            params[:0] = query.event_types
        if upto is not None:
            where.append("seq <= ?")
            params.append(upto)
        sql = (f"SELECT {columns} FROM events WHERE seq > ? {''.join(' AND ' + w for w in where)}"
               " ORDER BY seq LIMIT ?")
        return _rows_of(self.conn.execute(sql, (after, *params, want)), columns).fetchall()

    def sequence_before(self, time_us):
        """Walked down from the head (PERF: no index on updated_us, which every write
        would pay for): as far as the last change before ``time_us``."""
        row = self.conn.execute("SELECT seq FROM events WHERE updated_us < ? ORDER BY seq DESC LIMIT 1",
                                (time_us,)).fetchone()
        return row[0] if row else 0

    def export_events(self, programs=()):
        """Every event (tombstones included) in Sequence order, as EventRows, from one
        read snapshot, streamed: memory stays flat whatever the size."""
        # "+program_id" keeps SQLite off the program index, so it walks the table in
        # rowid (= seq) order instead of collecting and sorting the matches.
        where = f"WHERE +program_id IN ({', '.join('?' * len(programs))})" if programs else ""
        with read_snapshot(self.conn):
            cursor = _event_rows(self.conn.execute(f"SELECT {EVENT_COLUMNS} FROM events {where} ORDER BY seq",
                                                   tuple(programs)))
            while rows := cursor.fetchmany(1000):
                for row in rows:
                    yield row

    # Subscriptions

    def find_subscription(self, name):
        row = self.conn.execute(f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE name = ?",
                                (name,)).fetchone()
        return row and _subscription(row)

    def list_subscriptions(self, owner=None):
        where, params = ("", ()) if owner is None else (" WHERE owner = ?", (owner,))
        return [_subscription(row) for row in self.conn.execute(
            f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions{where} ORDER BY name", params)]

    def webhook_subscriptions(self):
        return [_subscription(row) for row in self.conn.execute(
            f"SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE webhook_url IS NOT NULL ORDER BY name")]

    def answers(self):
        """Raises sqlite3.Error unless the database answers a query."""
        self.conn.execute("SELECT 1 FROM programs LIMIT 1").fetchall()


# --- SQLite: writes --------------------------------------------------------------

# One statement for create, update and replay: the update happens only when the
# content differs or the event is a tombstone, and RETURNING says whether it did.
UPSERT_EVENT = (
    "INSERT INTO events (seq, event_id, program_id, event_type, member_id, start_us, end_us, doc,"
    " ref_event_id, content_hash, deleted, revision, created_us, updated_us)"
    " VALUES (:seq, :event_id, :program_id, :event_type, :member_id, :start_us, :end_us, :doc,"
    " :ref_event_id, :content_hash, 0, 1, :now, :now)"
    " ON CONFLICT (event_id) DO UPDATE SET seq = excluded.seq, event_type = excluded.event_type,"
    " member_id = excluded.member_id, start_us = excluded.start_us, end_us = excluded.end_us,"
    " doc = excluded.doc, ref_event_id = excluded.ref_event_id,"
    " content_hash = excluded.content_hash, deleted = 0, revision = revision + 1,"
    " updated_us = excluded.updated_us"
    " WHERE deleted = 1 OR content_hash IS NOT excluded.content_hash"
    " RETURNING revision")
INSERT_EVENT = UPSERT_EVENT[:UPSERT_EVENT.index(" ON CONFLICT")]
UPDATE_EVENT = (
    "UPDATE events SET seq = :seq, event_type = :event_type, member_id = :member_id,"
    " start_us = :start_us, end_us = :end_us, doc = :doc, ref_event_id = :ref_event_id,"
    " content_hash = :content_hash, deleted = 0, revision = revision + 1, updated_us = :now"
    " WHERE event_id = :event_id")




class SQLiteTransaction(SQLiteReads, Transaction):
    """One write transaction: its reads see its own writes; one clock reading
    (``now``); the programs' rules (``rules``); the next Sequence.

    The Sequence is read once (MAX(seq): rows are never removed, so it is the
    largest ever assigned) and counted on in memory; the write lock, held from
    BEGIN IMMEDIATE, makes Sequence order commit order across every process.
    """

    def __init__(self, conn, now):
        super().__init__(conn)
        self.now = now
        self.rules = TypeRules(self)
        self._last_seq = None
        self._changes_before = conn.total_changes

    def changes(self):
        return self.conn.total_changes - self._changes_before

    def peek_seq(self):
        """The Sequence the next change will take (claim it with take_seq)."""
        if self._last_seq is None:
            self._last_seq = self.last_sequence()
        return self._last_seq + 1

    def take_seq(self):
        seq = self.peek_seq()
        self._last_seq = seq
        return seq

    # Events

    def current(self, event_id):
        row = self.conn.execute("SELECT revision, deleted, content_hash FROM events WHERE event_id = ?",
                                (event_id,)).fetchone()
        return row and EventState(row[0], bool(row[1]), row[2])

    def upsert_event(self, event):
        """Create or change ``event`` unless it is a replay -> a function that
        returns its new revision, or None (PostgreSQL answers it later; see Later)."""
        written = self.conn.execute(UPSERT_EVENT, event_row(event, self.peek_seq(), self.now)).fetchall()
        if not written:
            return lambda: None
        self.take_seq()
        revision = written[0][0]
        return lambda: revision

    def current_many(self, event_ids):
        found = {}
        for start in range(0, len(event_ids), 500):
            ids = event_ids[start:start + 500]
            found.update((row[0], EventState(row[1], bool(row[2]), row[3])) for row in self.conn.execute(
                f"SELECT event_id, revision, deleted, content_hash FROM events WHERE event_id IN"
                f" ({', '.join('?' * len(ids))})", ids))
        return found

    def insert_events(self, events):
        self.conn.executemany(INSERT_EVENT, [event_row(event, seq, self.now) for event, seq in events])

    def update_events(self, events):
        self.conn.executemany(UPDATE_EVENT, [event_row(event, seq, self.now) for event, seq in events])

    def live_revision(self, event_id):
        row = self.conn.execute("SELECT revision FROM events WHERE event_id = ? AND deleted = 0",
                                (event_id,)).fetchone()
        return row and row[0]

    def tombstone(self, event_id):
        # secure_delete (see connect) zeroes the old row's bytes in the file: the
        # member id, times, data and reference are erased, not just unlinked.
        return self.conn.execute(
            "UPDATE events SET member_id = NULL, start_us = NULL, end_us = NULL, doc = NULL,"
            " ref_event_id = NULL, content_hash = NULL, deleted = 1, revision = revision + 1,"
            " updated_us = ?, seq = ? WHERE event_id = ? RETURNING revision",
            (self.now, self.take_seq(), event_id)).fetchall()[0][0]

    def member_event_ids(self, program_id, member_id):
        return [row[0] for row in self.conn.execute(
            "SELECT event_id FROM events WHERE program_id = ? AND member_id = ? ORDER BY seq",
            (program_id, member_id))]

    def insert_tombstone(self, event_id, program_id, event_type):
        self.conn.execute(
            "INSERT INTO events (seq, event_id, program_id, event_type, deleted, revision, created_us,"
            " updated_us) VALUES (?, ?, ?, ?, 1, 1, ?, ?)",
            (self.take_seq(), event_id, program_id, event_type, self.now, self.now))

    # Programs and event types

    def put_program(self, program_id, name, registered_types_only=None):
        self.rules.forget()  # the writes after this one in the group read the rule anew
        return bool(self.conn.execute(
            "INSERT INTO programs (program_id, name, created_us, registered_types_only)"
            " VALUES (?, ?, ?, COALESCE(?, 0)) ON CONFLICT (program_id) DO UPDATE SET name = excluded.name,"
            " registered_types_only = COALESCE(?, registered_types_only) RETURNING registered_types_only",
            (program_id, name, self.now, registered_types_only, registered_types_only)).fetchone()[0])

    def register_event_type(self, event_type, description):
        self.rules.forget()  # the writes after this one in the group read the rule anew
        self.conn.execute(
            "INSERT INTO event_types (event_type, description, created_us, updated_us) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (event_type) DO UPDATE SET description = excluded.description,"
            " updated_us = excluded.updated_us", (event_type, description, self.now, self.now))

    def lock_event_type(self, event_type):
        """Whether ``event_type`` is registered (the write lock already keeps it so)."""
        return self.type_registered(event_type)

    def set_type_schema(self, event_type, schema):
        self.rules.forget()  # the writes after this one in the group read the rule anew
        version = None
        if schema is not None:
            version = self.conn.execute(
                "INSERT INTO event_type_schemas (event_type, version, schema, created_us)"
                " SELECT ?, COALESCE(MAX(version), 0) + 1, ?, ? FROM event_type_schemas WHERE event_type = ?"
                " RETURNING version", (event_type, schema, self.now, event_type)).fetchone()[0]
        self.conn.execute("UPDATE event_types SET schema_version = ?, updated_us = ? WHERE event_type = ?",
                          (version, self.now, event_type))
        return version

    def set_retain_days(self, event_type, days):
        self.conn.execute("UPDATE event_types SET retain_days = ?, updated_us = ? WHERE event_type = ?",
                          (days, self.now, event_type))

    def expired_events(self, limit):
        # Through events_by_age: per retained type, the range of its live events
        # older than its cutoff (CROSS JOIN: SQLite keeps the types as the outer loop).
        return [EventKey._make(row) for row in self.conn.execute(
            "SELECT e.event_id, e.program_id, e.event_type FROM event_types AS t"
            " CROSS JOIN events AS e ON e.event_type = t.event_type AND e.deleted = 0"
            " AND e.updated_us < ? - t.retain_days * 86400000000"
            " WHERE t.retain_days IS NOT NULL LIMIT ?", (self.now, limit))]

    def take_lease(self, name, holder, seconds):
        return self.conn.execute(
            "INSERT INTO leases (name, holder, expires_us) VALUES (:name, :holder, :now + :ttl)"
            " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_us = excluded.expires_us"
            " WHERE leases.holder = excluded.holder OR leases.expires_us <= :now RETURNING holder",
            {"name": name, "holder": holder, "now": self.now, "ttl": int(seconds * 1_000_000)}).fetchone() is not None

    def holds_lease(self, name, holder):
        return self.conn.execute("SELECT 1 FROM leases WHERE name = ? AND holder = ? AND expires_us > ?",
                                 (name, holder, self.now)).fetchone() is not None

    def release_lease(self, name, holder):
        self.conn.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    def record_sweep(self, name, count):
        self.conn.execute("INSERT INTO sweeps (name, finished_us, count) VALUES (?, ?, ?) ON CONFLICT (name)"
                          " DO UPDATE SET finished_us = excluded.finished_us, count = excluded.count",
                          (name, self.now, count))

    def strict_users_of_type(self, event_type):
        return self.conn.execute(
            "SELECT c.program_id, c.events FROM event_type_counts AS c JOIN programs AS p USING (program_id)"
            " WHERE c.event_type = ? AND c.events > 0 AND p.registered_types_only ORDER BY c.program_id",
            (event_type,)).fetchall()

    def delete_event_type(self, event_type):
        self.rules.forget()  # the writes after this one in the group read the rule anew
        self.conn.execute("DELETE FROM event_types WHERE event_type = ?", (event_type,))

    # Users, keys, grants

    def insert_user(self, user_id, is_system):
        self.conn.execute("INSERT INTO users (user_id, is_system, created_us) VALUES (?, ?, ?)",
                          (user_id, int(is_system), self.now))

    def insert_key(self, key_id, user_id, key_hash):
        self.conn.execute("INSERT INTO api_keys (key_id, user_id, key_hash, created_us) VALUES (?, ?, ?, ?)",
                          (key_id, user_id, key_hash, self.now))

    def set_grants(self, user_id, grants):
        self.conn.executemany(
            "INSERT INTO grants (user_id, program_id, access) VALUES (?, ?, ?)"
            " ON CONFLICT (user_id, program_id) DO UPDATE SET access = excluded.access",
            [(user_id, program_id, access) for program_id, access in grants.items()])

    def revoke_grant(self, user_id, program_id):
        return bool(self.conn.execute("DELETE FROM grants WHERE user_id = ? AND program_id = ?",
                                      (user_id, program_id)).rowcount)

    def set_user_disabled(self, user_id, disabled):
        return bool(self.conn.execute("UPDATE users SET disabled = ? WHERE user_id = ?",
                                      (int(disabled), user_id)).rowcount)

    def revoke_key(self, user_id, key_id):
        return bool(self.conn.execute("UPDATE api_keys SET revoked_us = COALESCE(revoked_us, ?)"
                                      " WHERE user_id = ? AND key_id = ?", (self.now, user_id, key_id)).rowcount)

    def touch_key(self, key_id, when):
        self.conn.execute("UPDATE api_keys SET last_used_us = ? WHERE key_id = ?", (when, key_id))

    # Subscriptions

    def lock_subscription(self, name):
        """The subscription (the write lock, held since BEGIN IMMEDIATE, already
        keeps every other writer out)."""
        return self.find_subscription(name)

    def put_subscription(self, row):
        return bool(self.conn.execute(
            f"INSERT INTO subscriptions ({SUBSCRIPTION_COLUMNS}) VALUES ({', '.join('?' * len(SUBSCRIPTION_COLUMN_NAMES))})"
            " ON CONFLICT (name) DO UPDATE SET description = excluded.description, programs = excluded.programs,"
            " event_types = excluded.event_types, position = excluded.position, "
            + ", ".join(f"{column} = excluded.{column}" for column in WEBHOOK_COLUMN_NAMES)
            + " WHERE owner = excluded.owner",
            (row.name, row.owner, row.description, json.dumps(list(row.programs)),
             json.dumps(list(row.event_types)), row.position, row.created_us, row.last_ack_us,
             *webhook_values(row.webhook))).rowcount)

    def set_webhook(self, name, webhook):
        self.conn.execute(f"UPDATE subscriptions SET {', '.join(c + ' = ?' for c in WEBHOOK_COLUMN_NAMES)}"
                          " WHERE name = ?", (*webhook_values(webhook), name))

    def acknowledge(self, name, position, when):
        self.conn.execute("UPDATE subscriptions SET position = ?, last_ack_us = ? WHERE name = ?",
                          (position, when, name))

    def delete_subscription(self, name):
        return bool(self.conn.execute("DELETE FROM subscriptions WHERE name = ?", (name,)).rowcount)


# --- SQLite: the storage ----------------------------------------------------------

class SQLiteSession(SQLiteReads, Session):
    """One connection of its own: reads, and write transactions that take the
    writer lock every process's writers take."""

    def __init__(self, conn, storage):
        super().__init__(conn)
        self.storage = storage

    def transaction(self, now, seqs=0):
        return _SQLiteTransactionScope(self.conn, now)

    def close(self):
        self.conn.close()


class _SQLiteTransactionScope:
    def __init__(self, conn, now):
        self.scope, self.now = write_transaction(conn), now

    def __enter__(self):
        return SQLiteTransaction(self.scope.__enter__(), self.now)

    def __exit__(self, *exc_info):
        return self.scope.__exit__(*exc_info)


class SQLiteStorage(Storage, Backups):
    """The SQLite database at ``path``, created if missing: WAL, synchronous=FULL,
    the schema applied on opening; writers of every process serialized by a
    WriterLock beside the file."""

    backend = "sqlite"
    errors = (sqlite3.Error,)

    def __init__(self, path, busy_timeout_ms=5000):
        self.path, self.busy_timeout_ms = str(path), busy_timeout_ms
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):  # SQLite says only "unable to open database file"
            raise StorageOpenError(f"{self.path}: there is no folder {folder}")
        self.writer_lock = WriterLock.beside(self.path)
        self._local = threading.local()
        try:
            conn = connect(self.path, busy_timeout_ms)
            conn.writer_lock = self.writer_lock
            try:
                apply_schema(conn)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            if self.writer_lock is not None:
                self.writer_lock.close()
            raise StorageOpenError(str(exc)) from None

    def __str__(self):
        return self.path

    def session(self):
        # Handed between threads (the webhook deliverer's pool), never used by two at once.
        conn = connect(self.path, self.busy_timeout_ms, check_same_thread=False)
        conn.writer_lock = self.writer_lock
        return SQLiteSession(conn, self)

    def reads(self):
        """This thread's own read-only connection: sqlite3 connections are never
        shared between threads (writes go through a session of their own)."""
        reads = getattr(self._local, "reads", None)
        if reads is None:
            conn = connect(self.path, self.busy_timeout_ms)
            conn.execute("PRAGMA query_only = ON")
            reads = self._local.reads = SQLiteReads(conn)
        return reads

    def watch_commits(self, after=None):
        return SQLiteCommitWatch(connect(self.path, self.busy_timeout_ms), after)

    def local_file(self, suffix):
        return f"{self.path}-{suffix}"

    def health_details(self):
        return {}

    @staticmethod
    def retryable(exc):
        """Errors after which running the transaction again can succeed: none
        (the write lock serializes SQLite's writers; a busy database is a 503)."""
        return False

    def durability(self):
        """One line for the operator: what a 200 means here."""
        return "SQLite in WAL mode with synchronous=FULL: a 200 is committed and fsynced"

    def failure(self, exc):
        """A SQLite error the client can do something about -> its Failure; None
        for the others (bugs). Details never leave the server."""
        code = getattr(exc, "sqlite_errorcode", None)
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return Failure(Failure.BUSY, "The database is busy; try again shortly.")
        if code == sqlite3.SQLITE_FULL:
            return Failure(Failure.DISK_FULL, "The server's disk is full; nothing was written.")
        if code == sqlite3.SQLITE_READONLY:
            return Failure(Failure.READ_ONLY, "The database is read-only at the moment; nothing was written.")
        return None

    def reopened(self):
        """The same database, opened anew in this process (see EventStore._after_fork)."""
        return SQLiteStorage(self.path, self.busy_timeout_ms)

    def forget_after_fork(self):
        """In a forked child: never use or close the parent's connections (closing
        one could checkpoint and remove the WAL under the parent); the writer lock's
        file description is the parent's too, so this process opens its own."""
        if self.writer_lock is not None:
            self.writer_lock.close()  # the parent's lock is unaffected: it holds the description too
            self.writer_lock = None

    def close(self):
        """Close this thread's connection and the writer lock. Other threads'
        connections close when their threads end (thread-local storage)."""
        reads = getattr(self._local, "reads", None)
        if reads is not None:
            reads.conn.close()
            self._local.reads = None
        if self.writer_lock is not None:
            self.writer_lock.close()
            self.writer_lock = None

    # SQLite only: the command line's backup.

    def backup_to(self, path, on_progress):
        """Copy the database into a new file at ``path`` with SQLite's backup API, in
        one read transaction (the copy is the snapshot it started on; writers carry on
        meanwhile), the copy self-contained (no WAL); ``on_progress(pages done,
        pages)``. -> the events in the copy."""
        conn = connect(self.path, self.busy_timeout_ms)
        target = sqlite3.connect(path)
        try:
            with read_snapshot(conn):
                events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
                conn.backup(target, pages=1024,
                            progress=lambda status, remaining, total: on_progress(total - remaining, total))
            target.execute("PRAGMA journal_mode = DELETE")
        finally:
            target.close()
            conn.close()
        return events

    @staticmethod
    def check_copy(path):
        """-> (PRAGMA integrity_check's first line, the events) of the database file at ``path``."""
        check = sqlite3.connect(path)
        try:
            return check.execute("PRAGMA integrity_check").fetchone()[0], \
                check.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        finally:
            check.close()


class SQLiteCommitWatch(CommitWatch):
    """Other processes' commits, seen by one connection: ``PRAGMA data_version``
    moves when any other connection commits; the rows changed since the last
    look (Sequences only grow, in commit order) say which programs and types."""

    def __init__(self, conn, after=None):
        self.conn = conn
        self.reads = SQLiteReads(conn)
        # Given a Sequence to start after, the first look reads what came since it.
        self.version = None if after is not None else conn.execute("PRAGMA data_version").fetchone()[0]
        self.last_seq = after if after is not None else self.reads.last_sequence()

    def changes(self, timeout, stop, limit=10000):
        if stop.wait(timeout):
            return None
        version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self.version:
            return None
        self.version = version
        return self.changes_after_last_look(limit)

    def close(self):
        self.conn.close()

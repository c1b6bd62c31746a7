"""eventstore's storage interface: what the app asks of a backend, as documented
base classes, the rows that cross the seam (named tuples), and the names both
backends share. The backends are eventstore_sqlite.py (the default) and
eventstore_pg.py; neither imports the app.

    storage.backend                 "sqlite" or "postgresql"
    storage.reads()                 a Reads for this thread (autocommit reads)
    storage.session()               a Session: its own connection, for the writer
                                    thread, the command line and the engines (one
                                    thread at a time, not always the same one)
    session.transaction(now, seqs)  with ... as tx: a durable write Transaction
    storage.watch_commits()         a CommitWatch: other processes' commits
    storage.errors                  the exceptions its operations raise
    storage.failure(exc)            the kind of failure one of them is (Failure), or None
    storage.retryable(exc)          whether a transaction that raised it may run again

What crosses the seam: EventInput, FeedQuery and SubscriptionRow (with its
WebhookRow) go down (a write, a feed page, a subscription); KeyRow, EventState,
EventRow, ProgramRow, UserRow, KeyInfo, Change, TypeState, SchemaRow, LiveEvent,
EventKey, SweepRow, SubscriptionRow and FeedBacklog come up.
Opening a storage raises StorageOpenError, whatever the backend. A backend that
can copy itself consistently while in use (SQLite) is also a Backups.
"""

import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

SCHEMA_VERSION = 5


def now_us():
    return time.time_ns() // 1000


def data_path(name):
    """A file or folder that comes with eventstore (schema.sql, openapi.json, ...):
    beside the modules in the repository; once installed (pip install .), in
    eventstore_data beside them (pyproject.toml lists what goes there)."""
    here = Path(__file__).resolve().parent
    beside = here / name
    return beside if beside.exists() else here / "eventstore_data" / name


class StorageOpenError(Exception):
    """The database cannot be opened as an eventstore database (missing driver,
    refused connection, a file that is not one, a newer schema): one line to show."""


class Failure(NamedTuple):
    """A failure of the database that the client can do something about: ``kind``
    (one of the constants below; the app answers each with its status) and a
    ``detail`` fit to show the client (never the database's own message)."""

    kind: str
    detail: str

    BUSY = "busy"                # try again shortly: the database or its connections are taken
    DISK_FULL = "disk full"      # nothing was written
    READ_ONLY = "read-only"      # nothing was written; try again later
    UNAVAILABLE = "unavailable"  # lost, cancelled or deadlocked: try again shortly


class SequencesExhausted(Exception):
    """A transaction needs more Sequences than it took when it began (PostgreSQL
    takes them up front): roll it back and run it again with ``needed``."""

    def __init__(self, needed):
        super().__init__(f"more than the Sequences taken; run again with {needed}")
        self.needed = needed


# --- What goes down: a write, a feed query ------------------------------------------

class EventInput(NamedTuple):
    """A validated, normalized event as a PUT asks it to be. (A named tuple:
    a batch makes a thousand of them, and a frozen dataclass is slow to build.)"""

    event_id: str
    program_id: str
    member_id: str
    event_type: str
    start_us: int
    end_us: int
    doc: str  # the representation up to "Deleted" (see schema.sql), EventData in the client's key order
    ref_event_id: str | None
    content_hash: bytes  # of the canonical content, for the replay rule
    data: dict | None = None  # the parsed EventData, for its type's schema (not stored as such)


@dataclass(frozen=True)
class FeedQuery:
    """One page of the change feed, as ``GET /events`` asks for it."""

    programs: tuple = ()      # empty: every program the caller may read
    event_types: tuple = ()   # empty: every type
    member_id: str | None = None
    ref_event_id: str | None = None
    start_from_us: int | None = None
    start_before_us: int | None = None
    after: int = 0
    limit: int = 100
    wait: int = 0


# --- What comes up: the rows ---------------------------------------------------------

class KeyRow(NamedTuple):
    """An API key as authentication reads it, with its user's state."""

    user_id: str
    key_hash: bytes
    revoked_us: int | None
    last_used_us: int | None
    is_system: bool
    disabled: bool


class EventState(NamedTuple):
    """What a write needs to know of a stored event (live or a tombstone)."""

    revision: int
    deleted: bool
    content_hash: bytes | None  # of the live content (None for a tombstone): the replay rule


EVENT_COLUMNS = "seq, event_id, program_id, event_type, doc, revision, created_us, updated_us"


class EventRow(NamedTuple):
    """An event or tombstone as the reads give it (EVENT_COLUMNS): enough to render
    its representation. ``doc`` is the stored representation up to "Deleted"
    (schema.sql); None for a tombstone."""

    seq: int
    event_id: str
    program_id: str
    event_type: str
    doc: str | None
    revision: int
    created_us: int
    updated_us: int

    @property
    def deleted(self):
        return self.doc is None


class ProgramRow(NamedTuple):
    program_id: str
    name: str
    registered_types_only: bool


class UserRow(NamedTuple):
    user_id: str
    is_system: bool
    disabled: bool
    grants: list  # [(program_id, access)] sorted by program


class KeyInfo(NamedTuple):
    """A key as the command line lists it (never the key itself)."""

    key_id: str
    created_us: int
    last_used_us: int | None
    revoked_us: int | None


class WebhookRow(NamedTuple):
    """A subscription's webhook as stored (docs/API.md §11; schema.sql says what each
    field holds): what it delivers to, its secrets, its state, and where its
    deliveries stand (the batch in flight, the failures, the next attempt)."""

    url: str
    max_events: int
    timeout_seconds: int
    state: str                   # "Active", "Paused" or "Disabled"
    secret: str                  # whsec_...: the current signing secret
    old_secret: str | None       # the one before it, signing too until old_secret_until_us
    old_secret_until_us: int | None
    restarts: int                # Rewinds and restarts: webhook-id's _r{n}
    last_attempt_us: int | None
    last_status: int | None
    last_error: str | None
    failures: int                # consecutive, since the last 2xx
    next_attempt_us: int | None
    failing_since_us: int | None
    disabled_reason: str | None
    batch_first: int | None      # the batch in flight: its first and last Sequence,
    batch_last: int | None
    batch_first_attempt_us: int | None  # and when it was first sent

    def __repr__(self):  # a row may reach a log line or a traceback: never its secrets
        shown = (f"{name}={'<hidden>' if name in SECRET_FIELDS and value is not None else repr(value)}"
                 for name, value in zip(self._fields, self))
        return f"WebhookRow({', '.join(shown)})"


SECRET_FIELDS = ("secret", "old_secret")


WEBHOOK_COLUMN_NAMES = tuple("webhook_" + name for name in (
    "url", "max_events", "timeout", "state", "secret", "old_secret", "old_secret_until_us", "restarts",
    "last_attempt_us", "last_status", "last_error", "failures", "next_attempt_us", "failing_since_us",
    "disabled_reason", "batch_first", "batch_last", "batch_first_attempt_us"))  # WebhookRow's fields, in order
WEBHOOK_COLUMNS = ", ".join(WEBHOOK_COLUMN_NAMES)
SUBSCRIPTION_COLUMN_NAMES = ("name", "owner", "description", "programs", "event_types", "position", "created_us",
                             "last_ack_us") + WEBHOOK_COLUMN_NAMES
SUBSCRIPTION_COLUMNS = ", ".join(SUBSCRIPTION_COLUMN_NAMES)


def webhook_of(columns):
    """WEBHOOK_COLUMNS' values -> a WebhookRow, or None when there is no webhook."""
    return None if columns[0] is None else WebhookRow._make(columns)


def webhook_values(webhook):
    """A WebhookRow, or None -> WEBHOOK_COLUMNS' values (all None without a webhook)."""
    return tuple(webhook) if webhook is not None else (None,) * len(WEBHOOK_COLUMN_NAMES)


class SubscriptionRow(NamedTuple):
    """A subscription as stored (docs/API.md §4a): its filter's lists (empty: every
    program its owner can read, every type), the Sequence acknowledged through, and
    its webhook (a WebhookRow, or None)."""

    name: str
    owner: str
    description: str | None
    programs: tuple
    event_types: tuple
    position: int
    created_us: int
    last_ack_us: int | None
    webhook: WebhookRow | None = None


class FeedBacklog(NamedTuple):
    """What a feed query has still to read: its ``changes`` (counted as its pages
    would return them, up to the query's limit + 1) and the UpdatedUTC of the first
    of them (None when there are none)."""

    changes: int
    first_updated_us: int | None


class Change(NamedTuple):
    """One committed change, as a commit watch reports it."""

    seq: int
    program_id: str
    event_type: str


class TypeState(NamedTuple):
    """A registered event type's rules (docs/API.md §5b)."""

    schema_version: int | None  # its current schema's version, None without one
    retain_days: int | None


class SchemaRow(NamedTuple):
    """One version of an event type's schema (kept after the type is unregistered)."""

    event_type: str
    version: int
    schema: str  # its JSON text, as it was sent
    created_us: int


class LiveEvent(NamedTuple):
    """A live event as a schema's proof reads it."""

    event_id: str
    doc: str  # the representation up to "Deleted" (see EventRow)


class EventKey(NamedTuple):
    """Which event: its id, program and type (what a change touches)."""

    event_id: str
    program_id: str
    event_type: str


class SweepRow(NamedTuple):
    """What the last sweep of an engine (the retention sweeper) did."""

    finished_us: int
    count: int


class Reads:
    """What the app reads; a backend's reads implement every method."""

    def key_row(self, key_id):
        """-> the KeyRow of a key (by its public id), or None."""
        raise NotImplementedError

    def grants_of(self, user_id):
        """-> {program_id: access} of a user."""
        raise NotImplementedError

    def any_user(self):
        """Whether any user exists."""
        raise NotImplementedError

    def user_state(self, user_id):
        """-> None if there is no such user, else "disabled" or "active"."""
        raise NotImplementedError

    def list_users(self):
        """[UserRow] sorted by id."""
        raise NotImplementedError

    def find_user(self, user_id):
        """-> the UserRow of a user, or None."""
        raise NotImplementedError

    def list_keys(self, user_id):
        """[KeyInfo] of a user's keys, oldest first."""
        raise NotImplementedError

    def find_program(self, program_id):
        """-> the ProgramRow, or None when the program is not registered."""
        raise NotImplementedError

    def list_programs(self):
        """[ProgramRow] sorted by id."""
        raise NotImplementedError

    def type_registered(self, event_type):
        """Whether ``event_type`` is registered (in a transaction: and held so until it
        ends)."""
        raise NotImplementedError

    def type_state(self, event_type):
        """-> the TypeState of a registered type, or None. In a transaction, also
        holds the type against a change of its schema (PostgreSQL; see
        lock_event_type) until the transaction ends, so that a schema proved on
        the data never misses an event written meanwhile."""
        raise NotImplementedError

    def type_schema(self, event_type, version):
        """-> the SchemaRow of one version of a type's schema, or None."""
        raise NotImplementedError

    def live_events_of_type(self, event_type, after=0):
        """-> (head, an iterator of LiveEvent): every live event of ``event_type`` whose
        Sequence is above ``after``, read through the (program, type) index from one
        snapshot, and that snapshot's head: every change at or below it is in the
        snapshot, every later one is above it. (In a transaction: its own view.) The
        iterator must be read to its end."""
        raise NotImplementedError

    def retained_types(self):
        """How many registered types have a RetainDays."""
        raise NotImplementedError

    def last_sweep(self, name):
        """-> the SweepRow of the last sweep recorded under ``name``, or None."""
        raise NotImplementedError

    def registered_types(self, limit):
        """-> (the first ``limit`` registered types by name, how many there are)."""
        raise NotImplementedError

    def event_types_json(self, programs, event_type=None):
        """The catalogue (docs/API.md §5a) as seen through ``programs`` (a list, or None
        for every program), as the JSON text of its list of entries: every registered
        type and every type with live events in those programs (or only
        ``event_type``), sorted by name, each with its live counts per program.
        Rendered by the database from the count rows: it costs per type and
        program, never per event."""
        raise NotImplementedError

    def read_event(self, event_id):
        """-> the EventRow of an event or tombstone, or None."""
        raise NotImplementedError

    def last_sequence(self):
        """The feed's head: the largest Sequence the feed may serve now, 0 for none.
        Rows are never removed, so on SQLite it never goes down; on PostgreSQL
        (behind the barrier of transactions in progress) it can lag the largest
        committed Sequence, and dip for a moment when the row at the head moves to a
        Sequence still held back."""
        raise NotImplementedError

    def last_committed_sequence(self):
        """The largest Sequence committed, 0 for none: never below a cursor the
        registry handed out, and it never goes down (a row only moves up). On SQLite
        it is the head; on PostgreSQL it may be ahead of it (docs/API.md §4, cursor
        hygiene: a cursor past it is a 400)."""
        raise NotImplementedError

    def changes_since(self, seq, limit):
        """[Change] after Sequence ``seq``, at most ``limit``."""
        raise NotImplementedError

    def read_feed(self, programs, query, strategy=None):
        """One page of the change feed (a FeedQuery): up to ``query.limit + 1`` EventRows
        (the extra one tells HasMore) with seq > query.after, in seq order, for
        ``programs`` (a list, or None for every program)."""
        raise NotImplementedError

    def feed_backlog(self, programs, query):
        """What read_feed(programs, query) would return, counted (a FeedBacklog): the
        same rows read the same way, but only their Sequences, and the UpdatedUTC of
        the first. Its cost is bounded by ``query.limit`` as a page's is."""
        raise NotImplementedError

    def sequence_before(self, time_us):
        """The greatest Sequence the feed serves whose UpdatedUTC is before ``time_us``,
        0 for none."""
        raise NotImplementedError

    def export_events(self, programs=()):
        """Every event (tombstones included) in Sequence order, as EventRows, from one
        snapshot, streamed."""
        raise NotImplementedError

    # Subscriptions

    def find_subscription(self, name):
        """-> the SubscriptionRow named ``name``, or None."""
        raise NotImplementedError

    def list_subscriptions(self, owner=None):
        """[SubscriptionRow] sorted by name in code-point order: every one, or ``owner``'s."""
        raise NotImplementedError

    def webhook_subscriptions(self):
        """[SubscriptionRow] of every subscription with a webhook, sorted by name."""
        raise NotImplementedError

    def answers(self):
        """Raises one of ``storage.errors`` unless the database answers a query."""
        raise NotImplementedError


class Transaction(Reads):
    """A write transaction: a Reads inside it, plus the writes. ``now`` is its
    time (microseconds); ``rules`` a TypeRules over it. ``upsert_event`` returns
    a function giving the revision: PostgreSQL sends a transaction's upserts
    together and reads the answers at the first question."""

    def changes(self):
        """How many rows this transaction has written (or sent to be)."""
        raise NotImplementedError

    def peek_seq(self):
        """The Sequence the next change will take (claim it with take_seq)."""
        raise NotImplementedError

    def take_seq(self):
        """Claim the next Sequence for a change of this transaction."""
        raise NotImplementedError

    def current(self, event_id):
        """-> the EventState of a stored event, or None."""
        raise NotImplementedError

    def upsert_event(self, event):
        """Create or change ``event`` unless it is a replay -> a function that returns its
        new revision, or None (PostgreSQL answers it later; see Later)."""
        raise NotImplementedError

    def current_many(self, event_ids):
        """-> {event_id: EventState} of those stored."""
        raise NotImplementedError

    def insert_events(self, events):
        """[(EventInput, seq)] of new events, in one executemany."""
        raise NotImplementedError

    def update_events(self, events):
        """[(EventInput, seq)] of stored events, each a new revision."""
        raise NotImplementedError

    def live_revision(self, event_id):
        """-> the revision of a live event, or None (missing or a tombstone)."""
        raise NotImplementedError

    def tombstone(self, event_id):
        """Turn a stored event into a tombstone with a new revision and Sequence -> the
        revision."""
        raise NotImplementedError

    def member_event_ids(self, program_id, member_id):
        """The live events of one member of a program, in Sequence order."""
        raise NotImplementedError

    def insert_tombstone(self, event_id, program_id, event_type):
        """Store a tombstone for an event that was never stored (import) -> its revision."""
        raise NotImplementedError

    def put_program(self, program_id, name, registered_types_only=None):
        """Register or rename a program; ``registered_types_only`` None keeps the setting
        (false for a new program). Returns the setting now in force."""
        raise NotImplementedError

    def register_event_type(self, event_type, description):
        """Register ``event_type``, or change its description."""
        raise NotImplementedError

    def lock_event_type(self, event_type):
        """Whether ``event_type`` is registered, locked against writes of it until this
        transaction ends: every transaction that wrote it has ended, and any other
        waits (for removing it, and for changing its schema; registered or not)."""
        raise NotImplementedError

    def set_type_schema(self, event_type, schema):
        """Store ``schema`` (JSON text) as the type's next schema version (one more than
        any version it ever had) and make it current -> the version. None: the type
        has no schema from now on (its versions stay)."""
        raise NotImplementedError

    def set_retain_days(self, event_type, days):
        """Set (or with None, remove) a registered type's RetainDays."""
        raise NotImplementedError

    def expired_events(self, limit):
        """[EventKey] of at most ``limit`` live events whose type has a RetainDays and
        whose last change (UpdatedUTC) is older than that at this transaction's time."""
        raise NotImplementedError

    def take_lease(self, name, holder, seconds):
        """Take or renew the lease ``name`` for ``holder`` until ``seconds`` from this
        transaction's time, unless another holder has it unexpired -> whether it is
        ``holder``'s now. One conditional statement."""
        raise NotImplementedError

    def holds_lease(self, name, holder):
        """Whether ``holder`` has the lease ``name``, unexpired at this transaction's
        time; kept so until the transaction ends (no other can take it meanwhile)."""
        raise NotImplementedError

    def release_lease(self, name, holder):
        """Give up the lease ``name`` if ``holder`` has it."""
        raise NotImplementedError

    def record_sweep(self, name, count):
        """Record that a sweep under ``name`` finished now, having done ``count``."""
        raise NotImplementedError

    def strict_users_of_type(self, event_type):
        """[(program_id, live events)] of the programs that take registered types only and
        have live events of ``event_type``."""
        raise NotImplementedError

    def delete_event_type(self, event_type):
        """Unregister ``event_type`` (its events keep it)."""
        raise NotImplementedError

    def insert_user(self, user_id, is_system):
        """Create a user."""
        raise NotImplementedError

    def insert_key(self, key_id, user_id, key_hash):
        """Store a key's hash for a user."""
        raise NotImplementedError

    def set_grants(self, user_id, grants):
        """Grant ``{program_id: access}`` to a user (replacing those programs' grants)."""
        raise NotImplementedError

    def revoke_grant(self, user_id, program_id):
        """-> whether the user held a grant on the program (now removed)."""
        raise NotImplementedError

    def set_user_disabled(self, user_id, disabled):
        """-> whether the user exists (disabled: none of its keys work)."""
        raise NotImplementedError

    def revoke_key(self, user_id, key_id):
        """-> whether the user has that key (now revoked; revoking twice keeps the first
        time)."""
        raise NotImplementedError

    def touch_key(self, key_id, when):
        """Record a key's last use."""
        raise NotImplementedError

    def lock_subscription(self, name):
        """-> the SubscriptionRow named ``name`` (or None), held against every other
        change of it until this transaction ends, so that changes of one
        subscription take effect in commit order."""
        raise NotImplementedError

    def put_subscription(self, row):
        """Create the subscription ``row`` (a SubscriptionRow, its webhook too), or
        replace the one of its name and owner -> whether it was written (False: another owner's
        subscription of that name committed first, and nothing was written)."""
        raise NotImplementedError

    def acknowledge(self, name, position, when):
        """Set a subscription's Position and the time of its last acknowledgement."""
        raise NotImplementedError

    def set_webhook(self, name, webhook):
        """Store subscription ``name``'s webhook (a WebhookRow, or None: none)."""
        raise NotImplementedError

    def delete_subscription(self, name):
        """-> whether there was a subscription ``name`` (now gone)."""
        raise NotImplementedError


class Session(Reads):
    """A connection of its own (the writer thread's, the command line's): its
    reads, and durable write transactions on it, one at a time."""

    storage = None  # the Storage it belongs to

    def transaction(self, now, seqs=0):
        """``with session.transaction(now, seqs) as tx:`` a Transaction, committed
        (durably) when the block ends, rolled back if it raises. ``now`` is its time
        in microseconds; ``seqs`` how many Sequences it will probably take (PostgreSQL
        takes them at BEGIN; SQLite ignores it)."""
        raise NotImplementedError

    def close(self):
        raise NotImplementedError


class CommitWatch:
    """Other processes' (and servers') commits, seen from one connection of its
    own: ``changes`` waits a little and reports what was committed since the
    last look; ``last_seq`` is the last Sequence reported."""

    reads = None    # a Reads on the watch's own connection
    last_seq = 0

    def changes(self, timeout, stop, limit=10000):
        """Wait up to ``timeout`` seconds (less once ``stop``, a threading.Event, is
        set) -> None when nothing was committed, else the [Change] since the last
        look (at most ``limit``)."""
        raise NotImplementedError

    def changes_after_last_look(self, limit):
        """The Changes since ``last_seq``, which moves to the last of them."""
        changed = self.reads.changes_since(self.last_seq, limit)
        if changed:
            self.last_seq = changed[-1].seq
        return changed

    def close(self):
        raise NotImplementedError


class Storage:
    """A database, open: see the module's docstring for what it offers."""

    backend = None
    errors = ()

    def reads(self):
        """This thread's Reads."""
        raise NotImplementedError

    def session(self):
        """A Session of its own."""
        raise NotImplementedError

    def watch_commits(self, after=None):
        """A CommitWatch on a connection of its own, reporting the changes after
        Sequence ``after`` (None: from now on)."""
        raise NotImplementedError

    def local_file(self, suffix):
        """A file this machine's processes on this database share, or None."""
        raise NotImplementedError

    def failure(self, exc):
        """-> the Failure that ``exc`` (one of ``errors``) is, or None for a bug."""
        raise NotImplementedError

    @staticmethod
    def retryable(exc):
        """Whether a transaction that raised ``exc`` may succeed if run again."""
        raise NotImplementedError

    def health_details(self):
        """What /health adds for this backend (a dict)."""
        raise NotImplementedError

    def durability(self):
        """One line for the operator: whether a 200 is durable here."""
        raise NotImplementedError

    def reopened(self):
        """The same database, opened anew in a forked child."""
        raise NotImplementedError

    def forget_after_fork(self):
        """In a forked child: never use or close the parent's connections."""
        raise NotImplementedError

    def close(self):
        raise NotImplementedError


class Backups:
    """A storage that can copy itself consistently while in use (the command
    line's ``backup``)."""

    def backup_to(self, path, on_progress):
        """Copy the database to a new file at ``path``; ``on_progress(done, total)``.
        -> the events in the copy."""
        raise NotImplementedError

    @staticmethod
    def check_copy(path):
        """-> (an integrity verdict, "ok" when sound; the events) of a copy."""
        raise NotImplementedError


class TypeRules:
    """What programs take, read from ``reads`` once per program and type and kept:
    one per write transaction (read under the write lock, so a rule changed by
    any process is seen by the next transaction), or one per check of an import.
    A transaction holds a whole group of writes: one of them that changes a
    program or a type (its schema) calls ``forget``, so that the writes after it
    in the group read the rule anew."""

    def __init__(self, reads):
        self.reads = reads
        self.forget()

    def forget(self):
        """Read every rule anew from now on (a program or a type was just changed)."""
        self._strict = {}       # program id -> registered_types_only, or None: not registered
        self._types = {}        # event type -> its TypeState, or None: not registered

    def program_exists(self, program_id):
        return self._program_rule(program_id) is not None

    def _program_rule(self, program_id):
        if program_id not in self._strict:
            found = self.reads.find_program(program_id)
            self._strict[program_id] = found and found.registered_types_only
        return self._strict[program_id]

    def type_allowed(self, program_id, event_type):
        """False when the program takes registered types only and this one is not."""
        if not self._program_rule(program_id):
            return True
        return self.type_state(event_type) is not None

    def type_state(self, event_type):
        """The type's TypeState (None: not registered), read once."""
        if event_type not in self._types:
            self._types[event_type] = self.reads.type_state(event_type)
        return self._types[event_type]

    def schema_version(self, event_type):
        """The version of the type's schema in force, None without one."""
        state = self.type_state(event_type)
        return state and state.schema_version


def erase_events(tx, event_ids):
    """Tombstone each of ``event_ids`` (live events), each with its own new Revision
    and Sequence, its data erased (docs/API.md §5): the step a member's erasure and
    the retention sweeper share. -> how many."""
    for event_id in event_ids:
        tx.tombstone(event_id)
    return len(event_ids)


def event_row(event, seq, now):
    """An EventInput's named parameters for the events table."""
    return {"seq": seq, "event_id": event.event_id, "program_id": event.program_id,
            "event_type": event.event_type, "member_id": event.member_id, "start_us": event.start_us,
            "end_us": event.end_us, "doc": event.doc, "ref_event_id": event.ref_event_id,
            "content_hash": event.content_hash, "now": now}


# --- Database names ----------------------------------------------------------------

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def safe_db_name(db):
    """A database name fit for a log or an error: a URL without its password
    (in its user part, or as a ``password`` or ``sslpassword`` parameter)."""
    db = str(db)
    if not db.startswith(POSTGRES_SCHEMES):
        return db
    url = urllib.parse.urlsplit(db)
    if url.password is not None:
        userinfo, host = url.netloc.rsplit("@", 1)
        url = url._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{host}")
    query = [(name, "***" if name.lower() in PASSWORD_PARAMETERS else value)
             for name, value in urllib.parse.parse_qsl(url.query, keep_blank_values=True)]
    return url._replace(query=urllib.parse.urlencode(query, safe="*")).geturl()


def _url_passwords(db):
    url = urllib.parse.urlsplit(db)
    found = [url.password] if url.password else []
    return found + [value for name, value in urllib.parse.parse_qsl(url.query)
                    if name.lower() in PASSWORD_PARAMETERS and value]


PASSWORD_PARAMETERS = ("password", "sslpassword")  # in any case: libpq refuses PASSWORD, naming it


def safe_text(text, db):
    """``text`` (an error message, a URL) without the passwords in the database URL ``db``."""
    text, db = str(text), str(db)
    if not db.startswith(POSTGRES_SCHEMES):
        return text
    for password in sorted(_url_passwords(db), key=len, reverse=True):
        for form in {password, urllib.parse.unquote(password), urllib.parse.quote(password, safe="")}:
            text = text.replace(form, "***")
    return text

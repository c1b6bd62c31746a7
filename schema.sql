-- eventstore schema. Applied by eventstore.apply_schema() on every start; every
-- statement is idempotent (IF NOT EXISTS) and nothing is ever dropped. The schema
-- version lives in PRAGMA user_version, set by the code after this script runs
-- (apply_schema, which also carries the steps that upgrade an older database).
-- Times are integers: microseconds since 1970-01-01T00:00:00Z, UTC.

-- registered_types_only: while 1, every write of the program's events must name
-- a type registered in event_types (schema version 2).
CREATE TABLE IF NOT EXISTS programs (
    program_id             TEXT PRIMARY KEY,
    name                   TEXT NOT NULL,
    created_us             INTEGER NOT NULL,
    registered_types_only  INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS users (
    user_id     TEXT PRIMARY KEY,
    is_system   INTEGER NOT NULL DEFAULT 0,
    disabled    INTEGER NOT NULL DEFAULT 0,
    created_us  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS grants (
    user_id     TEXT NOT NULL REFERENCES users (user_id),
    program_id  TEXT NOT NULL REFERENCES programs (program_id),
    access      TEXT NOT NULL CHECK (access IN ('read', 'write')),
    PRIMARY KEY (user_id, program_id)
) WITHOUT ROWID;

-- key_id is the key's public id (its first 12 characters); only a SHA-256 of
-- the whole key is kept.
CREATE TABLE IF NOT EXISTS api_keys (
    key_id        TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL REFERENCES users (user_id),
    key_hash      BLOB NOT NULL,
    created_us    INTEGER NOT NULL,
    last_used_us  INTEGER,
    revoked_us    INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS api_keys_by_user ON api_keys (user_id);

-- One row per event in its current state, tombstones included. The rowid is the
-- change-feed Sequence: every change moves the row to a new, larger rowid, so
-- the table itself is stored in feed order and "seq > ? ORDER BY seq" is a
-- range scan. Rows are never removed, so MAX(seq) never goes down.
-- doc is the live event's JSON representation up to its "Deleted" member,
-- rendered once at write time, so reads only append the bookkeeping members.
-- A tombstone keeps event_id, program_id, event_type and the bookkeeping
-- columns; member_id, the times, doc, ref_event_id and content_hash are NULL.
CREATE TABLE IF NOT EXISTS events (
    seq           INTEGER PRIMARY KEY,
    event_id      TEXT NOT NULL UNIQUE,
    program_id    TEXT NOT NULL,
    event_type    TEXT NOT NULL,
    member_id     TEXT,
    start_us      INTEGER,
    end_us        INTEGER,
    doc           TEXT,
    ref_event_id  TEXT,
    deleted       INTEGER NOT NULL DEFAULT 0,
    revision      INTEGER NOT NULL,
    content_hash  BLOB,
    created_us    INTEGER NOT NULL,
    updated_us    INTEGER NOT NULL
);

-- Feed indexes. Each ends, implicitly, in the rowid (seq), so a feed query with
-- equality on the leading columns and "seq > ? ORDER BY seq LIMIT ?" walks one
-- index range in order and stops after LIMIT rows.
CREATE INDEX IF NOT EXISTS events_by_program ON events (program_id);
CREATE INDEX IF NOT EXISTS events_by_type ON events (program_id, event_type);
CREATE INDEX IF NOT EXISTS events_by_member ON events (program_id, member_id)
    WHERE member_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_by_reference ON events (program_id, ref_event_id)
    WHERE ref_event_id IS NOT NULL;

-- The event-type catalogue (schema version 2): the registered types, and the
-- number of live events per (type, program), kept by the triggers below in the
-- transaction of every change that moves them, so listing the catalogue reads
-- rows per type and program, never per event. A count that falls to zero keeps
-- its row (readers skip it): fewer writes than deleting and re-creating it.
-- schema_version names the type's current schema in event_type_schemas (NULL:
-- none); retain_days is its RetainDays (NULL: kept for ever). Schema version 3.
CREATE TABLE IF NOT EXISTS event_types (
    event_type      TEXT PRIMARY KEY,
    description     TEXT NOT NULL,
    created_us      INTEGER NOT NULL,
    updated_us      INTEGER NOT NULL,
    schema_version  INTEGER,
    retain_days     INTEGER
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS event_type_counts (
    event_type  TEXT NOT NULL,
    program_id  TEXT NOT NULL,
    events      INTEGER NOT NULL,
    PRIMARY KEY (event_type, program_id)
) WITHOUT ROWID;

-- A live event counts for its (type, program); a tombstone does not. program_id
-- never changes; a change of type or of deleted moves one count.
CREATE TRIGGER IF NOT EXISTS events_count_insert AFTER INSERT ON events
WHEN NEW.deleted = 0
BEGIN
    INSERT INTO event_type_counts (event_type, program_id, events) VALUES (NEW.event_type, NEW.program_id, 1)
        ON CONFLICT (event_type, program_id) DO UPDATE SET events = events + 1;
END;

CREATE TRIGGER IF NOT EXISTS events_count_leave AFTER UPDATE OF event_type, deleted ON events
WHEN OLD.deleted = 0 AND (NEW.deleted = 1 OR NEW.event_type IS NOT OLD.event_type)
BEGIN
    UPDATE event_type_counts SET events = events - 1
        WHERE event_type = OLD.event_type AND program_id = OLD.program_id;
END;

CREATE TRIGGER IF NOT EXISTS events_count_enter AFTER UPDATE OF event_type, deleted ON events
WHEN NEW.deleted = 0 AND (OLD.deleted = 1 OR NEW.event_type IS NOT OLD.event_type)
BEGIN
    INSERT INTO event_type_counts (event_type, program_id, events) VALUES (NEW.event_type, NEW.program_id, 1)
        ON CONFLICT (event_type, program_id) DO UPDATE SET events = events + 1;
END;

CREATE TRIGGER IF NOT EXISTS events_count_remove AFTER DELETE ON events
WHEN OLD.deleted = 0
BEGIN
    UPDATE event_type_counts SET events = events - 1
        WHERE event_type = OLD.event_type AND program_id = OLD.program_id;
END;

-- Every schema version ever set on a type (schema version 3), as sent (JSON
-- text); kept when the type is unregistered, so a later schema continues the count.
CREATE TABLE IF NOT EXISTS event_type_schemas (
    event_type  TEXT NOT NULL,
    version     INTEGER NOT NULL,
    schema      TEXT NOT NULL,
    created_us  INTEGER NOT NULL,
    PRIMARY KEY (event_type, version)
) WITHOUT ROWID;

-- Retention: the live events of a type by the time of their last change, so a
-- sweep reads only the expired ones.
CREATE INDEX IF NOT EXISTS events_by_age ON events (event_type, updated_us) WHERE deleted = 0;

-- Leases (schema version 3): one worker at a time across processes and servers
-- (the retention sweeper; docs/DESIGN.md "Engines"). A holder takes or renews one
-- with one conditional statement; it is free once expires_us has passed.
CREATE TABLE IF NOT EXISTS leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_us  INTEGER NOT NULL
) WITHOUT ROWID;

-- What the last sweep of an engine did (the retention sweeper's, for /health).
CREATE TABLE IF NOT EXISTS sweeps (
    name         TEXT PRIMARY KEY,
    finished_us  INTEGER NOT NULL,
    count        INTEGER NOT NULL
) WITHOUT ROWID;

-- Subscriptions (schema version 4): named, durable positions in the feed, each
-- with a filter, read as the feed is read; the position moves only when the
-- subscription's consumer acknowledges (docs/API.md §4a). programs and
-- event_types are the filter's lists as JSON arrays of strings ([]: every
-- program its owner can read, every type); position is the Sequence
-- acknowledged through.
CREATE TABLE IF NOT EXISTS subscriptions (
    name          TEXT PRIMARY KEY,
    owner         TEXT NOT NULL REFERENCES users (user_id),
    description   TEXT,
    programs      TEXT NOT NULL DEFAULT '[]',
    event_types   TEXT NOT NULL DEFAULT '[]',
    position      INTEGER NOT NULL DEFAULT 0,
    created_us    INTEGER NOT NULL,
    last_ack_us   INTEGER,
    -- Its webhook (schema version 5; docs/API.md §11), all NULL without one: the
    -- receiver (url, max_events, timeout), its signing secrets (the current one,
    -- and the one before it while old_secret_until_us has not passed: the
    -- registry must sign, so they are kept as they are, not hashed), state
    -- ('Active', 'Paused', 'Disabled') and why it is not Active, restarts (the
    -- Rewinds and restarts, webhook-id's _r{n}), the last attempt's outcome, the
    -- consecutive failures since failing_since_us and the next attempt's time, and
    -- the batch in flight (first and last Sequence, its first attempt's time), so
    -- that any process carries a delivery on where another left it.
    webhook_url                  TEXT,
    webhook_max_events           INTEGER,
    webhook_timeout              INTEGER,
    webhook_state                TEXT,
    webhook_secret               TEXT,
    webhook_old_secret           TEXT,
    webhook_old_secret_until_us  INTEGER,
    webhook_restarts             INTEGER,
    webhook_last_attempt_us      INTEGER,
    webhook_last_status          INTEGER,
    webhook_last_error           TEXT,
    webhook_failures             INTEGER,
    webhook_next_attempt_us      INTEGER,
    webhook_failing_since_us     INTEGER,
    webhook_disabled_reason      TEXT,
    webhook_batch_first          INTEGER,
    webhook_batch_last           INTEGER,
    webhook_batch_first_attempt_us INTEGER
) WITHOUT ROWID;

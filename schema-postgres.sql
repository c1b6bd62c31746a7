-- eventstore schema for PostgreSQL (13 or later). Applied by eventstore_pg on
-- every start, in one transaction under an advisory lock; every statement is
-- idempotent and nothing is ever dropped. The schema version is the row of
-- eventstore_schema, written by the code after this script runs.
-- Times are integers: microseconds since 1970-01-01T00:00:00Z, UTC.
-- Identifiers and names are COLLATE "C": compared and sorted by code point,
-- as SQLite does, so both backends list things in the same order.

CREATE TABLE IF NOT EXISTS eventstore_schema (
    version  integer NOT NULL
);

CREATE TABLE IF NOT EXISTS programs (
    program_id             text COLLATE "C" PRIMARY KEY,
    name                   text NOT NULL,
    created_us             bigint NOT NULL,
    registered_types_only  boolean NOT NULL DEFAULT false
);

CREATE TABLE IF NOT EXISTS users (
    user_id     text COLLATE "C" PRIMARY KEY,
    is_system   boolean NOT NULL DEFAULT false,
    disabled    boolean NOT NULL DEFAULT false,
    created_us  bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS grants (
    user_id     text COLLATE "C" NOT NULL REFERENCES users (user_id),
    program_id  text COLLATE "C" NOT NULL REFERENCES programs (program_id),
    access      text NOT NULL CHECK (access IN ('read', 'write')),
    PRIMARY KEY (user_id, program_id)
);

-- key_id is the key's public id (its first 12 characters); only a SHA-256 of
-- the whole key is kept.
CREATE TABLE IF NOT EXISTS api_keys (
    key_id        text COLLATE "C" PRIMARY KEY,
    user_id       text COLLATE "C" NOT NULL REFERENCES users (user_id),
    key_hash      bytea NOT NULL,
    created_us    bigint NOT NULL,
    last_used_us  bigint,
    revoked_us    bigint
);
CREATE INDEX IF NOT EXISTS api_keys_by_user ON api_keys (user_id);

-- The change feed's Sequences. Taken only by eventstore_take_sequences below.
CREATE SEQUENCE IF NOT EXISTS events_seq AS bigint;

-- One row per event in its current state, tombstones included; every change
-- gives the row a new, larger seq. xid is the writing transaction's id: the
-- feed shows only rows whose xid is older than every transaction still in
-- progress (see eventstore_pg), and Sequences are taken in xid order, so a
-- follower never sees a Sequence before a smaller one that commits later.
-- member_id is bytea (its UTF-8): a member id may hold U+0000, which text cannot.
-- doc is the live event's JSON representation up to its "Deleted" member.
-- A tombstone keeps event_id, program_id, event_type and the bookkeeping
-- columns; member_id, the times, doc, ref_event_id and content_hash are NULL.
CREATE TABLE IF NOT EXISTS events (
    seq           bigint PRIMARY KEY,
    xid           xid8 NOT NULL,
    event_id      text COLLATE "C" NOT NULL UNIQUE,
    program_id    text COLLATE "C" NOT NULL,
    event_type    text COLLATE "C" NOT NULL,
    member_id     bytea,
    start_us      bigint,
    end_us        bigint,
    doc           text,
    ref_event_id  text COLLATE "C",
    deleted       boolean NOT NULL DEFAULT false,
    revision      integer NOT NULL,
    content_hash  bytea,
    created_us    bigint NOT NULL,
    updated_us    bigint NOT NULL
);

-- Feed indexes: equality on the leading columns, then seq in order.
CREATE INDEX IF NOT EXISTS events_by_program ON events (program_id, seq);
CREATE INDEX IF NOT EXISTS events_by_type ON events (program_id, event_type, seq);
CREATE INDEX IF NOT EXISTS events_by_member ON events (program_id, member_id, seq)
    WHERE member_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_by_reference ON events (program_id, ref_event_id, seq)
    WHERE ref_event_id IS NOT NULL;

-- The event-type catalogue: the registered types, and the number of live
-- events per (type, program), kept by the trigger below in the transaction of
-- every change that moves them.
CREATE TABLE IF NOT EXISTS event_types (
    event_type   text COLLATE "C" PRIMARY KEY,
    description  text NOT NULL,
    created_us   bigint NOT NULL,
    updated_us   bigint NOT NULL
);
-- Schema version 3: the type's current schema (a version in event_type_schemas,
-- NULL: none) and its RetainDays (NULL: kept for ever).
ALTER TABLE event_types ADD COLUMN IF NOT EXISTS schema_version integer;
ALTER TABLE event_types ADD COLUMN IF NOT EXISTS retain_days integer;

CREATE TABLE IF NOT EXISTS event_type_counts (
    event_type  text COLLATE "C" NOT NULL,
    program_id  text COLLATE "C" NOT NULL,
    events      bigint NOT NULL,
    PRIMARY KEY (event_type, program_id)
);

-- A live event counts for its (type, program); a tombstone does not.
CREATE OR REPLACE FUNCTION eventstore_count_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND NOT OLD.deleted
       AND (TG_OP = 'DELETE' OR NEW.deleted OR NEW.event_type IS DISTINCT FROM OLD.event_type) THEN
        UPDATE event_type_counts SET events = events - 1
            WHERE event_type = OLD.event_type AND program_id = OLD.program_id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NOT NEW.deleted
       AND (TG_OP = 'INSERT' OR OLD.deleted OR NEW.event_type IS DISTINCT FROM OLD.event_type) THEN
        INSERT INTO event_type_counts (event_type, program_id, events) VALUES (NEW.event_type, NEW.program_id, 1)
            ON CONFLICT (event_type, program_id) DO UPDATE SET events = event_type_counts.events + 1;
    END IF;
    RETURN NULL;
END $$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_trigger WHERE tgname = 'events_count' AND tgrelid = 'events'::regclass) THEN
        CREATE TRIGGER events_count AFTER INSERT OR UPDATE OF event_type, deleted OR DELETE ON events
            FOR EACH ROW EXECUTE FUNCTION eventstore_count_events();
    END IF;
END $$;

-- Take n Sequences for the calling transaction, and give it its xid, while
-- holding an advisory lock that every writer takes for this step only: so the
-- order of xids is the order of Sequences (docs/DESIGN.md, "alloclock"). The lock
-- is a session lock, released before returning (also on error), so writers
-- wait for each other only during this step, never until COMMIT.
CREATE OR REPLACE FUNCTION eventstore_take_sequences(n bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    first bigint;
BEGIN
    PERFORM pg_advisory_lock(7310582);
    BEGIN
        PERFORM pg_current_xact_id();
        first := nextval('events_seq');
        IF n > 1 THEN
            PERFORM setval('events_seq', first + n - 1);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        PERFORM pg_advisory_unlock(7310582);
        RAISE;
    END;
    PERFORM pg_advisory_unlock(7310582);
    RETURN first;
END $$;

-- Every schema version ever set on a type (schema version 3), as sent; kept when
-- the type is unregistered, so a later schema continues the count.
CREATE TABLE IF NOT EXISTS event_type_schemas (
    event_type  text COLLATE "C" NOT NULL,
    version     integer NOT NULL,
    schema      text NOT NULL,
    created_us  bigint NOT NULL,
    PRIMARY KEY (event_type, version)
);

-- Retention: the live events of a type by the time of their last change.
CREATE INDEX IF NOT EXISTS events_by_age ON events (event_type, updated_us) WHERE NOT deleted;

-- Leases: one worker at a time across servers (docs/DESIGN.md "Engines").
CREATE TABLE IF NOT EXISTS leases (
    name        text COLLATE "C" PRIMARY KEY,
    holder      text NOT NULL,
    expires_us  bigint NOT NULL
);

-- What the last sweep of an engine did (the retention sweeper's, for /health).
CREATE TABLE IF NOT EXISTS sweeps (
    name         text COLLATE "C" PRIMARY KEY,
    finished_us  bigint NOT NULL,
    count        bigint NOT NULL
);

-- Subscriptions (schema version 4): named, durable positions in the feed, each
-- with a filter ({}: every program its owner can read, every type), read as
-- the feed is read; position is the Sequence acknowledged through.
CREATE TABLE IF NOT EXISTS subscriptions (
    name          text COLLATE "C" PRIMARY KEY,
    owner         text COLLATE "C" NOT NULL REFERENCES users (user_id),
    description   text,
    programs      text[] NOT NULL DEFAULT '{}',
    event_types   text[] NOT NULL DEFAULT '{}',
    position      bigint NOT NULL DEFAULT 0,
    created_us    bigint NOT NULL,
    last_ack_us   bigint
);

-- Its webhook (schema version 5; docs/API.md §11 and schema.sql say what each
-- column holds), all NULL without one; added in place to a version-4 table.
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_url text;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_max_events integer;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_timeout integer;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_state text;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_secret text;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_old_secret text;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_old_secret_until_us bigint;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_restarts integer;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_last_attempt_us bigint;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_last_status integer;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_last_error text;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_failures integer;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_next_attempt_us bigint;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_failing_since_us bigint;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_disabled_reason text;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_batch_first bigint;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_batch_last bigint;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS webhook_batch_first_attempt_us bigint;

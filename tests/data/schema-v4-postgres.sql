--
-- PostgreSQL database dump
--


-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

--
-- Name: eventstore_count_events(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.eventstore_count_events() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: eventstore_take_sequences(bigint); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.eventstore_take_sequences(n bigint) RETURNS bigint
    LANGUAGE plpgsql
    AS $$
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


SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: api_keys; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.api_keys (
    key_id text NOT NULL COLLATE pg_catalog."C",
    user_id text NOT NULL COLLATE pg_catalog."C",
    key_hash bytea NOT NULL,
    created_us bigint NOT NULL,
    last_used_us bigint,
    revoked_us bigint
);


--
-- Name: event_type_counts; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.event_type_counts (
    event_type text NOT NULL COLLATE pg_catalog."C",
    program_id text NOT NULL COLLATE pg_catalog."C",
    events bigint NOT NULL
);


--
-- Name: event_type_schemas; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.event_type_schemas (
    event_type text NOT NULL COLLATE pg_catalog."C",
    version integer NOT NULL,
    schema text NOT NULL,
    created_us bigint NOT NULL
);


--
-- Name: event_types; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.event_types (
    event_type text NOT NULL COLLATE pg_catalog."C",
    description text NOT NULL,
    created_us bigint NOT NULL,
    updated_us bigint NOT NULL,
    schema_version integer,
    retain_days integer
);


--
-- Name: events; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.events (
    seq bigint NOT NULL,
    xid xid8 NOT NULL,
    event_id text NOT NULL COLLATE pg_catalog."C",
    program_id text NOT NULL COLLATE pg_catalog."C",
    event_type text NOT NULL COLLATE pg_catalog."C",
    member_id bytea,
    start_us bigint,
    end_us bigint,
    doc text,
    ref_event_id text COLLATE pg_catalog."C",
    deleted boolean DEFAULT false NOT NULL,
    revision integer NOT NULL,
    content_hash bytea,
    created_us bigint NOT NULL,
    updated_us bigint NOT NULL
);


--
-- Name: events_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.events_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: eventstore_schema; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.eventstore_schema (
    version integer NOT NULL
);


--
-- Name: grants; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.grants (
    user_id text NOT NULL COLLATE pg_catalog."C",
    program_id text NOT NULL COLLATE pg_catalog."C",
    access text NOT NULL,
    CONSTRAINT grants_access_check CHECK ((access = ANY (ARRAY['read'::text, 'write'::text])))
);


--
-- Name: leases; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.leases (
    name text NOT NULL COLLATE pg_catalog."C",
    holder text NOT NULL,
    expires_us bigint NOT NULL
);


--
-- Name: programs; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.programs (
    program_id text NOT NULL COLLATE pg_catalog."C",
    name text NOT NULL,
    created_us bigint NOT NULL,
    registered_types_only boolean DEFAULT false NOT NULL
);


--
-- Name: subscriptions; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.subscriptions (
    name text NOT NULL COLLATE pg_catalog."C",
    owner text NOT NULL COLLATE pg_catalog."C",
    description text,
    programs text[] DEFAULT '{}'::text[] NOT NULL,
    event_types text[] DEFAULT '{}'::text[] NOT NULL,
    "position" bigint DEFAULT 0 NOT NULL,
    created_us bigint NOT NULL,
    last_ack_us bigint
);


--
-- Name: sweeps; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.sweeps (
    name text NOT NULL COLLATE pg_catalog."C",
    finished_us bigint NOT NULL,
    count bigint NOT NULL
);


--
-- Name: users; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.users (
    user_id text NOT NULL COLLATE pg_catalog."C",
    is_system boolean DEFAULT false NOT NULL,
    disabled boolean DEFAULT false NOT NULL,
    created_us bigint NOT NULL
);


--
-- Data for Name: api_keys; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.api_keys VALUES ('esk_nWfKTBEz', 'reader', '\xda307b832be1733ed3a476a286780c799e6e175d2828ee4f993610cd4c62d43b', 1796591121465673, NULL, NULL);
INSERT INTO public.api_keys VALUES ('esk_H4AQdUDb', 'admin', '\xa6933b99855a0edcb970f84bd9b581e094a42883eb92023fad8822252778f962', 1796591121463673, 1796591121466418, NULL);


--
-- Data for Name: event_type_counts; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.event_type_counts VALUES ('CourseCompleted', 'FOO', 4);
INSERT INTO public.event_type_counts VALUES ('Badge', 'BAR', 1);


--
-- Data for Name: event_type_schemas; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: event_types; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: events; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.events VALUES (1, '730', 'FOO-0', 'FOO', 'CourseCompleted', '\x6d30', 1767225600000000, 1767225600000000, '{"EventId":"FOO-0","ProgramId":"FOO","ProgramMemberId":"m0","EventType":"CourseCompleted","EventStartUTC":"2026-01-01T00:00:00Z","EventEndUTC":"2026-01-01T00:00:00Z","EventData":{},"ReferenceEventId":null,"Deleted":false', NULL, false, 1, '\x63057eeeb19d77f085ff97fff14a92c7f0ad22b1af9a3bc9a045f4dcc2819d71', 1796591121473247, 1796591121473247);
INSERT INTO public.events VALUES (2, '731', 'FOO-1', 'FOO', 'CourseCompleted', '\x6d31', 1767225600000000, 1767225600000000, '{"EventId":"FOO-1","ProgramId":"FOO","ProgramMemberId":"m1","EventType":"CourseCompleted","EventStartUTC":"2026-01-01T00:00:00Z","EventEndUTC":"2026-01-01T00:00:00Z","EventData":{},"ReferenceEventId":null,"Deleted":false', NULL, false, 1, '\xe1d9f6f7641959cca825fb8c5a92f4b87987bcaede171a4d20323ceb69f29912', 1796591121477237, 1796591121477237);
INSERT INTO public.events VALUES (3, '732', 'FOO-2', 'FOO', 'CourseCompleted', '\x6d32', 1767225600000000, 1767225600000000, '{"EventId":"FOO-2","ProgramId":"FOO","ProgramMemberId":"m2","EventType":"CourseCompleted","EventStartUTC":"2026-01-01T00:00:00Z","EventEndUTC":"2026-01-01T00:00:00Z","EventData":{},"ReferenceEventId":null,"Deleted":false', NULL, false, 1, '\x237b0c99c7b04e40fc7a2f46cebe4d8543bbeb9cf142be812c0a020547a22b28', 1796591121478491, 1796591121478491);
INSERT INTO public.events VALUES (4, '733', 'FOO-3', 'FOO', 'CourseCompleted', '\x6d33', 1767225600000000, 1767225600000000, '{"EventId":"FOO-3","ProgramId":"FOO","ProgramMemberId":"m3","EventType":"CourseCompleted","EventStartUTC":"2026-01-01T00:00:00Z","EventEndUTC":"2026-01-01T00:00:00Z","EventData":{},"ReferenceEventId":null,"Deleted":false', NULL, false, 1, '\x14672e2f269dd4743c53ad9accdd672a10c97fd9061f009ecd901cd88c5eec31', 1796591121479608, 1796591121479608);
INSERT INTO public.events VALUES (5, '734', 'BAR-1', 'BAR', 'Badge', '\x6d31', 1767225600000000, 1767225600000000, '{"EventId":"BAR-1","ProgramId":"BAR","ProgramMemberId":"m1","EventType":"Badge","EventStartUTC":"2026-01-01T00:00:00Z","EventEndUTC":"2026-01-01T00:00:00Z","EventData":{},"ReferenceEventId":null,"Deleted":false', NULL, false, 1, '\xb7d7acb79b570566a1b4f2c23829f0b1b502553153a0592a62953218211e192d', 1796591121480544, 1796591121480544);


--
-- Data for Name: eventstore_schema; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.eventstore_schema VALUES (4);


--
-- Data for Name: grants; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: leases; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: programs; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.programs VALUES ('FOO', 'Program FOO', 1796591121470386, false);
INSERT INTO public.programs VALUES ('BAR', 'Program BAR', 1796591121472403, false);


--
-- Data for Name: subscriptions; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.subscriptions VALUES ('lms', 'admin', 'the LMS', '{FOO}', '{}', 2, 1796591121481333, 1796591121484154);
INSERT INTO public.subscriptions VALUES ('all', 'admin', NULL, '{}', '{}', 0, 1796591121485871, NULL);


--
-- Data for Name: sweeps; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: users; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.users VALUES ('admin', true, false, 1796591121463673);
INSERT INTO public.users VALUES ('reader', false, false, 1796591121465673);


--
-- Name: events_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.events_seq', 5, true);


--
-- Name: api_keys api_keys_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.api_keys
    ADD CONSTRAINT api_keys_pkey PRIMARY KEY (key_id);


--
-- Name: event_type_counts event_type_counts_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.event_type_counts
    ADD CONSTRAINT event_type_counts_pkey PRIMARY KEY (event_type, program_id);


--
-- Name: event_type_schemas event_type_schemas_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.event_type_schemas
    ADD CONSTRAINT event_type_schemas_pkey PRIMARY KEY (event_type, version);


--
-- Name: event_types event_types_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.event_types
    ADD CONSTRAINT event_types_pkey PRIMARY KEY (event_type);


--
-- Name: events events_event_id_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.events
    ADD CONSTRAINT events_event_id_key UNIQUE (event_id);


--
-- Name: events events_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.events
    ADD CONSTRAINT events_pkey PRIMARY KEY (seq);


--
-- Name: grants grants_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.grants
    ADD CONSTRAINT grants_pkey PRIMARY KEY (user_id, program_id);


--
-- Name: leases leases_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.leases
    ADD CONSTRAINT leases_pkey PRIMARY KEY (name);


--
-- Name: programs programs_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.programs
    ADD CONSTRAINT programs_pkey PRIMARY KEY (program_id);


--
-- Name: subscriptions subscriptions_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.subscriptions
    ADD CONSTRAINT subscriptions_pkey PRIMARY KEY (name);


--
-- Name: sweeps sweeps_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.sweeps
    ADD CONSTRAINT sweeps_pkey PRIMARY KEY (name);


--
-- Name: users users_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.users
    ADD CONSTRAINT users_pkey PRIMARY KEY (user_id);


--
-- Name: api_keys_by_user; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX api_keys_by_user ON public.api_keys USING btree (user_id);


--
-- Name: events_by_age; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX events_by_age ON public.events USING btree (event_type, updated_us) WHERE (NOT deleted);


--
-- Name: events_by_member; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX events_by_member ON public.events USING btree (program_id, member_id, seq) WHERE (member_id IS NOT NULL);


--
-- Name: events_by_program; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX events_by_program ON public.events USING btree (program_id, seq);


--
-- Name: events_by_reference; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX events_by_reference ON public.events USING btree (program_id, ref_event_id, seq) WHERE (ref_event_id IS NOT NULL);


--
-- Name: events_by_type; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX events_by_type ON public.events USING btree (program_id, event_type, seq);


--
-- Name: events events_count; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER events_count AFTER INSERT OR DELETE OR UPDATE OF event_type, deleted ON public.events FOR EACH ROW EXECUTE FUNCTION public.eventstore_count_events();


--
-- Name: api_keys api_keys_user_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.api_keys
    ADD CONSTRAINT api_keys_user_id_fkey FOREIGN KEY (user_id) REFERENCES public.users(user_id);


--
-- Name: grants grants_program_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.grants
    ADD CONSTRAINT grants_program_id_fkey FOREIGN KEY (program_id) REFERENCES public.programs(program_id);


--
-- Name: grants grants_user_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.grants
    ADD CONSTRAINT grants_user_id_fkey FOREIGN KEY (user_id) REFERENCES public.users(user_id);


--
-- Name: subscriptions subscriptions_owner_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.subscriptions
    ADD CONSTRAINT subscriptions_owner_fkey FOREIGN KEY (owner) REFERENCES public.users(user_id);


--
-- PostgreSQL database dump complete
--



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
-- Name: event_types; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.event_types (
    event_type text NOT NULL COLLATE pg_catalog."C",
    description text NOT NULL,
    created_us bigint NOT NULL,
    updated_us bigint NOT NULL
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
-- Name: programs; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.programs (
    program_id text NOT NULL COLLATE pg_catalog."C",
    name text NOT NULL,
    created_us bigint NOT NULL,
    registered_types_only boolean DEFAULT false NOT NULL
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

INSERT INTO public.api_keys VALUES ('esk_awpWHDa-', 'reader', '\xea87eaee4383d212dae6ef70f7ecd4113955f66488a983b901a616e7f3a2eddf', 1796587904630773, NULL, NULL);
INSERT INTO public.api_keys VALUES ('esk_ZZC7I6yp', 'admin', '\x88265b3d607c327442f00ba3aa2646b993f02d468447318dfc4da0cf2bb980cf', 1796587904628777, 1796587904631431, NULL);


--
-- Data for Name: event_type_counts; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.event_type_counts VALUES ('CourseCompleted', 'STRICT', 1);
INSERT INTO public.event_type_counts VALUES ('CertificateIssued', 'FOO', 1);
INSERT INTO public.event_type_counts VALUES ('CourseCompleted', 'FOO', 4);
INSERT INTO public.event_type_counts VALUES ('Badge', 'BAR', 3);


--
-- Data for Name: event_types; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.event_types VALUES ('CourseCompleted', 'A learner completed a course.', 1796587904639180, 1796587904639180);


--
-- Data for Name: events; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.events VALUES (1, '733', 'FOO-0', 'FOO', 'CourseCompleted', '\x6d30', 1767225600000000, 1767225600000000, '{"EventId":"FOO-0","ProgramId":"FOO","ProgramMemberId":"m0","EventType":"CourseCompleted","EventStartUTC":"2026-01-01T00:00:00Z","EventEndUTC":"2026-01-01T00:00:00Z","EventData":{},"ReferenceEventId":null,"Deleted":false', NULL, false, 1, '\x63057eeeb19d77f085ff97fff14a92c7f0ad22b1af9a3bc9a045f4dcc2819d71', 1796587904654026, 1796587904654026);
INSERT INTO public.events VALUES (4, '736', 'FOO-3', 'FOO', 'CourseCompleted', '\x6d31', 1767225600000000, 1767225600000000, '{"EventId":"FOO-3","ProgramId":"FOO","ProgramMemberId":"m1","EventType":"CourseCompleted","EventStartUTC":"2026-01-01T00:00:00Z","EventEndUTC":"2026-01-01T00:00:00Z","EventData":{},"ReferenceEventId":null,"Deleted":false', NULL, false, 1, '\xe1d9f6f7641959cca825fb8c5a92f4b87987bcaede171a4d20323ceb69f29912', 1796587904660942, 1796587904660942);
INSERT INTO public.events VALUES (5, '737', 'FOO-4', 'FOO', 'CourseCompleted', '\x6d30', 1767225600000000, 1767225600000000, '{"EventId":"FOO-4","ProgramId":"FOO","ProgramMemberId":"m0","EventType":"CourseCompleted","EventStartUTC":"2026-01-01T00:00:00Z","EventEndUTC":"2026-01-01T00:00:00Z","EventData":{},"ReferenceEventId":null,"Deleted":false', NULL, false, 1, '\x63057eeeb19d77f085ff97fff14a92c7f0ad22b1af9a3bc9a045f4dcc2819d71', 1796587904661920, 1796587904661920);
INSERT INTO public.events VALUES (6, '738', 'FOO-5', 'FOO', 'CourseCompleted', '\x6d31', 1767225600000000, 1767225600000000, '{"EventId":"FOO-5","ProgramId":"FOO","ProgramMemberId":"m1","EventType":"CourseCompleted","EventStartUTC":"2026-01-01T00:00:00Z","EventEndUTC":"2026-01-01T00:00:00Z","EventData":{},"ReferenceEventId":null,"Deleted":false', NULL, false, 1, '\xe1d9f6f7641959cca825fb8c5a92f4b87987bcaede171a4d20323ceb69f29912', 1796587904662512, 1796587904662512);
INSERT INTO public.events VALUES (8, '740', 'STRICT-1', 'STRICT', 'CourseCompleted', '\x6d31', 1767225600000000, 1767225600000000, '{"EventId":"STRICT-1","ProgramId":"STRICT","ProgramMemberId":"m1","EventType":"CourseCompleted","EventStartUTC":"2026-01-01T00:00:00Z","EventEndUTC":"2026-01-01T00:00:00Z","EventData":{},"ReferenceEventId":null,"Deleted":false', NULL, false, 1, '\xe1d9f6f7641959cca825fb8c5a92f4b87987bcaede171a4d20323ceb69f29912', 1796587904663623, 1796587904663623);
INSERT INTO public.events VALUES (9, '741', 'FOO-1', 'FOO', 'CertificateIssued', '\x6d31', 1767225600000000, 1767225600000000, '{"EventId":"FOO-1","ProgramId":"FOO","ProgramMemberId":"m1","EventType":"CertificateIssued","EventStartUTC":"2026-01-01T00:00:00Z","EventEndUTC":"2026-01-01T00:00:00Z","EventData":{},"ReferenceEventId":null,"Deleted":false', NULL, false, 2, '\xa10cc156f8ae67ffabf00ea723db2e0bc6ac63632f02012cdbe7d90a90730277', 1796587904658935, 1796587904664349);
INSERT INTO public.events VALUES (10, '742', 'FOO-2', 'FOO', 'CourseCompleted', NULL, NULL, NULL, NULL, NULL, true, 2, NULL, 1796587904659960, 1796587904664946);
INSERT INTO public.events VALUES (11, '743', 'BAR-1', 'BAR', 'Badge', NULL, NULL, NULL, NULL, NULL, true, 2, NULL, 1796587904663052, 1796587904666011);
INSERT INTO public.events VALUES (12, '744', 'BAR-b0', 'BAR', 'Badge', '\x6d32', 1767312000000000, 1767312000000000, '{"EventId":"BAR-b0","ProgramId":"BAR","ProgramMemberId":"m2","EventType":"Badge","EventStartUTC":"2026-01-02T00:00:00Z","EventEndUTC":"2026-01-02T00:00:00Z","EventData":{},"ReferenceEventId":null,"Deleted":false', NULL, false, 1, '\xe0abdb19719f3557104360f23710366c435af5ddb5caba47839f69225a90743a', 1796587904667046, 1796587904667046);
INSERT INTO public.events VALUES (13, '744', 'BAR-b1', 'BAR', 'Badge', '\x6d32', 1767312000000000, 1767312000000000, '{"EventId":"BAR-b1","ProgramId":"BAR","ProgramMemberId":"m2","EventType":"Badge","EventStartUTC":"2026-01-02T00:00:00Z","EventEndUTC":"2026-01-02T00:00:00Z","EventData":{},"ReferenceEventId":null,"Deleted":false', NULL, false, 1, '\xe0abdb19719f3557104360f23710366c435af5ddb5caba47839f69225a90743a', 1796587904667046, 1796587904667046);
INSERT INTO public.events VALUES (14, '744', 'BAR-b2', 'BAR', 'Badge', '\x6d32', 1767312000000000, 1767312000000000, '{"EventId":"BAR-b2","ProgramId":"BAR","ProgramMemberId":"m2","EventType":"Badge","EventStartUTC":"2026-01-02T00:00:00Z","EventEndUTC":"2026-01-02T00:00:00Z","EventData":{},"ReferenceEventId":null,"Deleted":false', NULL, false, 1, '\xe0abdb19719f3557104360f23710366c435af5ddb5caba47839f69225a90743a', 1796587904667046, 1796587904667046);


--
-- Data for Name: eventstore_schema; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.eventstore_schema VALUES (2);


--
-- Data for Name: grants; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.grants VALUES ('reader', 'FOO', 'read');


--
-- Data for Name: programs; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.programs VALUES ('FOO', 'Program FOO', 1796587904635908, false);
INSERT INTO public.programs VALUES ('BAR', 'Program BAR', 1796587904638149, false);
INSERT INTO public.programs VALUES ('STRICT', 'Program STRICT', 1796587904638704, true);


--
-- Data for Name: users; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.users VALUES ('admin', true, false, 1796587904628777);
INSERT INTO public.users VALUES ('reader', false, false, 1796587904630773);


--
-- Name: events_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.events_seq', 14, true);


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
-- Name: programs programs_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.programs
    ADD CONSTRAINT programs_pkey PRIMARY KEY (program_id);


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
-- PostgreSQL database dump complete
--



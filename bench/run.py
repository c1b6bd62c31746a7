"""``make bench``: eventstore's speed and memory, each figure a ratio to a baseline
measured in the same run on the same machine.

Issue 3:
  1. single PUT, new ids, 16 connections, authenticated, durable, events/s
     / a WSGI app that only reads the body and answers 200 (same waitress settings)
  2. GET /events/{id} req/s / the same baseline app answering the same GETs
  3. POST /events, 1,000 events a request, events/s
     / raw sqlite3 executemany of the same rows in 1,000-row synchronous=FULL transactions
  4. pulling the whole database through Next with limit=1000, events/s
     / raw keyset SELECT of the same rows serialized with json.dumps
  5. PUT events/s with the database full / PUT events/s on an empty database
  6. server RSS after 100,000 requests / before them
  7. server RSS after 50,000 requests without credentials (401s) / before them
  8. eventstore_client.py follow --until-caught-up of the full database to /dev/null
     / figure 4's pull through Next
Issue 14 (bench/feed.py, printed last): a feed page at 1,000 programs / the same page
at 1 program, and a commit's CPU with 8 long polls it cannot match / with none.
Figures 1, 2, 4, 8, 9, 10 and 11: the median of 3 rounds' ratios, the runs compared taking turns.
Issue 10 (serve.py --processes):
  9. GET /events/{id} at --processes 2 / the baseline app served by 2 processes
 10. GET at --processes 2 / GET at --processes 1 (figure 2's server, in figure 9's rounds)
 11. PUT at --processes 2 / the baseline at 1 process (figure 1's), and its p99
 12. cross-process long-poll wake-up: ms from a PUT sent to one process to the
     answer of a long poll waiting in another (p50/p99)
  plus p50/p99 latency of 1 and 2.
Issue 12 (bench/event_types.py, printed after issue 14's):
 13. GET /event-types on a 1,000,000-event database / GET /programs, same server
 14. single PUT with the event-type counts kept / without them (triggers dropped)
Issue 33 (bench/schemas.py, printed after issue 12's):
 15. PUT of a type with a 20-property schema / the same PUT of a type without one
 16. proving a schema on 100,000 live events (s), GET p99 meanwhile
 17. a retention sweep of 100,000 expired events (s), PUT p99 meanwhile
Issue 31 (bench/subscriptions.py, printed after issue 33's):
 18. GET /subscriptions, 100 subscriptions over a 1,000,000-event database, ms (beside
     the feed's own page time)
 19. reading a subscription's page / reading GET /events with the same filter
Issue 34 (bench/metrics.py, printed after issue 31's): GET with metrics / without
(--no-metrics), and a scrape's time at 1 and 2 processes and over issue 31's database.
Issue 32 (bench/webhooks.py, printed after issue 31's):
 20. commit-to-receipt latency of a webhook delivery, p50/p99 ms, at 1 process (target p99
     at most 500 ms) and at 2
 21. deliveries of a backlog, events/s, with MaxEvents 1 and 100 / the feed's own read
     through Next at the same limit
Issue 35 (bench/cost.py, printed after issue 34's): CPU microseconds per request of
the serving process, PUT and GET, against the baseline app's (C1, C2), per event of a
batch POST and of the pull through Next (C3, C4), and PUT and GET with this round's
features in use against without (C5); beside C1 and C2 the floor (bench/floor_server.py:
the cheapest durable PUT and GET by id in this stack) against the same baseline.
Issue 11 (bench/postgres.py, printed last): PostgreSQL against SQLite, P1-P7.
Issue 4:
  export and import events/s / raw sqlite3 read and executemany of the same rows,
  and the exporter's peak RSS.

The load generator is wrk (Debian's package; the Makefile installs it).
``python bench/run.py --events 100000`` runs a smaller database.
"""

import argparse
import base64
import http.client
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (GET_LUA, NO_AUTH_LUA, PUT_LUA, PYTHON, ROOT, ROUNDS, Baseline, Server, alternating, cpu_seconds,
                    event_body, keyset_pull, median_pair, median_run, percentile, pull_through_next, rss_mb, say,
                    timed_child, wake_up_latencies, wrk)

import eventstore  # noqa: E402  (common put the repository on sys.path)
import eventstore_sqlite  # noqa: E402
import eventstore_storage  # noqa: E402
import cost  # noqa: E402  (bench/cost.py)
import event_types  # noqa: E402  (bench/event_types.py)
import feed  # noqa: E402  (bench/feed.py)
import metrics  # noqa: E402  (bench/metrics.py)
import postgres  # noqa: E402  (bench/postgres.py)
import schemas  # noqa: E402  (bench/schemas.py)
import subscriptions  # noqa: E402  (bench/subscriptions.py)
import webhooks  # noqa: E402  (bench/webhooks.py)

TARGETS = {  # figure -> (lowest acceptable ratio, or highest for RSS growth)
    "1. PUT vs baseline app": (">=", 0.5),
    "2. GET vs baseline app": (">=", 0.6),
    "3. POST batch vs executemany": (">=", 0.5),
    "4. pull via Next vs keyset SELECT": (">=", 0.35),
    "5. PUT full vs PUT empty": (">=", 0.8),
    "6. RSS after/before 100k requests": ("<", 1.10),
    "7. RSS after/before 50k 401s": ("<", 1.10),
    "8. client follow vs pull via Next": (">=", 0.7),
    "9. GET, 2 processes vs baseline at 2": (">=", 0.6),
    "10. GET, 2 processes vs 1 process": (">=", 2.0),
    "11. PUT, 2 processes vs baseline at 1": (">=", 0.5),
}
LATENCY_TARGETS = {  # (p99 in ms, at most)
    "11. PUT, 2 processes": 25.0,
    "12. cross-process long-poll wake-up": 100.0,
}


# --- measuring ------------------------------------------------------------------------


# --- building databases -------------------------------------------------------------

def rows_for(count, start=0):
    """Event rows exactly as the app stores them (validated, normalized, hashed)."""
    for n in range(start, start + count):
        event = eventstore.validate_event(f"FOO-e{n}", event_body(n))
        yield (event.event_id, event.program_id, event.event_type, event.member_id, event.start_us,
               event.end_us, event.doc, event.ref_event_id, event.content_hash)


INSERT = ("INSERT INTO events (seq, event_id, program_id, event_type, member_id, start_us, end_us, doc,"
          " ref_event_id, content_hash, deleted, revision, created_us, updated_us)"
          " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 1, ?, ?)")


def insert_rows(conn, rows, first_seq, batch):
    """Raw executemany in ``batch``-row synchronous=FULL transactions."""
    now = eventstore.now_us()
    seq = first_seq
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT, [(seq + i, *row, now, now) for i, row in enumerate(chunk)])
        conn.execute("COMMIT")
        seq += len(chunk)


def fresh_database(path):
    session = eventstore_sqlite.SQLiteStorage(path).session()
    with session.transaction(eventstore.now_us()) as tx:
        tx.put_program("FOO", "Foo")
    return session.conn


# --- the figures ----------------------------------------------------------------------

class Report:
    """The figures (ratios), latencies and notes of a run, and their printing."""

    def __init__(self):
        self.figures, self.latencies, self.notes = {}, {}, []

    def ratio(self, name, ours, base, unit):
        self.figures[name] = ours / base
        self.notes.append(f"{name}: {ours:,.0f} vs {base:,.0f} {unit}")

    def print(self, options, export_rss, import_rss):
        print(f"\neventstore benchmark: {options.events:,} events, wrk -t1 -c16 -d{options.seconds}s, "
              f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}")
        print(f"{'figure':40} {'ratio':>7}  target")
        for name, value in self.figures.items():
            target = TARGETS.get(name)
            verdict = ""
            if target:
                op, bound = target
                met = value >= bound if op == ">=" else value < bound
                verdict = f"{op} {bound:<5} {'met' if met else 'NOT MET'}"
            print(f"{name:40} {value:7.2f}  {verdict}")
        print(f"\n{'latency (ms)':40} {'p50':>7} {'p99':>7}  target")
        for name, (p50, p99) in self.latencies.items():
            bound = LATENCY_TARGETS.get(name)
            verdict = f"p99 < {bound:g} {'met' if p99 < bound else 'NOT MET'}" if bound else ""
            print(f"{name:40} {p50:7.2f} {p99:7.2f}  {verdict}")
        print(f"\nexporter peak RSS: {export_rss:.1f} MB; importer peak RSS: {import_rss:.1f} MB")
        print("\n".join(self.notes))


class Loads:
    """The server of figures 1 and 2 on an empty database, the baseline app, and
    the wrk scripts they are measured with (figures 6, 7 and 9-11 use them too)."""

    def __init__(self, workdir):
        self.baseline = Baseline()
        self.server = Server(workdir / "empty.db")
        auth = "Basic " + base64.b64encode(f"admin:{self.server.admin_key}".encode()).decode()
        self.server.register("FOO")
        self.put_lua = PUT_LUA % {"auth": auth, "body": json.dumps(event_body(1))}
        get_count = 10_000
        for start in range(1, get_count + 1, 1000):
            body = json.dumps({"Events": [{"EventId": f"FOO-g-{n}", **event_body(n)}
                                          for n in range(start, start + 1000)]}).encode()
            assert self.server.request("POST", "/events", body, user="admin", key=self.server.admin_key,
                                       headers={"Content-Type": "application/json"})[0] == 200
        self.get_lua = GET_LUA % {"auth": auth, "count": get_count}
        wrk(self.server.port, self.put_lua, 2, args=["warm"])


def figures_1_2(report, loads, seconds):
    """Single PUTs and GETs against the baseline app. Each figure is the median of
    ROUNDS rounds' ratios, the runs it compares taking turns, so that this
    machine's drift falls on both sides of a ratio alike. -> (figure 1's PUT run,
    the server's CPU seconds a GET)."""
    say("1-2: PUT and GET, eventstore vs baseline app ...")
    server, baseline = loads.server, loads.baseline
    server_cpu, get_requests = 0.0, 0  # the server's CPU in our GET runs, and their requests

    def ours_get_run(seconds):
        nonlocal server_cpu, get_requests
        before = cpu_seconds(server.process.pid)
        result = wrk(server.port, loads.get_lua, seconds)
        server_cpu, get_requests = server_cpu + cpu_seconds(server.process.pid) - before, get_requests + result[3]
        return result

    one = alternating({
        "base_put": lambda r: wrk(baseline.port, loads.put_lua, seconds, args=[f"b{r}"]),
        "put_empty": lambda r: wrk(server.port, loads.put_lua, seconds, args=[f"empty{r}"]),
        "base_get": lambda r: wrk(baseline.port, loads.get_lua, seconds),
        "ours_get": lambda r: ours_get_run(seconds)})
    report.ratio("1. PUT vs baseline app", *median_pair(one, "put_empty", "base_put"), "req/s")
    report.ratio("2. GET vs baseline app", *median_pair(one, "ours_get", "base_get"), "req/s")
    put_empty, base_put, ours_get = (median_run(one[name]) for name in ("put_empty", "base_put", "ours_get"))
    report.latencies.update({"1. PUT": put_empty[1:3], "1. baseline PUT": base_put[1:3],
                             "2. GET": ours_get[1:3], "2. baseline GET": median_run(one["base_get"])[1:3]})
    return put_empty, server_cpu / get_requests


def figures_9_to_11(report, loads, seconds, workdir, get_cpu):
    """The same PUTs and GETs with 2 worker processes, against the baseline app
    served by 2 processes the same way (and PUT against the baseline at 1
    process, in the same rounds); figure 10 in figure 9's rounds."""
    say("9-11: PUT and GET at --processes 2, and the baseline at 2 ...")
    two = Server(workdir / "empty.db", processes=2)
    baseline2 = Baseline(processes=2)
    wrk(two.port, loads.put_lua, 2, args=["warm2"])
    put_lua, get_lua = loads.put_lua, loads.get_lua
    both = alternating({
        "base_get2": lambda r: wrk(baseline2.port, get_lua, seconds),
        "get2": lambda r: wrk(two.port, get_lua, seconds),
        "get1": lambda r: wrk(loads.server.port, get_lua, seconds),
        "base_put": lambda r: wrk(loads.baseline.port, put_lua, seconds, args=[f"b1{r}"]),
        "put2": lambda r: wrk(two.port, put_lua, seconds, args=[f"two{r}"]),
        "base_put2": lambda r: wrk(baseline2.port, put_lua, seconds, args=[f"b2{r}"])})
    loads.baseline.stop()
    baseline2.stop()
    two.stop()
    get2, put2, base_put2, base_get2 = (median_run(both[name]) for name in ("get2", "put2", "base_put2", "base_get2"))
    report.ratio("9. GET, 2 processes vs baseline at 2", *median_pair(both, "get2", "base_get2"), "req/s")
    report.ratio("10. GET, 2 processes vs 1 process", *median_pair(both, "get2", "get1"), "req/s")
    # What figure 10 can reach on this machine: one process is bound by its one
    # core (s CPU seconds a GET); two need s of the server's and w of wrk's CPU a
    # GET out of the machine's cores, so the ratio is at most cores * s / (s + w).
    cores = len(os.sched_getaffinity(0))
    report.notes.append(f"10. at most {min(2.0, cores * get_cpu / (get_cpu + get2[4])):.2f} on this machine: "
                        f"{cores} cores, the server's CPU a GET at 1 process {get_cpu * 1e6:.0f} us, "
                        f"wrk's {get2[4] * 1e6:.0f} us")
    report.ratio("11. PUT, 2 processes vs baseline at 1", *median_pair(both, "put2", "base_put"), "req/s")
    report.notes.append(f"baseline PUT at 2 processes: {base_put2[0]:,.0f} req/s; "
                        f"PUT at 2 processes vs baseline at 2: {put2[0] / base_put2[0]:.2f}")
    report.latencies.update({"9. GET, 2 processes": get2[1:3], "11. PUT, 2 processes": put2[1:3],
                             "9. baseline GET, 2": base_get2[1:3]})


def figure_12(report, workdir):
    say("12: cross-process long-poll wake-up ...")
    wakes = wake_up_latencies(workdir / "wake.db")
    report.latencies["12. cross-process long-poll wake-up"] = (percentile(wakes, 50), percentile(wakes, 99))


def figures_6_7(report, loads):
    """RSS over 100,000 requests on the same server, then over 50,000 without
    credentials (each a 401; one once leaked about 6.5 KB)."""
    server = loads.server
    say("6: RSS over 100,000 requests ...")
    before = rss_mb(server.process.pid)
    served = 0
    while served < 100_000:
        served += wrk(server.port, loads.get_lua, 5)[3]
        served += wrk(server.port, loads.put_lua, 3, args=[f"rss{served}"])[3]
    after = rss_mb(server.process.pid)
    report.figures["6. RSS after/before 100k requests"] = after / before
    report.notes.append(f"6. RSS: {before:.1f} MB before, {after:.1f} MB after {served:,} requests")
    say("7: RSS over 50,000 401s ...")
    wrk(server.port, NO_AUTH_LUA, 2, expect_errors=True)
    before = rss_mb(server.process.pid)
    refused = 0
    while refused < 50_000:
        refused += wrk(server.port, NO_AUTH_LUA, 5, expect_errors=True)[3]
    after = rss_mb(server.process.pid)
    report.figures["7. RSS after/before 50k 401s"] = after / before
    report.notes.append(f"7. RSS: {before:.1f} MB before, {after:.1f} MB after {refused:,} requests answered 401")
    server.stop()


def figure_3(report, workdir):
    """Batches of 1,000 against raw executemany of the same rows."""
    say("3: POST /events batches vs executemany ...")
    batches = 50
    server = Server(workdir / "batch.db").register("FOO")
    bodies = [json.dumps({"Events": [{"EventId": f"FOO-e{n}", **event_body(n)}
                                     for n in range(start, start + 1000)]}).encode()
              for start in range(0, batches * 1000, 1000)]
    connection = http.client.HTTPConnection("127.0.0.1", server.port)
    batch_auth = "Basic " + base64.b64encode(f"admin:{server.admin_key}".encode()).decode()
    headers = {"Authorization": batch_auth, "Content-Type": "application/json"}
    started = time.perf_counter()
    for body in bodies:
        connection.request("POST", "/events", body, headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
    post_rate = batches * 1000 / (time.perf_counter() - started)
    connection.close()
    server.stop()
    rows = list(rows_for(batches * 1000))
    conn = fresh_database(workdir / "raw-batch.db")
    started = time.perf_counter()
    insert_rows(conn, rows, 1, 1000)
    raw_rate = len(rows) / (time.perf_counter() - started)
    conn.close()
    report.ratio("3. POST batch vs executemany", post_rate, raw_rate, "events/s")


def full_database(path, events):
    """The full database, built with raw inserts (figure 3's rows) -> its connection."""
    say(f"building a {events:,}-event database ...")
    conn = fresh_database(path)
    chunk = 100_000
    for start in range(0, events, chunk):
        insert_rows(conn, list(rows_for(min(chunk, events - start), start)), start + 1, 10_000)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return conn


def figures_4_5_8(report, full, conn, events, seconds, put_empty):
    """Pulling everything through Next against a raw keyset SELECT + json.dumps
    (4) and the client's follow against that pull (8), in rounds taken in turn;
    then PUT on the full database against figure 1's PUT on an empty one (5)."""
    say("4: pulling through Next vs keyset SELECT ...")
    server = Server(full)
    with eventstore_sqlite.write_transaction(conn):
        tx = eventstore_sqlite.SQLiteTransaction(conn, eventstore.now_us())
        key = eventstore.add_user(tx, "bench", True, {})

    def pull(_):
        pulled, rate = pull_through_next(server.port, "bench", key)
        assert pulled == events, pulled
        return (rate,)

    def raw(_):
        return (keyset_pull(lambda after_seq: conn.execute(
            f"SELECT {eventstore_storage.EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT 1000",
            (after_seq,)).fetchall()),)

    def follow(_):
        with open(os.devnull, "wb") as sink:
            started = time.perf_counter()
            subprocess.run([PYTHON, "eventstore_client.py", "--url", f"http://127.0.0.1:{server.port}",
                            "--user", "bench", "follow", "--until-caught-up"], stdout=sink, stderr=subprocess.DEVNULL,
                           env={**os.environ, "EVENTSTORE_KEY": key}, cwd=ROOT, check=True)
            return (events / (time.perf_counter() - started),)

    say(f"   and the client's follow --until-caught-up, in {ROUNDS} rounds taken in turn ...")
    pulls = alternating({"pull": pull, "raw": raw, "follow": follow})
    report.ratio("4. pull via Next vs keyset SELECT", *median_pair(pulls, "pull", "raw"), "events/s")
    report.ratio("8. client follow vs pull via Next", *median_pair(pulls, "follow", "pull"), "events/s")
    say("5: PUT on the full database ...")
    full_auth = "Basic " + base64.b64encode(f"bench:{key}".encode()).decode()
    put_full = wrk(server.port, PUT_LUA % {"auth": full_auth, "body": json.dumps(event_body(1))},
                   seconds, args=["full"])
    server.stop()
    report.ratio("5. PUT full vs PUT empty", put_full[0], put_empty[0], "req/s")
    report.latencies["5. PUT full"] = put_full[1:3]


def export_and_import(report, workdir, full, conn, events):
    """export and import against raw reads and executemany -> their peak RSS (MB)."""
    say("export and import ...")
    dump = workdir / "dump.jsonl"
    with open(dump, "wb") as out:
        export_time, export_rss = timed_child([PYTHON, "eventstore.py", "--db", str(full), "export"], stdout=out)
    started = time.perf_counter()
    read = sum(1 for _ in conn.execute(f"SELECT {eventstore_storage.EVENT_COLUMNS} FROM events ORDER BY seq"))
    raw_read = read / (time.perf_counter() - started)
    fresh_database(workdir / "import.db").close()
    import_time, import_rss = timed_child([PYTHON, "eventstore.py", "--db", str(workdir / "import.db"),
                                           "import", str(dump)])
    # The rates are of the events written (figure 5's PUTs are in the database too), counted, not assumed.
    with open(dump, "rb") as lines:
        exported = sum(1 for _ in lines)
    assert exported == read, f"export wrote {exported:,} events of {read:,}"
    imported = sqlite3.connect(workdir / "import.db")
    stored = imported.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    imported.close()
    assert stored == exported, f"import stored {stored:,} events of {exported:,}"
    raw = fresh_database(workdir / "raw-import.db")
    started = time.perf_counter()
    insert_rows(raw, list(rows_for(events)), 1, 5000)
    raw_import = events / (time.perf_counter() - started)
    raw.close()
    report.ratio("export vs raw read", exported / export_time, raw_read, "events/s")
    report.ratio("import vs executemany", exported / import_time, raw_import, "events/s")
    return export_rss, import_rss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="size of the full database (default 1,000,000)")
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run (default 10)")
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="eventstore-bench-"))
    report = Report()
    loads = Loads(workdir)
    put_empty, get_cpu = figures_1_2(report, loads, options.seconds)
    figures_9_to_11(report, loads, options.seconds, workdir, get_cpu)
    figure_12(report, workdir)
    figures_6_7(report, loads)
    figure_3(report, workdir)
    full = workdir / "full.db"
    conn = full_database(full, options.events)
    figures_4_5_8(report, full, conn, options.events, options.seconds, put_empty)
    export_rss, import_rss = export_and_import(report, workdir, full, conn, options.events)
    conn.close()
    report.print(options, export_rss, import_rss)
    feed.main()  # feed pages at 1 and 1,000 programs, long polls that a commit cannot match
    event_types.main(options.events, options.seconds)
    schemas.main(min(options.events, 100_000), options.seconds)
    subscriptions.main(options.events, options.seconds)
    webhooks.main()
    metrics.main(options.seconds, options.events)
    cost.main(min(options.seconds, 6))
    postgres.main(options.events, options.seconds)  # last: it starts a PostgreSQL cluster of its own


if __name__ == "__main__":
    main()
